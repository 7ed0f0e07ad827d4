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

The slot-copy program that moves segments computed in context into the segment cache after a
prefill has one size per power of two of the slots it moves (planner.copy_widths), and a server
meets a new one whenever a prompt brings more new segment tokens than any before: it ran on the
engine loop, compiling while every request waited (round 20: once in a CPU load run's timed part
after a full warm-up). For a policy that caches segments, every width up to the model's context
is compiled here too, smallest first, one at a time and only while no prefill is compiling.
"""

from __future__ import annotations

import concurrent.futures

from sparsex_jax import planner
from sparsex_jax.step_runner import copy_compile, prefill_compile


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
    max_slots = min(engine.config.max_seq_len, engine.layout.sentinel)
    self._copy_widths = (planner.copy_widths(max_slots) if policy.writes_segment_cache else [])
    self._copying: concurrent.futures.Future | None = None

  def ready(self, request, lease) -> bool:
    key, compile_now = prefill_compile(self.engine, [request.prompt], [lease], self.policy)
    if key in self.engine.kv.log:
      self._compile_a_copy()
      return True
    future = self._compiling.get(key)
    if future is None:
      self._compiling[key] = self._thread.submit(compile_now)
      self.keys.add(key)
    elif future.done():  # compiled (or failed: then the prefill compiles it and reports why)
      del self._compiling[key]
      if future.exception() is None:
        self.keys.update(future.result())  # both halves, where host-tier loads split it
      self._compile_a_copy()
      return True
    self.deferred += 1
    return False

  def _compile_a_copy(self) -> None:
    """The next slot-copy width, if the thread is idle: a prefill's compile waits for at most one
    copy's, never for all of them."""
    if not self._copy_widths or any(not f.done() for f in self._compiling.values()) or (
        self._copying is not None and not self._copying.done()):
      return
    key, compile_now = copy_compile(self.engine, self._copy_widths.pop(0))
    if key not in self.engine.kv.log:
      self._copying = self._thread.submit(compile_now)
      self.keys.add(key)

  @property
  def copies_pending(self) -> int:
    """Slot-copy widths not yet compiled (or compiling)."""
    return len(self._copy_widths) + int(self._copying is not None and not self._copying.done())

  def close(self) -> None:
    self._thread.shutdown(wait=False, cancel_futures=True)
