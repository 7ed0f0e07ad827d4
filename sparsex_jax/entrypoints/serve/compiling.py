"""Compiling a request's prefill program on another thread, so that the engine loop does not stall.

A server meets prefill shapes it has not compiled (each request's token, active-set and page
buckets), and a program of Llama-3-8B shapes takes 5-9 s to compile on the GPU. Compiled on the
engine loop, it stalled every running and waiting request: 14-79 s of a 20-45 s load run in
round 16 (docs/serving_log.md). Here the scheduler asks, once a waiting request holds its lease,
whether its prefill program is compiled (`ready`). If not, the program is compiled on this
module's thread from the request's planned batch (shapes only), the lease is given back, and
the request keeps its place in the queue while the running requests go on decoding and the
requests behind it whose programs exist are admitted. jit keeps what the thread compiled, so
the prefill that follows compiles nothing. A prefill split in two around host-tier loads has
both halves compiled, in one job (the second's input shapes are the first's output).
"""

from __future__ import annotations

import concurrent.futures

from sparsex_jax.step_runner import prefill_compile


class CompileAhead:
  """The scheduler's `ready` hook for one reuse policy of a server's engine."""

  def __init__(self, engine, policy):
    self.engine, self.policy = engine, policy
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sparsex-compile")
    self._compiling: dict[tuple, concurrent.futures.Future] = {}
    # The programs compiled (or compiling) on the thread; added to on the engine thread only
    # (the engine loop reads it between steps).
    self.keys: set[tuple] = set()
    self.deferred = 0  # admissions deferred while their program compiled

  def ready(self, request, lease) -> bool:
    key, compile_now = prefill_compile(self.engine, [request.prompt], [lease], self.policy)
    if key in self.engine.kv.log:
      return True
    future = self._compiling.get(key)
    if future is None:
      self._compiling[key] = self._thread.submit(compile_now)
      self.keys.add(key)
    elif future.done():  # compiled (or failed: then the prefill compiles it and reports why)
      del self._compiling[key]
      if future.exception() is None:
        self.keys.update(future.result())  # both halves, where host-tier loads split it
      return True
    self.deferred += 1
    return False

  def close(self) -> None:
    self._thread.shutdown(wait=False, cancel_futures=True)
