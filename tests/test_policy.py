"""Reuse policies: resolution per mode and model depth, selection counts, host-side scorers."""

import numpy as np
import pytest

from models.config import get_config
from sparsex_jax import policy
from sparsex_jax.planner import EXACT, NEW, REUSED, RequestPlan
from sparsex_jax.policy import ReuseConfig


@pytest.mark.parametrize("ratio,n,want", [(0.15, 100, 15), (0.15, 101, 16), (0.0, 50, 0),
                                          (1.0, 7, 7), (0.5, 3, 2)])
def test_n_to_select_is_ceil_of_ratio(ratio, n, want):
  assert policy.n_to_select(ratio, n, n) == want
  assert policy.n_to_select(ratio, n, 1) == min(want, 1)  # capped by the candidates


def _plan(labels, segment_ids):
  n = len(labels)
  return RequestPlan(token_ids=np.arange(n, dtype=np.int32), labels=np.array(labels, np.int8),
                     src_slots=np.zeros(n, np.int32), old_positions=np.zeros(n, np.int32),
                     segment_ids=np.array(segment_ids, np.int32),
                     page_table=np.zeros(1, np.int32), n_exact=int(np.sum(np.array(labels) == 0)))


def test_epic_takes_the_head_of_every_reused_segment_and_sparse_q_holds_last_token():
  labels = [EXACT] * 4 + [REUSED] * 10 + [NEW] * 3 + [REUSED] * 5
  segs = [0] * 4 + [1] * 10 + [2] * 3 + [3] * 5
  plan = _plan(labels, segs)
  assert plan.sparse_q[-1] and plan.sparse_q[14:17].all() and plan.sparse_q.sum() == 4
  heads = policy.SegmentHeads()
  scores, count = heads.host_scores(plan, 0.3), heads.n_select(plan, 0.3)
  # ceil(0.3 * 10) = 3 from segment 1, ceil(0.3 * 5) = 2 from segment 3
  assert count == 5 and list(np.flatnonzero(scores)) == [4, 5, 6, 17, 18]


def test_default_thresholds_by_mode_and_depth():
  from sparsex_jax.policy import DEFAULT_LAYER_THRESHOLD, ReuseConfig
  deep, shallow = get_config("smollm2-135m"), get_config("tiny")  # 30 and 3 layers
  t = lambda reuse, cfg=deep: reuse.resolve(cfg).layer_threshold
  assert t(ReuseConfig("sparsex")) == DEFAULT_LAYER_THRESHOLD
  assert t(ReuseConfig("sparsex"), shallow) == 3  # capped for a shallow model
  assert t(ReuseConfig("random")) == DEFAULT_LAYER_THRESHOLD
  assert t(ReuseConfig("cacheblend", check_layer=3)) == 3
  assert t(ReuseConfig("epic")) == t(ReuseConfig("naive")) == 0
  assert t(ReuseConfig("full")) == t(ReuseConfig("prefix")) == 30
  with pytest.raises(ValueError, match="layer_threshold"):
    ReuseConfig("sparsex", layer_threshold=5).resolve(shallow)  # an explicit value is not capped


