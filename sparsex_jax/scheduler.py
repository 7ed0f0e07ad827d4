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


def batches(store: KVStore, jobs: Sequence[Job], policy: ReusePolicy, max_batch_size: int,
            outputs: Outputs, prepare: Callable[[list[Job]], object] | None = None
            ) -> Iterator[tuple[list[Job], Leases]]:
  """Batches that fit the pool, with their leases (release them with `with`). `prepare(chunk)`
  runs before a chunk's lookups (the engine loads its segments from a disk cache there)."""
  i = 0
  while i < len(jobs):
    size = min(max_batch_size, len(jobs) - i)
    while True:
      chunk = list(jobs[i:i + size])
      if prepare is not None:
        prepare(chunk)
      try:
        leases = store.acquire([j.prompt for j in chunk], policy,
                               [j.sampling.max_new_tokens for j in chunk])
        break
      except (PoolExhausted, ValueError) as e:
        if size > 1:
          size //= 2
          continue
        outputs.fail(chunk[0].index, chunk[0].request_id, e)
        leases = None
        break
    if leases is not None:
      yield chunk, leases
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
