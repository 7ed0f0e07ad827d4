"""Compiling a request's prefill program on another thread, so that the engine loop does not stall.

A server meets prefill shapes it has not compiled (each request's token, active-set and page
buckets), and a program of Llama-3-8B shapes takes 5-9 s to compile on the GPU. Compiled on the
engine loop, it stalled every running and waiting request: 14-79 s of a 20-45 s load run in
round 16 (docs/serving_log.md). Here the scheduler asks, once a waiting request holds its lease,
whether its prefill program is compiled (`ready`). If not, the program is compiled on this
module's thread from the request's planned batch (shapes only), the lease is given back, and
the request keeps its place in the queue while the running requests go on decoding and the
requests behind it whose programs exist are admitted. jit keeps what the thread compiled, so
the prefill that follows compiles nothing.
"""

from __future__ import annotations

import concurrent.futures

from sparsex_jax.programs import CompileLog
from sparsex_jax.step_runner import prefill_program


class CompileAhead:
  """The scheduler's `ready` hook for one reuse policy of a server's engine."""

  def __init__(self, engine, policy):
    self.engine, self.policy = engine, policy
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sparsex-compile")
    self._compiling: dict[tuple, concurrent.futures.Future] = {}
    self.keys: set[tuple] = set()  # the programs compiled (or compiling) on the thread
    self.deferred = 0  # admissions deferred while their program compiled

  def ready(self, request, lease) -> bool:
    choice = prefill_program(self.engine, [request.prompt], [lease], self.policy)
    if choice is None:  # host-tier loads: the two halves compile on the engine loop
      return True
    program, args, static = choice
    key = CompileLog.key(program.__name__, tuple(sorted(static.items())), args)
    if key in self.engine.kv.log:
      return True
    future = self._compiling.get(key)
    if future is None:
      self._compiling[key] = self._thread.submit(
          self.engine.kv.compile_later(program, *args, **static))
      self.keys.add(key)
    elif future.done():  # compiled (or failed: then the prefill compiles it and reports why)
      del self._compiling[key]
      return True
    self.deferred += 1
    return False

  def close(self) -> None:
    self._thread.shutdown(wait=False, cancel_futures=True)
