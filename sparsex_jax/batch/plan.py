"""Planning a batch job: requests that share segments grouped so each is computed once."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

SHARED = ("alone", "context", "off")


@dataclasses.dataclass
class JobPlan:
  """The order a job runs in: `steps` are lists of indices into the job's lines, each run in
  batches after the previous one; `warm` is the set of shared segment keys that are computed alone
  just before the first batch that needs them (empty unless shared="alone")."""

  steps: list[list[int]]
  warm: set[str]


def plan_job(keys: Sequence[list[str]], batch_size: int, shared: str, reads_segments: bool,
             cached: Callable[[str], bool], count: dict[str, int] | None = None) -> JobPlan:
  """Orders a job so that requests sharing a segment run together and the segment is computed
  once, in the spirit of BatchLLM's global prefix sharing.

  keys[i]: the cacheable segment keys of request i; count: in how many requests of the whole job
  each key appears (default: counted over `keys`); a key in two or more is shared. Requests
  linked by shared segments form a component (union-find); components run in the order of their
  first request. Inside a component, requests are grouped by their most specific shared segment
  (the one in the fewest requests: the passage rather than the system prompt everyone has), so a
  passage's requests are adjacent and it need stay in the pool only while they run.
  - shared="alone" (with a mode that reads the segment cache): one step in that order; the runner
    computes a batch's shared segments alone at position 0 just before the batch, unless cached
    (so one evicted under pool pressure is computed again, identically). Every request sees the
    same cached KV whatever its batch or order: results do not depend on the batch size or on
    resuming.
  - shared="context": a segment is computed in context by the first request that has it (a
    "leader"); leaders run in rounds before the other requests, each after any earlier leader it
    shares a segment with, so no segment is computed twice. Components are packed into blocks of
    at least `batch_size` requests, each planned this way. Also what the prefix cache needs.
  - shared="off": input order.
  """
  n = len(keys)
  if shared == "off" or n == 0:
    return JobPlan([list(range(n))] if n else [], set())
  count = count if count is not None else _count(keys)
  shared_keys = {k for k, c in count.items() if c > 1}
  ordered = [sorted(comp, key=group) for comp, group in _components(keys, count)]  # stable
  if shared == "alone" and reads_segments:
    return JobPlan([[i for comp in ordered for i in comp]], shared_keys)

  blocks, block = [], []
  for comp in ordered:
    block.extend(comp)
    if len(block) >= batch_size:
      blocks.append(block)
      block = []
  if block:
    blocks.append(block)
  steps = []
  for block in blocks:
    claimed: dict[str, int] = {}  # segment -> round of the leader computing it
    rounds: dict[int, list[int]] = {}
    rest = []
    for i in block:
      mine = [k for k in keys[i] if k in shared_keys and not cached(k)]
      new = [k for k in mine if k not in claimed]
      if not new:
        rest.append(i)
        continue
      r = 1 + max((claimed[k] for k in mine if k in claimed), default=0)
      for k in new:
        claimed[k] = r
      rounds.setdefault(r, []).append(i)
    steps.extend(rounds[r] for r in sorted(rounds))
    if rest:
      steps.append(rest)
  return JobPlan(steps, set())


def plan_groups(keys: Sequence[list[str]], shared: str, reads_segments: bool,
                count: dict[str, int] | None = None) -> list[list[int]]:
  """The units a job can be split into (over engine replicas, batch/routing.py) without
  computing a shared segment more often than plan_job does, in plan_job's order:
  - shared="alone" (with a mode that reads the segment cache): the requests of each most specific
    shared segment (each request reads its segments computed alone, whoever computed them, so a
    unit needs only its own segments beside it);
  - shared="context" (or a mode that does not read the segment cache, e.g. the prefix cache):
    whole components (a leader's in-context segment is read by the rest of its component);
  - shared="off": one request each.
  """
  if shared not in SHARED:
    raise ValueError(f"shared must be one of {SHARED}, got {shared!r}")
  if shared == "off":
    return [[i] for i in range(len(keys))]
  count = count if count is not None else _count(keys)
  out = []
  for comp, group in _components(keys, count):
    if shared == "alone" and reads_segments:
      units: dict[int, list[int]] = {}
      for i in sorted(comp, key=group):
        units.setdefault(group(i), []).append(i)
      out.extend(units.values())
    else:
      out.append(comp)
  return out


def _count(keys: Sequence[list[str]]) -> dict[str, int]:
  """In how many requests each key appears."""
  count: dict[str, int] = {}
  for ks in keys:
    for k in set(ks):
      count[k] = count.get(k, 0) + 1
  return count


def _components(keys: Sequence[list[str]], count: dict[str, int]
                ) -> list[tuple[list[int], Callable[[int], int]]]:
  """Requests linked by shared segments (in two or more requests), as components (union-find) in
  the order of their first request, each in input order; with the function naming a request's
  group: the first request of its most specific shared segment (the one in the fewest requests;
  ties: the earlier), or itself if it has none."""
  n = len(keys)
  shared_keys = {k for k, c in count.items() if c > 1}
  parent = list(range(n))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  first_with: dict[str, int] = {}
  for i, ks in enumerate(keys):
    for k in ks:
      if k in shared_keys:
        if k in first_with:
          parent[find(i)] = find(first_with[k])
        else:
          first_with[k] = i
  components: dict[int, list[int]] = {}
  for i in range(n):
    components.setdefault(find(i), []).append(i)  # in input order; dicts keep first-line order

  def group(i):
    mine = [k for k in keys[i] if k in shared_keys]
    return min(((count[k], first_with[k]) for k in mine), default=(0, i))[1]

  return [(comp, group) for comp in components.values()]
