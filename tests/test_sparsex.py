"""SparseX prefill: the limits that must hold (DESIGN.md section 2) on a tiny random model."""

import math

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from models import llama
from tests.test_engine import CFG, PARAMS, _engine, _full_logits, _ids, _rel

DOC_A, DOC_B, DOC_C = _ids(13, 21), _ids(22, 22), _ids(9, 23)
SYSTEM, QUESTION = _ids(12, 24), _ids(6, 25)
PAPER = dict(importance_signal="attention", segment_heads=0)  # the paper's selection rule


def _request():
  """System prompt (exact after the first request), reused docs interleaved with new text."""
  return sx.Request([sx.Segment(SYSTEM), sx.Segment(DOC_B), sx.Segment(_ids(5, 26), cache=False),
                     sx.Segment(DOC_A), sx.Segment(DOC_C), sx.Segment(QUESTION, cache=False)])


def _full_ids():
  return SYSTEM + DOC_B + _ids(5, 26) + DOC_A + DOC_C + QUESTION


@pytest.fixture()
def warm_engine():
  """Docs cached alone; the system prompt cached as an exact prefix."""
  eng = _engine()
  eng.cache_segments([DOC_A, DOC_B, DOC_C])
  eng.prefill_logits(sx.Request([sx.Segment(SYSTEM, cache=False), sx.Segment(_ids(3, 1))]),
                     reuse=sx.ReuseConfig("prefix"))
  return eng


@pytest.mark.parametrize("reuse", [
    sx.ReuseConfig("sparsex", layer_threshold=CFG.n_layers, recompute_ratio=0.1),
    sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=1.0),
    sx.ReuseConfig("sparsex", layer_threshold=0, recompute_ratio=1.0),
    sx.ReuseConfig("cacheblend", recompute_ratio=1.0),
    sx.ReuseConfig("epic", recompute_ratio=1.0),
    sx.ReuseConfig("random", recompute_ratio=1.0),
], ids=["T=L", "r=1", "T=0,r=1", "cacheblend-r=1", "epic-r=1", "random-r=1"])
def test_full_recompute_limits_equal_full_prefill(warm_engine, reuse):
  logits, plan = warm_engine.prefill_logits(_request(), reuse=reuse, return_plan=True)
  assert plan.reused_positions.size == len(DOC_A) + len(DOC_B) + len(DOC_C)
  assert np.sum(plan.labels == 0) == 12 - 12 % 4  # exact prefix pages
  assert _rel(logits, _full_logits(_full_ids())) < 1e-4


def test_threshold_zero_ratio_zero_is_naive(warm_engine):
  naive = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig("naive"))
  zero = warm_engine.prefill_logits(
      _request(), reuse=sx.ReuseConfig("sparsex", layer_threshold=0, recompute_ratio=0.0))
  np.testing.assert_allclose(zero, naive, rtol=1e-6, atol=1e-6)
  assert _rel(naive, _full_logits(_full_ids())) > 1e-3  # naive reuse really is approximate


def test_only_exact_hits_equal_prefix_cache(warm_engine):
  req = sx.Request([sx.Segment(SYSTEM), sx.Segment(_ids(2, 5), cache=False)])
  prefix, p_plan = warm_engine.prefill_logits(req, reuse=sx.ReuseConfig("prefix"),
                                              return_plan=True)
  sparse, s_plan = warm_engine.prefill_logits(req, reuse=sx.ReuseConfig("sparsex"),
                                              return_plan=True)
  np.testing.assert_array_equal(sparse, prefix)
  assert np.sum(s_plan.labels == 0) == 12 and s_plan.reused_positions.size == 0
  assert s_plan.selected_positions.size == 0


