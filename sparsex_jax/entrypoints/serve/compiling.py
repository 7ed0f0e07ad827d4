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

The host tier's programs are the same kind of thing (round 21): an eviction reads a segment's or
a history run's pages into the tier, a later request's load writes them back, each with one
program per padded size and layer range, met whenever a size first occurs, and until now
compiled on the engine loop (the test of round 19 allowed a load's write to compile there). With
a host tier, they are compiled here after the copy widths, in the same way
(step_runner.host_tier_compiles), also while the server has no request at all (`compile_idle`,
which the engine loop calls while it waits).
"""

from __future__ import annotations

import concurrent.futures
import functools
import warnings

from sparsex_jax import planner
from sparsex_jax.step_runner import copy_compile, host_tier_compiles, prefill_compile


class CompileAhead:
  """The scheduler's `ready` hook for one reuse policy of a server's engine."""

  def __init__(self, engine, policy):
    self.engine, self.policy = engine, policy
    self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sparsex-compile")
    self._compiling: dict[tuple, concurrent.futures.Future] = {}
    # The programs the thread has compiled (a compile that failed is not one: its program
    # compiles when it runs, and the engine loop counts that as a stall); added to on the engine
    # thread only (the engine loop reads it between steps).
    self.keys: set[tuple] = set()
    self._submitted: set[tuple] = set()  # compiled, compiling or failed: never submitted twice
    self.deferred = 0  # admissions deferred while their program compiled
    # Programs compiled while no prefill compiles, each a thunk giving (key, compile): the copy
    # widths, then the host tier's reads and writes.
    max_slots = min(engine.config.max_seq_len, engine.layout.sentinel)
    self._background = [functools.partial(copy_compile, engine, width) for width in (
        planner.copy_widths(max_slots) if policy.writes_segment_cache else [])]
    self._background += host_tier_compiles(engine, policy)
    self._running: concurrent.futures.Future | None = None

  def ready(self, request, lease) -> bool:
    key, compile_now = prefill_compile(self.engine, [request.prompt], [lease], self.policy)
    if key in self.engine.kv.log:
      self.compile_idle()
      return True
    future = self._compiling.get(key)
    if future is None:
      self._compiling[key] = self._thread.submit(compile_now)
      self._submitted.add(key)
    elif future.done():  # compiled (or failed: then the prefill compiles it and reports why)
      del self._compiling[key]
      if future.exception() is None:
        self.keys.update(future.result())  # both halves, where host-tier loads split it
      self.compile_idle()
      return True
    self.deferred += 1
    return False

  def compile_idle(self) -> None:
    """Starts the next background program (a copy width, a host-tier read or write) if the
    thread is idle: a prefill's compile waits for at most one of them, never for all."""
    while self._background and self._idle():
      thunk = self._background.pop(0)
      try:
        key, compile_now = thunk()
      except Exception as e:  # pylint: disable=broad-except
        # Compiling ahead is an optimisation: a program it cannot describe compiles when it runs.
        warnings.warn(f"compile ahead: skipped a program ({type(e).__name__}: {e})")
        continue
      if key not in self.engine.kv.log and key not in self._submitted:
        self._running = self._thread.submit(compile_now)
        self._submitted.add(key)

  def _collect(self) -> None:
    """Counts the background program that finished, if it compiled (on the engine thread)."""
    if self._running is not None and self._running.done():
      if self._running.exception() is None:
        self.keys.update(self._running.result())
      self._running = None

  def _idle(self) -> bool:
    self._collect()
    return all(f.done() for f in self._compiling.values()) and self._running is None

  @property
  def background_pending(self) -> int:
    """Background programs not yet compiled (or compiling)."""
    self._collect()
    return len(self._background) + int(self._running is not None)

  def close(self) -> None:
    self._thread.shutdown(wait=False, cancel_futures=True)
