"""The scheduler of continuous batching: who is prefilled, decoded and released at each step.

Host side, no jax. The engine's loop is

    while scheduler.has_work:
      step = scheduler.schedule()             # a typed Step: admissions with leases, decode
      results = engine._run(step)             # the device work (prefill, sampling, decode loops)
      scheduler.update(step, results)         # finished and failed requests, pages released

The scheduler owns the requests (waiting, running, finished, failed) and their KV leases; the
engine owns the running batch's rows on the device. Requests may be added between any two steps
(`add_request`).

Admission is by pages: a request is admitted when the KV store can lease its prompt and
max_new_tokens pages (evicting cached pages nobody holds), so a running request never runs out of
pages. Requests are admitted in order; one that cannot be leased waits for running requests to
finish, and one that cannot be leased with nothing running (nothing left to free) fails alone. A
store shared by several schedulers (a server's, one per reuse method) says so with
`others_running`: a request then waits while any of them holds leases, since their requests give
pages back as they finish; with `may_admit` they keep one order across schedulers (a request
waits while an older one of another scheduler waits for pages: `blocked`). A group of admissions stops at a padded size (`admission_limit`).

Failures are isolated per request: a prefill that fails charges its request, or, for a group,
marks each of its requests "solo" (retried alone: admitted only into an empty batch, nothing joins
it); a decode loop that fails charges its only request, or makes every running request solo. A lost
pool restarts the running requests from their prompts (their K/V went with it; seeded sampling
gives the same tokens again).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from sparsex_jax.api import RequestError, RequestOutput
from sparsex_jax.kv import KVStore, Lease, Leases, PoolExhausted
from sparsex_jax.planner import bucket, largest_bucket_within
from sparsex_jax.prompt import Prompt
from sparsex_jax.sampling import SamplingParams

if TYPE_CHECKING:
  from sparsex_jax.reuse import ReusePolicy

ON_ERROR = ("raise", "return")
# Continuous batching ends a device loop early, to admit waiting requests, once this fraction of
# the rows is free. Refilling sooner keeps more rows busy but admits smaller groups, each padded
# to a power of two; 0.25 and 0.5 measured within 3% of each other (docs/throughput.md).
REFILL_FRACTION = 0.25
# The padded tokens one prefill may compute (its batch bucket x its length bucket), like vLLM's
# max_num_batched_tokens: a prefill's activations grow with them, and 32 long prompts padded
# together (32 x 8K tokens at Llama-3-8B shapes) asked for over 100 GB on an 80 GB H100 (the
# serving benchmark, docs/serving_log.md). 32K keeps a short-prompt job's groups whole (64 x 512).
DEFAULT_MAX_PREFILL_TOKENS = 32768


def refill_rows(n_rows: int) -> int:
  """Free rows at which a device loop ends early to admit waiting requests."""
  return max(1, int(n_rows * REFILL_FRACTION))


def admission_limit(n_free: int, n_running: int, n_rows: int) -> int:
  """How many waiting requests continuous batching admits into `n_free` rows.

  A prefill pads its batch of requests to a bucket (a power of two at these sizes), so a group
  one past a bucket computes nearly twice its requests: 17 admitted requests cost what 32 do.
  When the free rows exceed a bucket that is itself at least the refill size, the group stops at
  that bucket and the few rows over it wait for the next loop (a long-tailed H100 job, where
  loops often end with 17-20 rows free, spent a sixth of its prefill on padding:
  docs/throughput.md, round 5). Fewer free rows than that are all filled: leaving them idle
  would cost more decode than their padding costs prefill. An empty batch is filled whole."""
  if not n_running or n_free <= 1:
    return n_free
  within = largest_bucket_within(n_free, minimum=1)
  return within if within >= refill_rows(n_rows) else n_free


def prefill_tokens(n_requests: int, longest: int) -> int:
  """The padded tokens of a prefill of n_requests prompts whose longest has `longest` tokens
  (planner.plan_batch pads both dimensions to a bucket; exact-prefix tokens counted too: an
  upper bound, known before the cache lookups)."""
  return bucket(n_requests, minimum=1) * bucket(longest)


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
  """One validated request: what the scheduler admits, and the engine prefills and decodes."""

  index: int  # the caller's handle, unique per scheduler (generate(): position in its list)
  request_id: str | int | None
  prompt: Prompt
  sampling: SamplingParams


@dataclasses.dataclass(frozen=True)
class Completion:
  """A request that left the scheduler: its output, or the error that failed it."""

  request: ScheduledRequest
  output: RequestOutput | None = None
  error: BaseException | None = None


@dataclasses.dataclass(frozen=True)
class Step:
  """What the engine does in one step, in this order.

  drop: running requests whose rows the engine empties first (requeued or failed by the last
    update; their leases are already released).
  failed: requests that failed admission in this step (never leased): report them.
  prefill, leases: requests to prefill together, one lease each; those not done at their first
    token join the running rows.
  decode_steps: then one device decode loop of at most this many steps over every running row
    (0: none this step).
  stop_after: end that loop early once this many of its rows have finished, so that waiting
    requests get the rows (0: never early).
  """

  drop: tuple[int, ...] = ()
  failed: tuple[Completion, ...] = ()
  prefill: tuple[ScheduledRequest, ...] = ()
  leases: tuple[Lease, ...] = ()
  decode_steps: int = 0
  stop_after: int = 0


@dataclasses.dataclass(frozen=True)
class StepResult:
  """What the engine reports of a step.

  finished: (index, output) of the requests that stopped in the step (at their first token or in
    the decode loop), in the order they stopped.
  prefill_error: the prefill failed (nothing of it joined; no decode loop ran).
  decode_error: the decode loop failed (no row advanced).
  pool_lost: recovering from the error replaced the device pool: every running request's K/V is
    gone.
  """

  finished: tuple[tuple[int, RequestOutput], ...] = ()
  prefill_error: Exception | None = None
  decode_error: Exception | None = None
  pool_lost: bool = False


class Scheduler:
  """Continuous batching over `n_rows` rows of a running batch, leasing from `store`.

  prepare(request), if given, runs before a request's cache lookups (the engine loads its
  segments from a disk cache there); what it raises propagates.
  others_running(), if given, says whether another scheduler leasing from the same store has
  running requests: a request that finds no pages then waits for them instead of failing.
  may_admit(request), if given, is asked before the waiting request at the head is leased: False
  and it waits (admissions stop at it for this step).
  ready(request, lease), if given, is asked once a request holds its lease: False and the lease
  is given back and the request keeps its place in the queue, while the requests behind it may
  be admitted (a server compiling its prefill program on another thread meanwhile; the running
  requests go on decoding).
  max_prefill_tokens: a prefill group stops before the request that would take its padded size
  (prefill_tokens) past this; a request over it alone still runs, alone. None: no limit.
  blocked: whether the last step's head request waited for pages (another scheduler's
  may_admit reads it, so that a younger request does not take the pages an older one waits for).
  """

  def __init__(self, store: KVStore, policy: "ReusePolicy", n_rows: int, *,
               steps_per_visit: int, prepare: Callable[[ScheduledRequest], object] | None = None,
               others_running: Callable[[], bool] | None = None,
               may_admit: Callable[[ScheduledRequest], bool] | None = None,
               ready: Callable[[ScheduledRequest, Lease], bool] | None = None,
               max_prefill_tokens: int | None = DEFAULT_MAX_PREFILL_TOKENS):
    if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int)
                                           or max_prefill_tokens < 1):
      raise ValueError(f"max_prefill_tokens must be an int >= 1 or None, got "
                       f"{max_prefill_tokens!r}")
    self.max_prefill_tokens = max_prefill_tokens
    if n_rows < 1 or steps_per_visit < 1:
      raise ValueError(f"n_rows and steps_per_visit must be >= 1, got {n_rows}, "
                       f"{steps_per_visit}")
    self.store, self.policy, self.n_rows = store, policy, int(n_rows)
    self.steps_per_visit, self.prepare = int(steps_per_visit), prepare
    self.others_running, self.may_admit, self.ready = others_running, may_admit, ready
    self.blocked = False
    self.waiting: collections.deque[tuple[ScheduledRequest, bool]] = collections.deque()
    self.running: dict[int, ScheduledRequest] = {}  # admitted, not yet finished or failed
    self.finished: dict[int, RequestOutput] = {}
    self.failed: dict[int, BaseException] = {}
    self._leases: dict[int, Leases] = {}  # running index -> its leases
    self._solo: set[int] = set()  # running indices that run alone
    self._drop: list[int] = []  # rows the engine empties at the next step
    self._known: set[int] = set()
    self._in_flight: Step | None = None  # scheduled, not yet updated

  @property
  def has_work(self) -> bool:
    return bool(self.waiting or self.running or self._drop)

  def add_request(self, request: ScheduledRequest) -> None:
    """Queues a request behind the waiting ones; callable between any two steps."""
    if request.index in self._known:
      raise ValueError(f"request index {request.index} was already added")
    self._known.add(request.index)
    self.waiting.append((request, False))

  def schedule(self) -> Step:
    """The next step; its admitted requests hold their leases from now on. Every step must be
    given back to update() before the next is scheduled."""
    if self._in_flight is not None:
      raise RuntimeError("schedule() called again before update() of the last step")
    drop, self._drop = tuple(self._drop), []
    failed: list[Completion] = []
    group: list[ScheduledRequest] = []
    limit = admission_limit(self.n_rows - len(self.running), len(self.running), self.n_rows)
    self.blocked = False
    longest = 0
    i = 0  # the first waiting request not deferred in this step
    while i < len(self.waiting) and len(group) < limit and not self._solo:
      request, alone = self.waiting[i]
      if alone and self.running:  # a solo request waits for an empty batch
        break
      n = int(request.prompt.token_ids.size)
      if (group and self.max_prefill_tokens is not None
          and prefill_tokens(len(group) + 1, max(longest, n)) > self.max_prefill_tokens):
        break  # the next prefill takes it
      if self.may_admit is not None and not self.may_admit(request):
        break
      if self.prepare is not None:
        self.prepare(request)
      try:
        leases = self.store.acquire([request.prompt], self.policy,
                                    [request.sampling.max_new_tokens])
      except PoolExhausted as e:
        if self.running or (self.others_running is not None and self.others_running()):
          self.blocked = True
          break  # waits for running requests (its own or another scheduler's) to give pages back
        del self.waiting[i]
        failed.append(self._fail(request, e))  # nothing else holds pages: it can never fit
        continue
      except ValueError as e:  # larger than the whole pool
        del self.waiting[i]
        failed.append(self._fail(request, e))
        continue
      if self.ready is not None and not self.ready(request, leases[0]):
        leases.release()
        i += 1  # it keeps its place; those behind it may go first meanwhile
        continue
      del self.waiting[i]
      self.running[request.index] = request
      self._leases[request.index] = leases
      group.append(request)
      longest = max(longest, n)
      if alone:
        self._solo.add(request.index)
        break
    stop_after = refill_rows(self.n_rows) if self.waiting and not self._solo else 0
    self._in_flight = Step(drop=drop, failed=tuple(failed), prefill=tuple(group),
                           leases=tuple(self._leases[r.index][0] for r in group),
                           decode_steps=self.steps_per_visit if self.running else 0,
                           stop_after=stop_after)
    return self._in_flight

  def update(self, step: Step, result: StepResult) -> list[Completion]:
    """Takes a step's results; returns the requests that finished or failed in it, in order."""
    if step is not self._in_flight:
      raise ValueError("update() of a step that is not the one last scheduled")
    self._in_flight = None
    done: list[Completion] = []
    if result.prefill_error is not None:
      for request in step.prefill:
        self._release(request.index)
      if result.pool_lost:
        self._requeue_running(solo=False)
      if len(step.prefill) == 1:
        done.append(self._fail(step.prefill[0], result.prefill_error))
      else:  # which of them failed is unknown: each is retried alone
        for request in reversed(step.prefill):
          self.waiting.appendleft((request, True))
      return done
    for index, output in result.finished:
      request = self._release(index)
      self.finished[index] = output
      done.append(Completion(request, output=output))
    if result.decode_error is not None:
      if len(self.running) == 1:
        index = next(iter(self.running))
        self._drop.append(index)
        done.append(self._fail(self._release(index), result.decode_error))
      else:
        self._requeue_running(solo=True)
    return done

  def cancel(self, index: int) -> bool:
    """Takes a request out between two steps (its client went away): a waiting one leaves the
    queue; a running one gives its leases back now and its row is emptied at the next step (its
    K/V pages may be leased again in that same step: the row is dropped before any prefill).
    Returns False for a request that is not waiting or running (finished, failed, unknown)."""
    if self._in_flight is not None:
      raise RuntimeError("cancel() between schedule() and update()")
    for i, (request, _) in enumerate(self.waiting):
      if request.index == index:
        del self.waiting[i]
        return True
    if index in self.running:
      self._release(index)
      self._drop.append(index)
      return True
    return False

  def forget(self, index: int) -> None:
    """Drops an ended request's record (its output in `finished`, its error in `failed`). A
    long-lived caller (the server) forgets each request as it reports it, so that the scheduler
    holds nothing of the requests it is done with; a batch job keeps them to the end."""
    self.finished.pop(index, None)
    self.failed.pop(index, None)

  def close(self) -> None:
    """Gives back every lease held (a job that ends early: an error raised, an interrupt)."""
    for leases in self._leases.values():
      leases.release()
    self._leases.clear()
    self.running.clear()
    self._solo.clear()
    self._in_flight = None

  def _release(self, index: int) -> ScheduledRequest:
    self._leases.pop(index).release()
    self._solo.discard(index)
    return self.running.pop(index)

  def _fail(self, request: ScheduledRequest, error: BaseException) -> Completion:
    self.failed[request.index] = error
    return Completion(request, error=error)

  def _requeue_running(self, solo: bool) -> None:
    """Every running request back to the front of the queue, in index order."""
    for index in sorted(self.running, reverse=True):
      self._drop.append(index)
      self.waiting.appendleft((self._release(index), solo))


