"""Round 12's candidate rule (sparsex_jax/research/candidates.py) on the tiny random model: the
heads it forces follow where each segment's K/V were computed."""

import math

import numpy as np

import sparsex_jax as sx
from sparsex_jax.research.candidates import SparseXContextHeads
from tests.engine.test_engine import _engine, _ids


def test_context_heads_force_more_tokens_of_segments_computed_in_context():
  eng = _engine()
  alone, head, in_context = _ids(11, 1), _ids(7, 2), _ids(12, 3)
  eng.cache_segments([alone])  # computed from position 0
  eng.prefill_logits(sx.Request([sx.Segment(head), sx.Segment(in_context)]), sx.SparseX())
  new_a, new_b = _ids(4, 4), _ids(5, 5)
  request = sx.Request([sx.Segment(new_a, cache=False), sx.Segment(alone),
                        sx.Segment(in_context), sx.Segment(new_b, cache=False)])
  rule = SparseXContextHeads(recompute_ratio=0.5, layer_threshold=1, segment_heads=2,
                             context_heads=6)
  _, plan = eng.prefill_logits(request, rule, return_plan=True)
  start_alone, start_ctx = len(new_a), len(new_a) + len(alone)
  forced = list(range(start_alone, start_alone + 2)) + list(range(start_ctx, start_ctx + 6))
  reused = plan.reused_positions.tolist()
  assert set(range(start_alone, start_ctx + len(in_context))) == set(reused)
  k = math.ceil(0.5 * len(reused))
  score = dict(zip(reused, plan.scores))
  ranked = [p for p in sorted(score, key=lambda p: -score[p]) if p not in forced]
  np.testing.assert_array_equal(plan.selected_positions, sorted(forced + ranked[:k - len(forced)]))