def test_each_mode_resolves_to_its_scorer_and_caches():
  cfg = get_config("smollm2-135m")
  want = {"full": (policy.Scorer, False, False), "prefix": (policy.Scorer, True, False),
          "naive": (policy.Scorer, True, True), "cacheblend": (policy.KVDeviation, True, True),
          "epic": (policy.SegmentHeads, True, True), "random": (policy.RandomChoice, True, True),
          "sparsex": (policy.SparseQAttention, True, True)}
  for mode, (scorer, prefix, segments) in want.items():
    p = ReuseConfig(mode, recompute_ratio=0.2).resolve(cfg)
    assert type(p.scorer) is scorer, mode
    assert (p.reads_prefix_cache, p.reads_segment_cache) == (prefix, segments), mode
    assert p.recompute_ratio == (0.0 if mode == "naive" else 0.2)
  default = ReuseConfig("sparsex").resolve(cfg).scorer
  assert default == policy.SparseQAttention("last_and_threshold", "sum", deviation_weighted=True,
                                            segment_heads=2, deviation_norm=True,
                                            refresh_threshold_kv=True)
  # "auto" reads layer T - 1 alone at T <= 1 (the sum was measured worse there)
  at_one = ReuseConfig("sparsex", layer_threshold=1).resolve(cfg).scorer
  assert at_one == policy.SparseQAttention("last", "sum", deviation_weighted=True, segment_heads=2,
                                           deviation_norm=True, refresh_threshold_kv=True)
  sparsex = ReuseConfig("sparsex", importance_layers="sum", head_reduce="max").resolve(cfg)
  assert sparsex.scorer == policy.SparseQAttention("sum", "max", deviation_weighted=True,
                                                   segment_heads=2, deviation_norm=True,
                                                   refresh_threshold_kv=True)
  squared = ReuseConfig("sparsex", importance_signal="attention_x_deviation").resolve(cfg).scorer
  assert squared.deviation_weighted and not squared.deviation_norm
  paper = ReuseConfig("sparsex", importance_signal="attention", segment_heads=0,
                      importance_layers="last").resolve(cfg)
  assert paper.scorer == policy.SparseQAttention()  # the paper's rule, by its own name
  at_zero = ReuseConfig("sparsex", layer_threshold=0).resolve(cfg).scorer
  # T = 0: attention alone, and no deviation measured, so nothing to refresh
  assert not (at_zero.deviation_weighted or at_zero.deviation_norm or at_zero.refresh_threshold_kv)
  assert ReuseConfig("random", seed=9).resolve(cfg).scorer.seed == 9
  assert not ReuseConfig(update_caches=False).resolve(cfg).update_caches
  hash(sparsex)  # frozen: usable as a static argument


def test_rescoring_resolves_layer_and_kept_ratio():
  cfg = get_config("smollm2-135m")
  p = ReuseConfig("sparsex", recompute_ratio=0.3, layer_threshold=4, rescore_layer=10).resolve(cfg)
  assert (p.rescore_layer, p.rescore_ratio) == (10, 0.15)  # kept defaults to half of r
  p = ReuseConfig("sparsex", layer_threshold=4, rescore_layer=10, rescore_ratio=0.05).resolve(cfg)
  assert p.rescore_ratio == 0.05
  for r in (4, 30):
    with pytest.raises(ValueError, match="rescore_layer must be in"):
      ReuseConfig("sparsex", layer_threshold=4, rescore_layer=r).resolve(cfg)


@pytest.mark.parametrize("kw,match", [
    (dict(seed=-5), "seed"), (dict(seed=2**32), "seed"), (dict(seed=1.5), "seed"),
    (dict(recompute_ratio=float("nan")), "recompute_ratio"),
    (dict(recompute_ratio="0.1"), "recompute_ratio"), (dict(layer_threshold=1.5), "layer_threshold"),
    (dict(update_caches="no"), "update_caches"), (dict(check_layer=0), "check_layer"),
])
def test_bad_config_values_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    ReuseConfig("random", **kw)


def test_random_scores_depend_on_seed_and_prompt_only():
  labels = [REUSED] * 30 + [NEW] * 2
  plan = _plan(labels, [0] * 30 + [1] * 2)
  a = policy.RandomChoice(3).host_scores(plan, 0.5)
  assert np.array_equal(a, policy.RandomChoice(3).host_scores(_plan(labels, [0] * 32), 0.5))
  assert not np.array_equal(a, policy.RandomChoice(4).host_scores(plan, 0.5))
  assert a.shape == (32,) and a.dtype == np.float32 and len(np.unique(a)) == 32
  sel = ReuseConfig("random", recompute_ratio=0.5, seed=3).resolve(get_config("tiny")).select(plan)
  assert sel.n_select == 15 and np.array_equal(sel.given_score, a)


def test_selection_counts_per_policy():
  labels = [EXACT] * 4 + [REUSED] * 20 + [NEW] * 3
  plan = _plan(labels, [0] * 4 + [1] * 20 + [2] * 3)
  cfg = get_config("tiny")
  for mode, want in (("sparsex", 5), ("cacheblend", 5), ("random", 5), ("epic", 5),
                     ("naive", 0), ("full", 0)):
    sel = ReuseConfig(mode, recompute_ratio=0.25).resolve(cfg).select(plan)
    assert sel.n_select == want, mode
    assert (sel.given_score is not None) == (mode in ("epic", "random")), mode
  sel = ReuseConfig("sparsex", recompute_ratio=0.25, layer_threshold=1, rescore_layer=2,
                    rescore_ratio=0.1).resolve(cfg).select(plan)
  assert (sel.n_select, sel.n_keep) == (5, 2)
