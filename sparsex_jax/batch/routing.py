"""Which replica runs which requests: cache affinity weighed against load. Pure (no Ray, no jax).

The units routed are groups of requests that read the same shared segments
(`plan.plan_groups`). A replica computes each shared segment its groups read once, so sending
the requests of one passage to one replica computes the passage once; spreading them computes it
on every replica they reach. Against that, every replica should finish at about the same time.

Load is counted in tokens a replica computes: each group's own tokens (its requests' prompt
tokens outside shared segments, plus the tokens they generate) and each shared segment once per
replica that needs it (a segment already in the cache dir costs nothing: give it 0 tokens, any
replica loads it).

Policies:
- "affinity" (the default; the trade-off DualMap makes between cache affinity and load): groups
  in decreasing order of cost, each to the replica that holds the most of its shared segments'
  tokens (ties: the most of its segments, then the one it would leave least loaded), unless that
  would leave that replica more than `slack` x the mean load above the replica that would end
  least loaded with it: then to that one, which computes the segments again (counted in
  `Routing.duplicated`). Bound: no replica's load exceeds another's by more than the slack plus
  the largest group's cost.
- "round_robin": group i to replica i % n, blind to segments and load (the baseline; given one
  group per request, it is what a cache-blind data-parallel router does).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from sparsex_jax.validation import is_int, is_real

ROUTING = ("affinity", "round_robin")
# Default slack: a replica may end up to 10% of the mean load above the least loaded one to keep
# a group beside its segments (two replicas: at least about 2 / 1.1 = 1.8x one replica's speed
# when the groups are small against the job).
SLACK = 0.1


@dataclasses.dataclass(frozen=True)
class Group:
  """Requests routed together: indices into the job, the shared segments they read, and the
  tokens they compute besides those segments."""

  requests: tuple[int, ...]
  segments: frozenset[str] = frozenset()
  tokens: int = 0


@dataclasses.dataclass
class Routing:
  """Where each group goes: `replicas[r]` lists the groups of replica r (indices into the groups
  routed, in their given order); `loads[r]` the tokens r computes; `segments[r]` the shared
  segments it computes."""

  replicas: list[list[int]]
  loads: list[int]
  segments: list[set[str]]

  def replica_of(self) -> dict[int, int]:
    """group -> replica."""
    return {g: r for r, gs in enumerate(self.replicas) for g in gs}

  @property
  def duplicated(self) -> int:
    """Extra computations of shared segments: a segment computed on k replicas counts k - 1."""
    counts: dict[str, int] = {}
    for held in self.segments:
      for k in held:
        counts[k] = counts.get(k, 0) + 1
    return sum(c - 1 for c in counts.values())

  def duplicated_tokens(self, segment_tokens: Mapping[str, int]) -> int:
    seen: set[str] = set()
    extra = 0
    for held in self.segments:
      for k in held:
        if k in seen:
          extra += segment_tokens[k]
        seen.add(k)
    return extra


def group_cost(group: Group, segment_tokens: Mapping[str, int],
               held: set[str] | frozenset[str] = frozenset()) -> int:
  """Tokens `group` adds to a replica that already holds the segments `held`."""
  return group.tokens + sum(segment_tokens[k] for k in group.segments - held)


def route(groups: Sequence[Group], segment_tokens: Mapping[str, int], n_replicas: int, *,
          policy: str = "affinity", slack: float = SLACK,
          loads: Sequence[int] | None = None,
          held: Sequence[set[str]] | None = None) -> Routing:
  """Routes `groups` over `n_replicas` replicas (see the module docstring).

  segment_tokens: the tokens of every shared segment a group reads (0 for one on disk).
  loads, held: the replicas' loads and segments so far (default: none), e.g. when the requests
  of a replica that died are routed over the others.
  """
  if not is_int(n_replicas) or n_replicas < 1:
    raise ValueError(f"n_replicas must be an int >= 1, got {n_replicas!r}")
  if policy not in ROUTING:
    raise ValueError(f"routing policy must be one of {ROUTING}, got {policy!r}")
  if not is_real(slack) or not slack >= 0:  # NaN fails too
    raise ValueError(f"slack must be a number >= 0, got {slack!r}")
  missing = {k for g in groups for k in g.segments} - set(segment_tokens)
  if missing:
    raise ValueError(f"segment_tokens lacks {len(missing)} segment(s) the groups read, e.g. "
                     f"{sorted(missing)[0]!r}")
  load = list(loads) if loads is not None else [0] * n_replicas
  have = [set(h) for h in held] if held is not None else [set() for _ in range(n_replicas)]
  if len(load) != n_replicas or len(have) != n_replicas:
    raise ValueError(f"loads and held need one entry per replica ({n_replicas})")
  out = Routing([[] for _ in range(n_replicas)], load, have)

  def place(g: int, r: int) -> None:
    out.loads[r] += group_cost(groups[g], segment_tokens, out.segments[r])
    out.segments[r] |= groups[g].segments
    out.replicas[r].append(g)

  if policy == "round_robin":
    for g in range(len(groups)):
      place(g, g % n_replicas)
    return out

  full = [group_cost(g, segment_tokens) for g in groups]
  # The job's load: each group's own tokens, each segment once. The slack is a share of its mean.
  total = sum(g.tokens for g in groups) + sum(
      segment_tokens[k] for k in set().union(*(g.segments for g in groups)))
  allowance = slack * total / n_replicas
  for g in sorted(range(len(groups)), key=lambda g: (-full[g], g)):  # largest first (LPT)
    segs = groups[g].segments
    after = [out.loads[r] + group_cost(groups[g], segment_tokens, out.segments[r])
             for r in range(n_replicas)]
    # Most shared tokens, then most shared segments (one on disk costs no tokens, but a replica
    # that has it loaded need not load it again).
    overlap = [(sum(segment_tokens[k] for k in segs & out.segments[r]), len(segs & out.segments[r]))
               for r in range(n_replicas)]
    best = min(range(n_replicas), key=lambda r: (-overlap[r][0], -overlap[r][1], after[r], r))
    least = min(range(n_replicas), key=lambda r: (after[r], r))
    place(g, best if after[best] <= after[least] + allowance else least)
  for gs in out.replicas:
    gs.sort()  # each replica runs its groups in the job's order (the plan's locality)
  return out