def _layer0_importance_reference(ids, n_exact, sparse_q):
  """Explicit float64 softmax of the Sparse-Q rows at layer 0 (all keys fresh at T = 1)."""
  p = jax.tree.map(lambda w: np.asarray(w[0], np.float64), PARAMS["layers"]["attn_in"])
  x = np.asarray(PARAMS["embed"], np.float64)[ids]
  h = x / np.sqrt((x * x).mean(-1, keepdims=True) + CFG.norm_eps) * p["norm"]
  pos = np.arange(len(ids))
  inv = CFG.rope_theta ** (-np.arange(0, CFG.head_dim, 2) / CFG.head_dim)
  ang = pos[:, None] * inv
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

  def rope(t):
    a, b = np.split(t, 2, -1)
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)

  q = rope(np.einsum("td,dnh->tnh", h, p["wq"]))
  k = rope(np.einsum("td,dkh->tkh", h, p["wk"]))
  g = CFG.n_heads // CFG.n_kv_heads
  score = np.zeros(len(ids))
  for n in range(CFG.n_heads):
    s = q[:, n] @ k[:, n // g].T / math.sqrt(CFG.head_dim)
    s = np.where(pos[None, :] <= pos[:, None], s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    score += prob[sparse_q].sum(0)
  return score


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5])
def test_importance_matches_dense_reference_and_topk_count(warm_engine, ratio):
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=ratio, **PAPER)
  _, plan = warm_engine.prefill_logits(_request(), reuse=reuse, return_plan=True)
  ids = np.asarray(_full_ids())
  want = _layer0_importance_reference(ids, 12, plan.sparse_q)
  if ratio > 0:
    np.testing.assert_allclose(plan.scores, want[plan.reused_positions], rtol=2e-4, atol=1e-6)
  n_reused = plan.reused_positions.size
  assert plan.selected_positions.size == math.ceil(ratio * n_reused)
  assert set(plan.selected_positions) <= set(plan.reused_positions)
  if ratio > 0:  # the selected tokens are the top-scoring ones
    cut = np.sort(want[plan.reused_positions])[::-1][plan.selected_positions.size - 1]
    assert np.all(want[plan.selected_positions] >= cut - 1e-6)


def test_sum_over_layers_and_max_heads_options(warm_engine):
  base = dict(layer_threshold=CFG.n_layers - 1, recompute_ratio=0.3)
  outs = {}
  for layers in ("last", "sum"):
    for heads in ("sum", "max"):
      reuse = sx.ReuseConfig("sparsex", importance_layers=layers, head_reduce=heads, **base,
                             **PAPER)
      logits, plan = warm_engine.prefill_logits(_request(), reuse=reuse, return_plan=True)
      outs[layers, heads] = plan.scores
      assert np.all(np.isfinite(logits)) and np.all(plan.scores >= 0)
  # summing over 2 full layers is at least the last layer's share; max over heads <= sum
  assert np.all(outs["sum", "sum"] >= outs["last", "sum"] - 1e-6)
  assert np.all(outs["last", "max"] <= outs["last", "sum"] + 1e-6)
  assert not np.allclose(outs["sum", "sum"], outs["last", "sum"])


def test_recompute_ratio_moves_towards_full(warm_engine):
  full = _full_logits(_full_ids())
  errs = [_rel(warm_engine.prefill_logits(
      _request(), reuse=sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=r)), full)
          for r in (0.0, 0.5, 1.0)]
  assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4


def test_epic_selects_first_tokens_of_each_segment(warm_engine):
  _, plan = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig("epic", recompute_ratio=0.2),
                                       return_plan=True)
  starts = {12: len(DOC_B), 12 + 22 + 5: len(DOC_A), 12 + 22 + 5 + 13: len(DOC_C)}
  want = sorted(s + i for s, n in starts.items() for i in range(math.ceil(0.2 * n)))
  np.testing.assert_array_equal(plan.selected_positions, want)


def test_batch_of_mixed_requests_matches_one_by_one(warm_engine):
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3)
  reqs = [_request(), sx.Request([sx.Segment(DOC_C), sx.Segment(QUESTION, cache=False)]),
          sx.Request([sx.Segment(_ids(7, 3), cache=False), sx.Segment(DOC_A)])]
  sp = sx.SamplingParams(max_new_tokens=4, ignore_eos=True)
  batched = warm_engine.generate(reqs, sp, reuse=reuse)
  single = [warm_engine.generate([r], sp, reuse=reuse)[0] for r in reqs]
  assert [o.token_ids for o in batched] == [o.token_ids for o in single]
  assert [o.stats.n_recomputed for o in batched] == [o.stats.n_recomputed for o in single]


def test_decode_after_sparsex_prefill_continues_from_corrected_pool(warm_engine):
  sp = sx.SamplingParams(max_new_tokens=6, ignore_eos=True)
  exact = warm_engine.generate([_request()], sp, reuse=sx.ReuseConfig(
      "sparsex", layer_threshold=1, recompute_ratio=1.0))[0]
  full = sx.Engine(CFG, PARAMS, page_size=4, num_pages=64).generate(
      [sx.Request([sx.Segment(_full_ids())])], sp, reuse=sx.ReuseConfig("full"))[0]
  assert exact.token_ids == full.token_ids
  # the decode steps' logits match the full forward over prompt + generated tokens
  ids = _full_ids() + full.token_ids[:-1]
  want = np.asarray(llama.forward(PARAMS, CFG, np.asarray(ids)[None]))[0]
  assert list(want[len(_full_ids()) - 1:].argmax(-1)) == full.token_ids


