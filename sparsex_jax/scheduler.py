"""Scheduling a job: validated requests in, outputs out, failures isolated. Two ways:

- static (`run`): requests are taken in order; a batch is as large as `max_batch_size` allows and
  halves until the KV store can lease it; it is prefilled and decoded to its last token before the
  next batch starts. A request that fits nowhere fails alone. A batch that fails while it runs is
  retried one request at a time, so an error is charged to the request that causes it and every
  other request still runs.
- continuous (`run_continuous`): a running batch of fixed rows; between two device decode loops,
  finished requests leave (their pages are released) and waiting requests, in order, are
  admitted into the free rows (leased, prefilled together, then decoded with the others; a group
  stops at a padded size, `admission_limit`).

Host side, no jax: the device work is the caller's callbacks.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from sparsex_jax.api import RequestError, RequestOutput
from sparsex_jax.kv import KVStore, Leases, PoolExhausted
from sparsex_jax.planner import largest_bucket_within
from sparsex_jax.prompt import Prompt
from sparsex_jax.reuse import ReusePolicy
from sparsex_jax.sampling import SamplingParams

if TYPE_CHECKING:
  from sparsex_jax.batching import RunningBatch
  from sparsex_jax.batching import DecodingRequest
  from sparsex_jax.kv.store import Lease

ON_ERROR = ("raise", "return")
# Continuous batching ends a device loop early, to admit waiting requests, once this fraction of
# the rows is free. Refilling sooner keeps more rows busy but admits smaller groups, each padded
# to a power of two; 0.25 and 0.5 measured within 3% of each other (docs/throughput.md).
REFILL_FRACTION = 0.25


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


@dataclasses.dataclass(frozen=True)
class Job:
  """One validated request of a generate() call."""

  index: int  # position in the call's request list
  request_id: str | int | None
  prompt: Prompt
  sampling: SamplingParams


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

  def fail(self, index: int, request_id, cause) -> None:
    """"raise": a RequestError carrying what finished so far; "return": an error output."""
    error = RequestError(index, request_id, cause, list(self))
    if self.on_error == "raise":
      raise error from (cause if isinstance(cause, BaseException) else None)
    self[index] = RequestOutput.failed(request_id, str(error))


def lease_largest(store: KVStore, prompts: Sequence[Prompt], policy: ReusePolicy,
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


def batches(store: KVStore, jobs: Sequence[Job], policy: ReusePolicy, max_batch_size: int,
            outputs: Outputs, prepare: Callable[[list[Job]], object] | None = None
            ) -> Iterator[tuple[list[Job], Leases]]:
  """Batches that fit the pool, with their leases (release them with `with`). `prepare(chunk)`
  runs before a chunk's lookups (the engine loads its segments from a disk cache there). A
  request that fits nowhere fails alone."""
  i = 0
  while i < len(jobs):
    head = list(jobs[i:i + max_batch_size])
    size, leases, error = lease_largest(
        store, [j.prompt for j in head], policy, [j.sampling.max_new_tokens for j in head],
        None if prepare is None else lambda n: prepare(head[:n]))
    if leases is None:
      outputs.fail(head[0].index, head[0].request_id, error)
    else:
      yield head[:size], leases
    i += size


def run(store: KVStore, jobs: Sequence[Job], policy: ReusePolicy, max_batch_size: int,
        outputs: Outputs, run_batch: Callable[[list[Job], Leases], list[RequestOutput]],
        recover: Callable[[], object], prepare: Callable[[list[Job]], object] | None = None
        ) -> None:
  """Runs every job; `recover` restores the device state after a failed batch."""
  for chunk, leases in batches(store, jobs, policy, max_batch_size, outputs, prepare):
    try:
      with leases:
        done = run_batch(chunk, leases)
    except Exception as e:  # pylint: disable=broad-except
      recover()
      if len(chunk) == 1:
        outputs.fail(chunk[0].index, chunk[0].request_id, e)
      else:
        for job in chunk:
          run(store, [job], policy, 1, outputs, run_batch, recover, prepare)
      continue
    for job, out in zip(chunk, done):
      outputs[job.index] = out


def run_continuous(store: KVStore, jobs: Sequence[Job], policy: ReusePolicy,
                   batch: "RunningBatch", outputs: Outputs,
                   start: Callable[[list[Job], list["Lease"]], list["DecodingRequest"]],
                   finish: Callable[["DecodingRequest"], RequestOutput],
                   visit: Callable[[int], object], recover: Callable[[], bool],
                   prepare: Callable[[list[Job]], object] | None = None) -> None:
  """Runs every job through a running batch (continuous batching).

  start(jobs, leases): prefills the admitted jobs and samples their first tokens; the sequences
    that are not done join `batch` (start does every device step before the first join, so a
    failure leaves the batch as it was). finish(seq): a done sequence's output.
  visit(min_active): one device decode loop over `batch`; it may end early once fewer than
    min_active rows still run, so that waiting requests get the rows.
  recover(): restores the device state after a failure; True when the pool (and with it every
    running request's K/V) was lost.

  Admission is by pages: a request is admitted when the KV store can lease its prompt and
  max_new_tokens pages (evicting cached pages nobody holds), so a running request never runs out
  of pages. Requests are admitted in order; one that cannot be leased waits for running requests
  to finish, and one that cannot be leased with nothing running (nothing left to free) fails alone.

  Failures: a prefill that fails charges its request, or, for a group, marks each of its requests
  "solo" (retried alone: admitted only into an empty batch, nothing joins it); a decode loop that
  fails charges its only request, or makes every running request solo. A lost pool restarts the
  running requests from their prompts (their K/V went with it; seeded sampling gives the same
  tokens again).
  """
  waiting = collections.deque((job, False) for job in jobs)  # (job, solo)
  held: dict[int, Leases] = {}  # job index -> its leases, from admission to release
  solo: set[int] = set()  # indices of running jobs that run alone

  def release(job: Job) -> None:
    held.pop(job.index).release()
    solo.discard(job.index)

  def done(seq) -> None:
    outputs[seq.key.index] = finish(seq)
    release(seq.key)

  def requeue_running(as_solo: bool) -> None:
    seqs = [batch.leave(r) for r, s in enumerate(batch.requests) if s is not None]
    for seq in sorted(seqs, key=lambda q: q.key.index, reverse=True):
      release(seq.key)
      waiting.appendleft((seq.key, as_solo))

  def fail(job: Job, error) -> None:
    outputs.fail(job.index, job.request_id, error)

  try:
    while waiting or batch.n_running:
      group: list[tuple[Job, bool]] = []
      limit = admission_limit(batch.n_free, batch.n_running, batch.n_rows)
      while waiting and len(group) < limit and not solo:
        job, alone = waiting[0]
        if alone and (batch.n_running or group):
          break
        if prepare is not None:
          prepare([job])
        try:
          leases = store.acquire([job.prompt], policy, [job.sampling.max_new_tokens])
        except PoolExhausted as e:
          if batch.n_running or group:
            break  # waits for running requests to give pages back
          waiting.popleft()
          fail(job, e)  # nothing else holds pages: it can never be leased
          continue
        except ValueError as e:  # larger than the whole pool
          waiting.popleft()
          fail(job, e)
          continue
        waiting.popleft()
        held[job.index] = leases
        group.append((job, alone))
        if alone:
          solo.add(job.index)
          break
      if group:
        admitted = [job for job, _ in group]
        try:
          seqs = start(admitted, [held[job.index][0] for job in admitted])
        except Exception as e:  # pylint: disable=broad-except
          for job in admitted:
            release(job)
          if recover():
            requeue_running(as_solo=False)
          if len(admitted) == 1:
            fail(admitted[0], e)
          else:
            for job in reversed(admitted):
              waiting.appendleft((job, True))
          continue
        for seq in seqs:
          if seq.done:  # stopped at its first token: it never joins
            done(seq)
      if not batch.n_running:
        continue
      min_active = 1
      if waiting and not solo:  # end the loop once REFILL_FRACTION of the rows are free
        min_active = max(1, batch.n_running - refill_rows(batch.n_rows) + 1)
      try:
        visit(min_active)
      except Exception as e:  # pylint: disable=broad-except
        recover()
        if batch.n_running == 1:
          seq = batch.leave(next(r for r, s in enumerate(batch.requests) if s is not None))
          release(seq.key)
          fail(seq.key, e)
        else:
          requeue_running(as_solo=True)
        continue
      for seq in batch.finished():
        done(seq)
  finally:  # on_error="raise" (or an interrupt) ends the job: give back whatever is held
    for r, seq in enumerate(batch.requests):
      if seq is not None:
        batch.leave(r)
    for leases in held.values():
      leases.release()
    held.clear()