class Outputs(list):
  """A job's outputs in request order (None: not run yet); records failures per on_error.

  on_output(index, output), if given, is called as each output is set (in completion order):
  a caller can write results while the rest of the job runs."""

  def __init__(self, n: int, on_error: str,
               on_output: Callable[[int, RequestOutput], object] | None = None):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    super().__init__([None] * n)
    self.on_error, self.on_output = on_error, on_output

  def __setitem__(self, index, output) -> None:
    super().__setitem__(index, output)
    if self.on_output is not None and output is not None:
      self.on_output(index, output)

  def record(self, completions: Iterable[Completion]) -> None:
    for c in completions:
      if c.error is None:
        self[c.request.index] = c.output
      else:
        self.fail(c.request.index, c.request.request_id, c.error)

  def fail(self, index: int, request_id, cause) -> None:
    """"raise": a RequestError carrying what finished so far; "return": an error output."""
    error = RequestError(index, request_id, cause, list(self))
    if self.on_error == "raise":
      raise error from (cause if isinstance(cause, BaseException) else None)
    self[index] = RequestOutput.failed(request_id, str(error))


def lease_largest(store: KVStore, prompts: Sequence[Prompt], policy: "ReusePolicy",
                  max_new_tokens: Sequence[int], before: Callable[[int], object] | None = None
                  ) -> tuple[int, Leases | None, Exception | None]:
  """Leases the first `size` prompts, halving size until the pool holds them:
  (size, leases, None), or (1, None, error) when even the first prompt alone does not fit.
  `before(size)` runs before each try; what it raises is not a lease failure and propagates."""
  size = len(prompts)
  while True:
    if before is not None:
      before(size)
    try:
      return size, store.acquire(prompts[:size], policy, max_new_tokens[:size]), None
    except (PoolExhausted, ValueError) as e:
      if size == 1:
        return 1, None, e
      size //= 2