def test_rescoring_shrinks_the_selection(warm_engine):
  base = dict(layer_threshold=1, recompute_ratio=0.4)
  plain, p_plan = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig("sparsex", **base),
                                             return_plan=True)
  # keeping everything at the re-scoring layer changes nothing
  same, s_plan = warm_engine.prefill_logits(
      _request(), reuse=sx.ReuseConfig("sparsex", rescore_layer=2, rescore_ratio=0.4, **base),
      return_plan=True)
  np.testing.assert_allclose(same, plain, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(s_plan.kept_positions, p_plan.selected_positions)
  # keeping a quarter: exactly ceil(0.1 * n_reused) of the selected tokens stay active
  fewer, f_plan = warm_engine.prefill_logits(
      _request(), reuse=sx.ReuseConfig("sparsex", rescore_layer=2, rescore_ratio=0.1, **base),
      return_plan=True)
  n_reused = f_plan.reused_positions.size
  assert f_plan.kept_positions.size == math.ceil(0.1 * n_reused)
  assert set(f_plan.kept_positions) < set(f_plan.selected_positions)
  np.testing.assert_array_equal(f_plan.selected_positions, p_plan.selected_positions)
  assert np.all(np.isfinite(fewer)) and not np.allclose(fewer, plain)


def test_rescoring_options_are_validated(warm_engine):
  with pytest.raises(ValueError, match="sparsex option"):
    sx.ReuseConfig("cacheblend", rescore_layer=2)
  with pytest.raises(ValueError, match="rescore_ratio must be"):
    sx.ReuseConfig("sparsex", recompute_ratio=0.1, rescore_layer=2, rescore_ratio=0.2)
  with pytest.raises(ValueError, match="needs rescore_layer"):
    sx.ReuseConfig("sparsex", rescore_ratio=0.05)
  with pytest.raises(ValueError, match="rescore_layer must be in"):
    warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
        "sparsex", layer_threshold=1, rescore_layer=1))


def test_attention_x_deviation_is_the_product_of_the_two_signals(warm_engine):
  base = dict(recompute_ratio=0.3, layer_threshold=2)
  _, att = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig("sparsex", **base,
                                                                      **PAPER), return_plan=True)
  _, dev = warm_engine.prefill_logits(
      _request(), reuse=sx.ReuseConfig("cacheblend", recompute_ratio=0.3, check_layer=2),
      return_plan=True)
  _, both = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", importance_signal="attention_x_deviation", segment_heads=0, **base),
      return_plan=True)
  np.testing.assert_allclose(both.scores, att.scores * dev.scores, rtol=1e-5, atol=1e-9)
  k = math.ceil(0.3 * both.reused_positions.size)  # the last token is new: 44 candidates
  want = np.sort(both.reused_positions[np.argsort(-both.scores, kind="stable")[:k]])
  np.testing.assert_array_equal(both.selected_positions, want)
  _, norm = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", importance_signal="attention_x_deviation_norm", segment_heads=0, **base),
      return_plan=True)
  np.testing.assert_allclose(norm.scores, att.scores * np.sqrt(dev.scores), rtol=1e-5, atol=1e-9)
  # At T = 0 there is no deviation (layer-0 K/V depend only on token and position): attention ranks.
  at_zero = [warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", importance_signal=signal, segment_heads=0, layer_threshold=0, recompute_ratio=0.3))
             for signal in ("attention", "attention_x_deviation")]
  np.testing.assert_array_equal(at_zero[0], at_zero[1])


def test_per_segment_budget_and_segment_heads(warm_engine):
  reuse = sx.ReuseConfig("sparsex", recompute_ratio=0.25, layer_threshold=1,
                         per_segment_budget=True, segment_heads=2)
  _, plan = warm_engine.prefill_logits(_request(), reuse=reuse, return_plan=True)
  starts = {12: len(DOC_B), 12 + 22 + 5: len(DOC_A), 12 + 22 + 5 + 13: len(DOC_C)}
  selected = set(plan.selected_positions.tolist())
  score_of = dict(zip(plan.reused_positions.tolist(), plan.scores))
  for start, n in starts.items():
    members = list(range(start, start + n))
    if start + n == len(_full_ids()):
      members = members[:-1]  # the last prompt token is a Sparse-Q row, never a candidate
    chosen = [p for p in members if p in selected]
    assert len(chosen) == min(math.ceil(0.25 * n), len(members)), start
    assert {start, start + 1} <= set(chosen)  # the segment's head tokens, whatever their score
    rest = [p for p in members if p not in chosen]
    others = [p for p in chosen if p not in (start, start + 1)]
    if others and rest:  # inside a segment, the top scores win
      assert min(score_of[p] for p in others) >= max(score_of[p] for p in rest) - 1e-7
  full = sx.ReuseConfig("sparsex", recompute_ratio=1.0, layer_threshold=1, per_segment_budget=True,
                        segment_heads=3)
  assert _rel(warm_engine.prefill_logits(_request(), reuse=full), _full_logits(_full_ids())) < 1e-4
