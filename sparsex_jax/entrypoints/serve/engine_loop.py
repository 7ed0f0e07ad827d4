"""One engine loop on the device, fed by a thread-safe queue (continuous batching for a server).

A dedicated thread owns the Engine, one Scheduler and StepRunner per reuse method in use (the
server's, and any a request chose), and runs schedule -> run -> update while any has work.
Between two steps it takes what the HTTP side sent (new requests: `Scheduler.add_request`;
cancellations: `Scheduler.cancel`, which gives the request's pages back at once), so a request
joins the running batch between decode chunks. After every step, the tokens each running request
made are pushed to its asyncio queue (thread-safely, on the server's event loop), so decoding
streams to each client as it goes.

The groups share the engine's KV pool and admit from it through one rule: a request that finds no
free pages waits while any group has running requests (they give pages back as they finish), and
fails only when nothing at all is running; at each round the group whose oldest waiting request
arrived first schedules first, and while a request waits for pages no younger request of another
group is admitted, so the pages finished requests give back go to the oldest waiter, whatever its
method.

Each request's failure (a lease that can never fit, a failed prefill or decode loop) is reported
to that request alone; an unexpected error in a step fails the requests of that reuse method's
batch, which is rebuilt; the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
import traceback
from typing import Callable

import numpy as np

from sparsex_jax.api import RequestOutput
from sparsex_jax.entrypoints.serve.compiling import CompileAhead
from sparsex_jax.prompt import Prompt
from sparsex_jax.reuse import ReuseMethod
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.scheduler import Completion, ScheduledRequest, Scheduler, StepResult
from sparsex_jax.step_runner import StepRunner


@dataclasses.dataclass(frozen=True)
class Tokens:
  """Tokens made since the last event (never a stop token)."""
  token_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Finished:
  """The request's end: its output (finish_reason "error" with `.error` if it failed)."""
  output: RequestOutput


@dataclasses.dataclass(eq=False)
class Handle:
  """One request between the HTTP side (its asyncio queue) and the engine thread."""

  index: int
  prompt: Prompt
  sampling: SamplingParams
  reuse: ReuseMethod
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue
  request_id: str = ""
  t_arrival: float = 0.0  # time.perf_counter() when it arrived
  t_first: float | None = None  # when its first token was pushed
  sent: int = 0  # tokens pushed so far (engine thread only)
  done: bool = False

  def push(self, event) -> None:
    self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Full(Exception):
  """The queue is full: answer 429."""


@dataclasses.dataclass
class _Group:
  method: ReuseMethod
  scheduler: Scheduler
  runner: StepRunner
  ahead: CompileAhead


