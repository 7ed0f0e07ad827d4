"""Round 12's candidate rule (sparsex_jax/research/candidates.py) on the tiny random model: the
heads it forces follow where each segment's K/V were computed."""

import math

import numpy as np

import sparsex_jax as sx
from sparsex_jax.research.candidates import SparseXContextHeads
from tests.engine.test_engine import _engine, _ids


def _setup(alone_first=True):
  eng = _engine()
  alone, head, in_context = _ids(11, 1), _ids(7, 2), _ids(12, 3)
  eng.cache_segments([alone])  # computed from position 0
  eng.prefill_logits(sx.Request([sx.Segment(head), sx.Segment(in_context)]), sx.SparseX())
  new_a, new_b = _ids(4, 4), _ids(5, 5)
  middle = [sx.Segment(alone), sx.Segment(in_context)]
  request = sx.Request([sx.Segment(new_a, cache=False)] + middle[::1 if alone_first else -1]
                       + [sx.Segment(new_b, cache=False)])
  return eng, request, len(new_a), len(alone), len(in_context)


def test_context_heads_force_more_tokens_of_segments_computed_in_context():
  eng, request, n_new_a, n_alone, n_in_context = _setup()
  rule = SparseXContextHeads(recompute_ratio=0.5, layer_threshold=1, segment_heads=2,
                             context_heads=6)
  _, plan = eng.prefill_logits(request, rule, return_plan=True)
  start_alone, start_ctx = n_new_a, n_new_a + n_alone
  forced = list(range(start_alone, start_alone + 2)) + list(range(start_ctx, start_ctx + 6))
  reused = plan.reused_positions.tolist()
  assert set(range(start_alone, start_ctx + n_in_context)) == set(reused)
  k = math.ceil(0.5 * len(reused))
  score = dict(zip(reused, plan.scores))
  ranked = [p for p in sorted(score, key=lambda p: -score[p]) if p not in forced]
  np.testing.assert_array_equal(plan.selected_positions, sorted(forced + ranked[:k - len(forced)]))


def test_heads_that_overflow_the_budget_are_cut_evenly_in_the_engine():
  """6 + 2 heads in a budget of 6 (r = 0.25 of 23 reused tokens), the segment computed in context
  first: each segment keeps its first 4 at most (the one cached alone its 2), where a cut by
  position would give the first segment its 6 and the second, nearer the new tokens, none."""
  eng, request, n_new_a, _, n_in_context = _setup(alone_first=False)
  rule = SparseXContextHeads(recompute_ratio=0.25, layer_threshold=1, segment_heads=2,
                             context_heads=6)
  _, plan = eng.prefill_logits(request, rule, return_plan=True)
  assert math.ceil(0.25 * len(plan.reused_positions)) == 6
  start_ctx, start_alone = n_new_a, n_new_a + n_in_context
  want = list(range(start_ctx, start_ctx + 4)) + list(range(start_alone, start_alone + 2))
  np.testing.assert_array_equal(plan.selected_positions, want)
