"""Routing groups of requests over engine replicas (sparsex_jax/batch/routing.py), a pure
function: every group placed once, loads within the documented bound, affinity kept where load
allows, round-robin as the cache-blind baseline; and the units the job plan gives it."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsex_jax.batch.plan import plan_groups
from sparsex_jax.batch.routing import Group, group_cost, route

SEGMENTS = [f"s{i}" for i in range(8)]


@st.composite
def jobs(draw, max_groups=24):
  """Groups over a few shared segments (some groups read none), segment sizes, replicas."""
  tokens = {k: draw(st.integers(0, 400)) for k in SEGMENTS}
  n = draw(st.integers(0, max_groups))
  groups = [Group((i,), frozenset(draw(st.sets(st.sampled_from(SEGMENTS), max_size=3))),
                  draw(st.integers(0, 300))) for i in range(n)]
  return groups, tokens, draw(st.integers(1, 5))


def _replay(groups, tokens, routing, n):
  """Each replica's load and segments recomputed from its groups alone."""
  loads, held = [0] * n, [set() for _ in range(n)]
  for r, gs in enumerate(routing.replicas):
    for g in gs:
      loads[r] += group_cost(groups[g], tokens, held[r])
      held[r] |= groups[g].segments
  return loads, held


@settings(max_examples=150, deadline=None)
@given(jobs(), st.sampled_from([0.0, 0.1, 0.5]))
def test_every_group_once_and_loads_within_the_bound(job, slack):
  groups, tokens, n = job
  r = route(groups, tokens, n, slack=slack)
  placed = sorted(g for gs in r.replicas for g in gs)
  assert placed == list(range(len(groups)))  # every group exactly once
  assert all(gs == sorted(gs) for gs in r.replicas)  # in the job's order
  loads, held = _replay(groups, tokens, r, n)
  assert r.loads == loads and r.segments == held  # what the routing says it costs
  # No replica ends more than the slack (a share of the mean load) plus the largest group's full
  # cost above another.
  total = sum(g.tokens for g in groups) + sum(tokens[k] for k in set().union(
      *(g.segments for g in groups)))
  largest = max((group_cost(g, tokens) for g in groups), default=0)
  assert max(loads) - min(loads) <= slack * total / n + largest
  # A segment computed on k replicas is counted k - 1 times.
  assert r.duplicated == sum(len(h) for h in held) - len(set().union(*held))
  assert r.duplicated_tokens(tokens) == sum(tokens[k] * (sum(k in h for h in held) - 1)
                                            for k in set().union(*held))


@settings(max_examples=150, deadline=None)
@given(jobs())
def test_with_room_to_spare_a_group_goes_where_its_segments_are(job):
  """With an unbounded slack, a group whose segments one replica already holds all of goes to
  such a replica, so it computes none of them again; groups that read one segment each (the
  requests of one passage) never compute a segment twice."""
  groups, tokens, n = job
  r = route(groups, tokens, n, slack=math.inf)
  where = r.replica_of()
  held = [set() for _ in range(n)]
  order = sorted(range(len(groups)), key=lambda g: (-group_cost(groups[g], tokens), g))
  for g in order:  # the documented order: largest first
    if groups[g].segments and any(groups[g].segments <= h for h in held):
      assert groups[g].segments <= held[where[g]]
    held[where[g]] |= groups[g].segments
  single = [Group(g.requests, frozenset(sorted(g.segments)[:1]), g.tokens) for g in groups]
  assert route(single, tokens, n, slack=math.inf).duplicated == 0


@settings(max_examples=50, deadline=None)
@given(jobs())
def test_round_robin_deals_groups_in_order(job):
  groups, tokens, n = job
  r = route(groups, tokens, n, policy="round_robin")
  assert r.replica_of() == {g: g % n for g in range(len(groups))}


def test_one_passage_per_group_is_computed_once_and_the_load_is_shared():
  # Six passages of 100 tokens, each read by a group of 50 own tokens, and a system prompt of 10
  # every group reads: two replicas take three passages each and the system prompt once each.
  tokens = {"sys": 10} | {f"p{i}": 100 for i in range(6)}
  groups = [Group((i,), frozenset({"sys", f"p{i}"}), 50) for i in range(6)]
  r = route(groups, tokens, 2)
  assert sorted(len(gs) for gs in r.replicas) == [3, 3]
  assert r.duplicated == 1 and r.duplicated_tokens(tokens) == 10  # only the system prompt
  assert r.loads == [10 + 3 * 150] * 2
  rr = route([Group((i,), frozenset({"sys", f"p{i % 3}"}), 50) for i in range(6)], tokens, 2,
             policy="round_robin")
  assert rr.duplicated == 1 + 3  # every passage on both replicas


def test_bad_arguments_are_refused():
  g = [Group((0,), frozenset({"a"}), 1)]
  with pytest.raises(ValueError, match="n_replicas"):
    route(g, {"a": 1}, 0)
  with pytest.raises(ValueError, match="policy"):
    route(g, {"a": 1}, 2, policy="random")
  with pytest.raises(ValueError, match="slack"):
    route(g, {"a": 1}, 2, slack=-1)
  with pytest.raises(ValueError, match="segment_tokens lacks"):
    route(g, {}, 2)
  with pytest.raises(ValueError, match="one entry per replica"):
    route(g, {"a": 1}, 2, loads=[0])


def test_plan_groups_are_the_units_plan_job_keeps_together():
  keys = [["s", "a", "x"], ["s", "b"], ["s", "a", "y"], ["c"], ["s", "b", "y"], ["s", "a"]]
  # alone: by most specific shared segment (a: 0, 5; b: 1, 4; y: 2), in plan_job's order;
  # context: whole components; off: one request each.
  assert plan_groups(keys, "alone", True) == [[0, 5], [1, 4], [2], [3]]
  assert plan_groups(keys, "context", True) == [[0, 1, 2, 4, 5], [3]]
  assert plan_groups(keys, "alone", False) == [[0, 1, 2, 4, 5], [3]]
  assert plan_groups(keys, "off", True) == [[i] for i in range(6)]