class EngineLoop:
  """The engine's thread. `submit` and `cancel` are called from any thread; `stop` drains."""

  def __init__(self, engine, reuse: ReuseMethod, *, max_waiting: int = 64,
               on_step: Callable[["EngineLoop"], object] | None = None,
               on_first_token: Callable[[Handle], object] | None = None,
               on_finished: Callable[[Handle, RequestOutput], object] | None = None):
    self.engine, self.reuse, self.max_waiting = engine, reuse, int(max_waiting)
    self.on_step, self.on_first_token, self.on_finished = on_step, on_first_token, on_finished
    self._inbox: queue.Queue = queue.Queue()
    self._groups: dict[ReuseMethod, _Group] = {}
    self._handles: dict[int, Handle] = {}  # engine thread only
    self._ids = itertools.count()
    self._lock = threading.Lock()
    self._pending = 0  # submitted, not finished or cancelled
    self._stopping = threading.Event()
    self._thread = threading.Thread(target=self._run, name="sparsex-engine", daemon=True)
    self.error: BaseException | None = None  # what ended the thread, if it died
    # Steps that ran a program this process had not compiled yet, and their wall time: every
    # request waiting meanwhile waits for the compile (GET /metrics).
    self.compiling_steps = 0
    self.compile_stall_s = 0.0
    # A test hook: called (engine thread) with each request's first-token logits [V] float32.
    # Set it before the requests it should see; it copies every prefill's logits to the host.
    self.on_first_logits: Callable[[Handle, np.ndarray], object] | None = None
    stops = getattr(engine.tokenizer, "stop_ids", ()) or ()
    self._batch_stops = max(len(stops), 1)
    # Requests held at once: a running batch's rows, and max_waiting more queued.
    self.capacity = StepRunner.serving_batch(engine, 1).n_rows + self.max_waiting

  # ---- any thread ------------------------------------------------------------------------------

  def start(self) -> None:
    self._thread.start()

  @property
  def pending(self) -> int:
    return self._pending

  @property
  def programs_compiled_ahead(self) -> int:
    return sum(len(g.ahead.keys) for g in list(self._groups.values()))

  @property
  def programs_to_compile_ahead(self) -> int:
    """Slot-copy and host-tier programs the compile threads have not compiled yet."""
    return sum(g.ahead.background_pending for g in list(self._groups.values()))

  @property
  def admissions_deferred(self) -> int:
    return sum(g.ahead.deferred for g in list(self._groups.values()))

  def counts(self) -> tuple[int, int]:
    """(running, waiting) requests, read without the engine thread's help (approximate)."""
    running = sum(len(g.scheduler.running) for g in list(self._groups.values()))
    return running, max(self._pending - running, 0)

  def submit(self, handle_args: dict) -> Handle:
    """A new request (Handle fields but index); raises Full when the queue is full."""
    with self._lock:
      if self._stopping.is_set():
        raise Full("the server is shutting down")
      if self._pending >= self.capacity:
        raise Full(f"{self._pending} requests are running or waiting (the limit: "
                   f"{self.capacity})")
      self._pending += 1
      handle = Handle(index=next(self._ids), **handle_args)
    self._inbox.put(("submit", handle))
    return handle

  def cancel(self, handle: Handle) -> None:
    """Takes a request out (its client went away, or it hit a stop string or its timeout)."""
    self._inbox.put(("cancel", handle))

  def stop(self, timeout: float | None = None) -> None:
    """Drain: refuse new requests, finish those submitted, then end the thread."""
    self._stopping.set()
    self._inbox.put(("wake", None))
    self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  # ---- the engine thread ------------------------------------------------------------------------

  def _has_work(self) -> bool:
    return any(g.scheduler.has_work for g in self._groups.values())

  def _run(self) -> None:
    try:
      # The server's own method gets its running batch now, so that its compile thread works
      # through the programs a server will meet (CompileAhead) before the first request.
      self._group(self.reuse)
      while True:
        self._take(block=not self._has_work())
        if not self._has_work():
          if self._stopping.is_set() and self._inbox.empty():
            for group in self._groups.values():  # drained: no compile is waited for now
              group.ahead.close()
            return
          for group in self._groups.values():  # nothing to run: compile what a server will meet
            group.ahead.compile_idle()
          continue
        progressed = False
        for group in self._in_arrival_order():
          if group.scheduler.has_work:
            progressed |= self._step(group)
        if not progressed:  # only requests whose programs compile: wait for news, not spin
          self._take(block=True)
        if self.on_step is not None:
          self.on_step(self)
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e
      traceback.print_exc()
      for handle in list(self._handles.values()):
        self._finish(handle, RequestOutput.failed(handle.request_id, f"engine loop died: {e}"))

  def _in_arrival_order(self) -> list[_Group]:
    """The groups, the one whose oldest waiting request arrived first first (groups with none
    waiting last): pages freed by one step go to the oldest waiter at the next admission."""
    def head(group: _Group) -> float:
      waiting = group.scheduler.waiting
      return waiting[0][0].index if waiting else float("inf")
    return sorted(self._groups.values(), key=head)

  def _others_running(self, method: ReuseMethod) -> bool:
    return any(g.scheduler.running for m, g in self._groups.items() if m != method)

  def _may_admit(self, method: ReuseMethod, request: ScheduledRequest) -> bool:
    """False while an older request of another group waits for pages."""
    for m, g in self._groups.items():
      waiting = g.scheduler.waiting
      if m != method and g.scheduler.blocked and waiting and waiting[0][0].index < request.index:
        return False
    return True

  def _first_logits(self, request: ScheduledRequest, logits: np.ndarray) -> None:
    handle = self._handles.get(request.index)
    if handle is not None and self.on_first_logits is not None:
      self.on_first_logits(handle, logits)

  def _take(self, block: bool) -> None:
    """Everything in the inbox (waiting up to 0.1 s for the first item when `block`)."""
    while True:
      try:
        kind, handle = self._inbox.get(block=block, timeout=0.1 if block else None)
      except queue.Empty:
        return
      block = False
      if kind == "submit":
        self._handles[handle.index] = handle
        group = self._group(handle.reuse)
        if self.on_first_logits is not None:  # set after the group was made
          group.runner.on_first_logits = self._first_logits
        group.scheduler.add_request(
            ScheduledRequest(handle.index, handle.request_id, handle.prompt, handle.sampling))
      elif kind == "cancel" and not handle.done:
        group = self._groups.get(handle.reuse)
        if group is not None:
          group.scheduler.cancel(handle.index)
        self._forget(handle)

  def _group(self, method: ReuseMethod) -> _Group:
    group = self._groups.get(method)
    if group is None:
      engine = self.engine
      policy = method.resolve(engine.config)
      runner = StepRunner(engine, policy, (), time.perf_counter(),
                          batch=StepRunner.serving_batch(engine, self._batch_stops))
      runner.on_first_logits = self._first_logits if self.on_first_logits is not None else None
      runner.on_prefilled = self._send_first_tokens
      runner.prefill_alone = True
      ahead = CompileAhead(engine, policy)
      sched = Scheduler(engine.store, policy, runner.batch.n_rows,
                        steps_per_visit=engine.steps_per_visit, prepare=runner.prepare,
                        others_running=lambda: self._others_running(method),
                        may_admit=lambda request: self._may_admit(method, request),
                        ready=ahead.ready,
                        max_prefill_tokens=engine.max_prefill_tokens)
      group = self._groups[method] = _Group(method, sched, runner, ahead)
    return group

  def _step(self, group: _Group) -> bool:
    """One step of a group; False when it had nothing to do (nothing runs, and every waiting
    request's program is compiling)."""
    sched, runner = group.scheduler, group.runner
    try:
      step = sched.schedule()
      if not (step.prefill or step.decode_steps or step.drop or step.failed):
        sched.update(step, StepResult())
        return False
      self._complete(sched, step.failed)
      log = self.engine.kv.log
      n_programs, t0 = len(log), time.perf_counter()
      result = runner.run(step)
      new = set(log.since(n_programs))
      new -= group.ahead.keys  # compiled on the compile thread: nothing waited for them
      if new:
        self.compiling_steps += 1
        self.compile_stall_s += time.perf_counter() - t0
      done = sched.update(step, result)
    except Exception as e:  # pylint: disable=broad-except
      # Not a request's failure (those are reported in the StepResult): this batch cannot go on.
      # Its requests fail, everything it held is given back, and the next request starts anew.
      traceback.print_exc()
      sched.close()
      group.ahead.close()
      del self._groups[group.method]
      for handle in list(self._handles.values()):
        if handle.reuse == group.method:
          self._finish(handle, RequestOutput.failed(handle.request_id, f"engine error: {e}"))
      return True
    for seq in runner.batch.running():
      handle = self._handles.get(seq.key.index)
      if handle is not None and len(seq.tokens) > handle.sent:
        self._push_tokens(handle, seq.tokens[handle.sent:])
    self._complete(sched, done)
    return True

  def _send_first_tokens(self, seqs) -> None:
    """Right after a prefill, before the step's decode loop: each client gets its first token
    then (round 16: one request at a time waited for a decode loop too, 1.96x the TTFT of
    Engine.generate)."""
    for seq in seqs:
      handle = self._handles.get(seq.key.index)
      if handle is not None and len(seq.tokens) > handle.sent:
        self._push_tokens(handle, seq.tokens[handle.sent:])

  def _push_tokens(self, handle: Handle, tokens) -> None:
    if not tokens:
      return
    if handle.sent == 0:
      handle.t_first = time.perf_counter()
      if self.on_first_token is not None:
        self.on_first_token(handle)
    handle.sent += len(tokens)
    handle.push(Tokens(tuple(int(t) for t in tokens)))

  def _complete(self, sched: Scheduler,
                completions: tuple[Completion, ...] | list[Completion]) -> None:
    for c in completions:
      sched.forget(c.request.index)  # reported here: the scheduler keeps nothing of it
      handle = self._handles.get(c.request.index)
      if handle is None:
        continue
      if c.error is not None:
        self._finish(handle, RequestOutput.failed(handle.request_id, str(c.error)))
        continue
      self._push_tokens(handle, c.output.token_ids[handle.sent:])
      self._finish(handle, c.output)

  def _finish(self, handle: Handle, output: RequestOutput) -> None:
    if self.on_finished is not None and not handle.done:
      self.on_finished(handle, output)
    handle.push(Finished(output))
    self._forget(handle)

  def _forget(self, handle: Handle) -> None:
    if self._handles.pop(handle.index, None) is not None:
      handle.done = True
      with self._lock:
        self._pending -= 1

