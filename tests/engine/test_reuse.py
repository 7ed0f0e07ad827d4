"""Reuse methods: each validates its own fields, resolves per model depth, and selects on the host."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sparsex_jax as sx
from models.config import get_config
from sparsex_jax import reuse
from sparsex_jax.labels import EXACT, NEW, REUSED
from sparsex_jax.planner import RequestPlan
from sparsex_jax.reuse import ReuseConfig
from sparsex_jax.reuse.baselines import DeviationScore
from sparsex_jax.reuse.sparsex import AttentionMass, AttentionTimesDeviation


@pytest.mark.parametrize("ratio,n,want", [(0.15, 100, 15), (0.15, 101, 16), (0.0, 50, 0),
                                          (1.0, 7, 7), (0.5, 3, 2)])
def test_n_to_select_is_ceil_of_ratio(ratio, n, want):
  assert reuse.n_to_select(ratio, n, n) == want
  assert reuse.n_to_select(ratio, n, 1) == min(want, 1)  # capped by the candidates


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
  sel = sx.Epic(recompute_ratio=0.3).select(plan, 0)
  # ceil(0.3 * 10) = 3 from segment 1, ceil(0.3 * 5) = 2 from segment 3
  assert sel.n_select == 5 and list(np.flatnonzero(sel.given_score)) == [4, 5, 6, 17, 18]


def test_sparsex_forces_the_first_tokens_of_every_reused_segment():
  labels = [EXACT] * 4 + [REUSED] * 10 + [NEW] * 3 + [REUSED] * 5
  plan = _plan(labels, [0] * 4 + [1] * 10 + [2] * 3 + [3] * 5)
  sel = sx.SparseX(recompute_ratio=0.3, segment_heads=2).select(plan, 4)
  assert sel.n_select == 5  # ceil(0.3 * 15)
  assert list(np.flatnonzero(sel.forced)) == [4, 5, 17, 18]
  # 4 heads in a budget of 3: each segment keeps its first token (not the first segment both and
  # the last one, nearest the new tokens, one)
  sel = sx.SparseX(recompute_ratio=0.2, segment_heads=2).select(plan, 4)
  assert sel.n_select == 3 and list(np.flatnonzero(sel.forced)) == [4, 17]
  assert sx.SparseX(segment_heads=0, context_heads=0).select(plan, 4).forced is None
  # segments computed in context (old positions > 0) get context_heads, the others segment_heads
  moved = dataclasses.replace(plan, old_positions=np.where(np.arange(plan.n) >= 17, 40, 0)
                              .astype(np.int32))
  sel = sx.SparseX(recompute_ratio=0.5, segment_heads=1, context_heads=3).select(moved, 4)
  assert list(np.flatnonzero(sel.forced)) == [4, 17, 18, 19]
  assert sx.SparseXAttention(recompute_ratio=0.2).select(plan, 4).forced is None
  # The last prompt token is a Sparse-Q row: never forced, even at a segment's head.
  tail = _plan([REUSED] * 6 + [NEW] * 2 + [REUSED], [0] * 6 + [1] * 2 + [2])
  assert list(np.flatnonzero(sx.SparseX().select(tail, 4).forced)) == [0, 1]


@given(st.lists(st.integers(1, 12), min_size=1, max_size=8), st.integers(0, 9),
       st.floats(0.0, 1.0))
def test_segment_heads_fit_the_budget_and_spread_over_the_segments(lengths, heads, ratio):
  """Property: the forced set fits the budget; every segment keeps its first min(h, length)
  tokens for one h <= segment_heads, the largest h that fits."""
  labels, segs = [], []
  for i, n in enumerate(lengths):
    labels += [REUSED] * n + [NEW]
    segs += [2 * i] * n + [2 * i + 1]
  plan = _plan(labels, segs)
  sel = sx.SparseX(recompute_ratio=ratio, segment_heads=heads, context_heads=heads).select(plan, 4)
  if not heads:
    assert sel.forced is None
    return
  kept = [int(sel.forced[plan.segment_ids == 2 * i].sum()) for i in range(len(lengths))]
  h = max(kept)
  assert sum(kept) <= sel.n_select and h <= heads
  assert kept == [min(h, n) for n in lengths]
  for i, n in enumerate(lengths):  # the first tokens of the segment
    idx = np.flatnonzero(plan.segment_ids == 2 * i)
    assert sel.forced[idx[:kept[i]]].all() and not sel.forced[idx[kept[i]:]].any()
  more = sum(min(h + 1, n) for n in lengths)
  if h < heads and more > sum(kept):  # one more head each (where a segment has one) would not fit
    assert more > sel.n_select


def test_default_thresholds_by_method_and_depth():
  deep, shallow = get_config("smollm2-135m"), get_config("tiny")  # 30 and 3 layers
  t = lambda method, cfg=deep: method.resolve(cfg).layer_threshold  # noqa: E731
  assert t(sx.SparseX()) == t(sx.SparseXAttention()) == reuse.DEFAULT_LAYER_THRESHOLD == 4
  assert t(sx.SparseX(), shallow) == 3  # capped for a shallow model
  assert t(sx.Random()) == reuse.DEFAULT_LAYER_THRESHOLD
  assert t(sx.CacheBlend(layer_threshold=3)) == 3
  assert t(sx.Epic()) == t(sx.Naive()) == 0
  assert t(sx.Full()) == t(sx.Prefix()) == 30
  with pytest.raises(ValueError, match="layer_threshold"):
    sx.SparseX(layer_threshold=5).resolve(shallow)  # an explicit value is not capped


def test_each_method_resolves_to_its_scorer_and_caches():
  cfg = get_config("smollm2-135m")
  want = {"full": (None, False, False), "prefix": (None, True, False),
          "naive": (None, True, True), "cacheblend": (DeviationScore(), True, True),
          "epic": (None, True, True), "random": (None, True, True),
          "sparsex": (AttentionTimesDeviation(read_layer_t=True), True, True),
          "sparsex-attention": (AttentionMass(), True, True),
          "sparsex-paper": (AttentionMass(), True, True)}
  assert set(want) == set(reuse.REUSE_MODES)
  for mode, (scorer, prefix, segments) in want.items():
    fields = {} if mode in ("full", "prefix", "naive") else {"recompute_ratio": 0.2}
    p = ReuseConfig(mode, **fields).resolve(cfg)
    assert p.scorer == scorer, mode
    assert p.mode == mode and type(p.method) is reuse.METHODS[mode]
    assert (p.reads_prefix_cache, p.reads_segment_cache) == (prefix, segments), mode
    assert (p.writes_prefix_cache, p.writes_segment_cache) == (prefix, segments), mode
  # The default's reading by T: attention alone at T = 0 (no deviation exists), layer T - 1
  # alone at T = 1, layers T - 1 and T from T = 2.
  scorer = lambda t: sx.SparseX(layer_threshold=t).resolve(cfg).scorer  # noqa: E731
  assert scorer(0) == AttentionMass()
  assert scorer(1) == AttentionTimesDeviation(read_layer_t=False)
  assert scorer(2) == scorer(8) == AttentionTimesDeviation(read_layer_t=True)
  assert scorer(30) is None  # T = L: every token in full, nothing to score
  assert sx.Naive().resolve(cfg).recompute_ratio == 0.0
  quiet = sx.SparseX(read_caches=False, update_caches=False).resolve(cfg)
  assert not (quiet.reads_prefix_cache or quiet.reads_segment_cache
              or quiet.writes_prefix_cache or quiet.writes_segment_cache)


@pytest.mark.parametrize("mode,kw,match", [
    ("random", dict(seed=-5), "seed"), ("random", dict(seed=2**32), "seed"),
    ("random", dict(seed=1.5), "seed"),
    ("sparsex", dict(recompute_ratio=float("nan")), "recompute_ratio"),
    ("epic", dict(recompute_ratio="0.1"), "recompute_ratio"),
    ("sparsex-attention", dict(layer_threshold=1.5), "layer_threshold"),
    ("naive", dict(layer_threshold=-1), "layer_threshold"),
    ("full", dict(update_caches="no"), "update_caches"),
    ("cacheblend", dict(layer_threshold=0), "check layer"),
    ("sparsex", dict(segment_heads=-1), "segment_heads"),
    ("sparsex", dict(context_heads=2.5), "context_heads"),
    # a field of another method is an error that names the method's own fields
    ("epic", dict(layer_threshold=2), r"'epic' takes \['read_caches', 'recompute_ratio'"),
    ("cacheblend", dict(segment_heads=2), "cacheblend"),
    ("full", dict(recompute_ratio=0.1), "full"),
    ("sparsex", dict(rescore_layer=2), "rescore_layer"),
])
def test_bad_config_values_are_named(mode, kw, match):
  with pytest.raises(ValueError, match=match):
    ReuseConfig(mode, **kw)


def test_unknown_mode_names_the_modes():
  with pytest.raises(ValueError, match="unknown reuse mode 'blend'.*sparsex-attention"):
    ReuseConfig("blend")


def test_methods_are_hashable_and_replaceable():
  a = sx.SparseX(recompute_ratio=0.3)
  assert hash(a) == hash(sx.SparseX(recompute_ratio=0.3)) and a != sx.SparseXAttention(0.3)
  b = dataclasses.replace(a, layer_threshold=2, update_caches=False)
  assert (b.recompute_ratio, b.layer_threshold, b.update_caches) == (0.3, 2, False)
  assert a.as_record() == {"mode": "sparsex", "read_caches": True, "update_caches": True,
                           "recompute_ratio": 0.3, "layer_threshold": None, "segment_heads": 2,
                           "context_heads": 8}
  assert sx.Full().ratio == 0.0 and a.ratio == 0.3


def test_random_scores_depend_on_seed_and_prompt_only():
  labels = [REUSED] * 30 + [NEW] * 2
  plan = _plan(labels, [0] * 30 + [1] * 2)
  a = sx.Random(recompute_ratio=0.5, seed=3).select(plan, 2).given_score
  assert np.array_equal(a, sx.Random(recompute_ratio=0.5, seed=3).select(
      _plan(labels, [0] * 32), 2).given_score)
  assert not np.array_equal(a, sx.Random(recompute_ratio=0.5, seed=4).select(plan, 2).given_score)
  assert a.shape == (32,) and a.dtype == np.float32 and len(np.unique(a)) == 32
  sel = ReuseConfig("random", recompute_ratio=0.5, seed=3).resolve(get_config("tiny")).select(plan)
  assert sel.n_select == 15 and np.array_equal(sel.given_score, a)


def test_selection_counts_per_method():
  labels = [EXACT] * 4 + [REUSED] * 20 + [NEW] * 3
  plan = _plan(labels, [0] * 4 + [1] * 20 + [2] * 3)
  cfg = get_config("tiny")
  for mode, want in (("sparsex", 5), ("sparsex-attention", 5), ("cacheblend", 5), ("random", 5),
                     ("sparsex-paper", 5 + 2),  # k + the overflow block after the new interval
                     ("epic", 5), ("naive", 0), ("full", 0)):
    fields = {} if mode in ("naive", "full") else {"recompute_ratio": 0.25}
    if mode == "sparsex-paper":
      fields["overflow_block"] = 2
    sel = ReuseConfig(mode, **fields).resolve(cfg).select(plan)
    assert sel.n_select == want, mode
    assert (sel.given_score is not None) == (mode in ("epic", "random")), mode


def test_paper_rule_overflow_blocks_hug_every_new_interval():
  """S_ov: the reused tokens within one block before and after each run of new tokens (an exact
  prefix starts none), whatever segment they belong to; forced on top of k."""
  labels = [EXACT] * 4 + [REUSED] * 10 + [NEW] * 3 + [REUSED] * 6 + [NEW] * 2
  plan = _plan(labels, [0] * 4 + [1] * 10 + [2] * 3 + [3] * 6 + [4] * 2)
  sel = sx.SparseXPaper(recompute_ratio=0.1, overflow_block=3).select(plan, 1)
  # before the first new run: 11, 12, 13; after it: 17, 18, 19; before the second: 20, 21, 22
  assert list(np.flatnonzero(sel.forced)) == [11, 12, 13, 17, 18, 19, 20, 21, 22]
  assert sel.n_select == 9 + 2  # + ceil(0.1 * 16)
  assert np.array_equal(sel.score_rows, plan.sparse_q)  # the prompt ends in new tokens: no tail
  off = sx.SparseXPaper(recompute_ratio=0.1, overflow_block=0).select(plan, 1)
  assert not off.forced.any() and off.n_select == 2


def test_paper_rule_tail_fallback_when_the_prompt_ends_in_a_reused_segment():
  labels = [REUSED] * 6 + [NEW] * 2 + [REUSED] * 12
  plan = _plan(labels, [0] * 6 + [1] * 2 + [2] * 12)
  sel = sx.SparseXPaper(recompute_ratio=0.2, overflow_block=1, tail_queries=5).select(plan, 1)
  tail = [15, 16, 17, 18, 19]  # the last 5 of the last reused segment
  assert list(np.flatnonzero(sel.score_rows)) == [6, 7] + tail  # new tokens + the tail queries
  # forced: the overflow (5 and 8) and the tail, but not the last token (a Sparse-Q row already)
  assert list(np.flatnonzero(sel.forced)) == [5, 8, 15, 16, 17, 18]
  assert sel.n_select == 6 + 4  # + ceil(0.2 * 18)
  short = sx.SparseXPaper(tail_queries=64).select(plan, 1)  # longer than the segment: all of it
  assert list(np.flatnonzero(short.score_rows)) == [6, 7] + list(range(8, 20))


@pytest.mark.parametrize("n_layers,want", [(3, 1), (30, 5), (32, 5), (36, 5), (64, 10)])
def test_paper_rule_threshold_is_a_fraction_of_the_depth(n_layers, want):
  """round(0.15 L), at least 1 (Qwen3-8B's 36 layers: 5, the paper's 5-7)."""
  cfg = get_config("tiny").replace(n_layers=n_layers)
  assert sx.SparseXPaper().resolve(cfg).layer_threshold == want
  assert sx.SparseXPaper(layer_fraction=0.2).resolve(cfg).layer_threshold == max(
      1, int(np.floor(0.2 * n_layers + 0.5)))
  assert sx.SparseXPaper(layer_threshold=2).resolve(cfg).layer_threshold == 2
  with pytest.raises(ValueError, match="layer_fraction"):
    sx.SparseXPaper(layer_fraction=0.0)
  with pytest.raises(ValueError, match="tail_queries"):
    sx.SparseXPaper(tail_queries=-1)


@given(st.lists(st.tuples(st.integers(1, 12), st.booleans()), min_size=1, max_size=8),
       st.integers(0, 4), st.integers(0, 9), st.floats(0.0, 1.0))
def test_heads_follow_where_each_segment_was_computed(segments, alone_heads, context_heads, ratio):
  """Property, segments cached alone and computed in context mixed: each keeps its first
  min(own, h, length) tokens (own: segment_heads if cached alone, context_heads if its first
  token's old position is > 0), h the largest cap that fits the budget."""
  labels, segs, old = [], [], []
  for i, (n, in_context) in enumerate(segments):
    labels += [REUSED] * n + [NEW]
    segs += [2 * i] * n + [2 * i + 1]
    old += list(range(100 * in_context, 100 * in_context + n)) + [0]
  plan = dataclasses.replace(_plan(labels, segs), old_positions=np.array(old, np.int32))
  sel = sx.SparseX(recompute_ratio=ratio, segment_heads=alone_heads,
                   context_heads=context_heads).select(plan, 4)
  own = [context_heads if in_context else alone_heads for _, in_context in segments]
  if not (alone_heads or context_heads):
    assert sel.forced is None
    return
  kept = [int(sel.forced[plan.segment_ids == 2 * i].sum()) for i in range(len(segments))]
  assert sum(kept) <= sel.n_select
  fits = [h for h in range(max(own) + 1)
          if sum(min(o, h, n) for o, (n, _) in zip(own, segments)) <= sel.n_select]
  h = max(fits)
  assert kept == [min(o, h, n) for o, (n, _) in zip(own, segments)]
  for i, k in enumerate(kept):  # the first tokens of each segment
    idx = np.flatnonzero(plan.segment_ids == 2 * i)
    assert sel.forced[idx[:k]].all() and not sel.forced[idx[k:]].any()
