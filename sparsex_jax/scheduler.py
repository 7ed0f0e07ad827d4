"""Batching a job: validated requests in, batches that fit the pool out, failures isolated.

Host side. Requests are taken in order; a batch is as large as `max_batch_size` allows and halves
until the KV store can lease it; a request that fits nowhere fails alone. A batch that fails while
it runs is retried one request at a time, so an error is charged to the request that causes it
and every other request still runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

from sparsex_jax.api import RequestError, RequestOutput
from sparsex_jax.kv import KVStore, Leases, PoolExhausted
from sparsex_jax.prompt import Prompt
from sparsex_jax.policy import ReusePolicy
from sparsex_jax.sampling import SamplingParams

ON_ERROR = ("raise", "return")


@dataclasses.dataclass(frozen=True)
class Job:
  """One validated request of a generate() call."""

  index: int  # position in the call's request list
  request_id: str | int | None
  prompt: Prompt
  sampling: SamplingParams


class Outputs(list):
  """A job's outputs in request order (None: not run yet); records failures per on_error."""

  def __init__(self, n: int, on_error: str):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    super().__init__([None] * n)
    self.on_error = on_error

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
