"""SparseX prefill: the limits that must hold (DESIGN.md section 2) on a tiny random model."""

import math
import re

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from models import llama
from sparsex_jax.prompt import tokenize
from tests.test_engine import CFG, PARAMS, _engine, _full_logits, _ids, _rel

DOC_A, DOC_B, DOC_C = _ids(13, 21), _ids(22, 22), _ids(9, 23)
SYSTEM, QUESTION = _ids(12, 24), _ids(6, 25)
# the paper's selection rule
PAPER = dict(importance_signal="attention", segment_heads=0, importance_layers="last")
PAPER_SIGNAL = dict(importance_signal="attention", segment_heads=0)  # read where a test says


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


def _layer0_importance_reference(ids, n_exact, sparse_q, per_kv_head=False):
  """Explicit float64 softmax of the Sparse-Q rows at layer 0 (all keys fresh at T = 1): the
  attention mass of every key, summed over heads ([L]) or over each kv head's query heads
  ([K, L])."""
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
  score = np.zeros((CFG.n_kv_heads, len(ids)))
  for n in range(CFG.n_heads):
    s = q[:, n] @ k[:, n // g].T / math.sqrt(CFG.head_dim)
    s = np.where(pos[None, :] <= pos[:, None], s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    score[n // g] += prob[sparse_q].sum(0)
  return score if per_kv_head else score.sum(0)


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


def test_sum_over_layers_option(warm_engine):
  base = dict(layer_threshold=CFG.n_layers - 1, recompute_ratio=0.3)
  outs = {}
  for layers in ("last", "sum"):
    reuse = sx.ReuseConfig("sparsex", **base, **(PAPER | dict(importance_layers=layers)))
    logits, plan = warm_engine.prefill_logits(_request(), reuse=reuse, return_plan=True)
    outs[layers] = plan.scores
    assert np.all(np.isfinite(logits)) and np.all(plan.scores >= 0)
  # summing over 2 full layers is at least the last layer's share
  assert np.all(outs["sum"] >= outs["last"] - 1e-6)
  assert not np.allclose(outs["sum"], outs["last"])


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
  base = dict(recompute_ratio=0.3, layer_threshold=2, importance_layers="last")
  _, att = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig("sparsex", **base,
                                                                      **PAPER_SIGNAL),
                                      return_plan=True)
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


def test_segment_head_share_forces_each_segments_first_tokens_then_ranks(warm_engine):
  """share 0.5 at r = 0.5: the first ceil(0.25 n) tokens of every reused segment, whatever their
  score; the rest of the one global budget ceil(0.5 n_reused) goes to the top scores."""
  reuse = sx.ReuseConfig("sparsex", recompute_ratio=0.5, layer_threshold=1, segment_heads=2,
                         segment_head_share=0.5)
  _, plan = warm_engine.prefill_logits(_request(), reuse=reuse, return_plan=True)
  starts = {12: len(DOC_B), 12 + 22 + 5: len(DOC_A), 12 + 22 + 5 + 13: len(DOC_C)}
  selected = set(plan.selected_positions.tolist())
  forced = set()
  for start, n in starts.items():
    heads = range(start, start + max(2, math.ceil(0.25 * n)))
    forced |= {p for p in heads if p < len(_full_ids()) - 1}  # the last token is a Sparse-Q row
  assert forced <= selected
  assert len(selected) == math.ceil(0.5 * plan.reused_positions.size)
  score_of = dict(zip(plan.reused_positions.tolist(), plan.scores))
  ranked = selected - forced
  rest = set(score_of) - selected - {len(_full_ids()) - 1}
  assert ranked and rest
  assert min(score_of[p] for p in ranked) >= max(score_of[p] for p in rest) - 1e-7
  # Without the share, only 2 heads per segment are forced: another selection.
  _, plan2 = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", recompute_ratio=0.5, layer_threshold=1), return_plan=True)
  assert set(plan2.selected_positions.tolist()) != selected
  with pytest.raises(ValueError, match="segment_head_share"):
    sx.ReuseConfig("sparsex", segment_head_share=1.5)
  with pytest.raises(ValueError, match="sparsex options"):
    sx.ReuseConfig("epic", segment_head_share=0.5)


def _hidden_after_layer0(ids, positions):
  """Layer 0's output for tokens ids at positions (no cache: the model functions, float32)."""
  x = llama.embed(PARAMS, np.asarray(ids)[None])
  layer0 = jax.tree.map(lambda w: w[0], PARAMS["layers"])
  pos = np.asarray(positions)[None]
  q, k, v = llama.layer_qkv(layer0, CFG, x, pos)
  attn = llama.dense_attention(q, k, v, np.arange(len(ids))[None], np.array([len(ids)]),
                               CFG.sm_scale)
  return llama.layer_output(layer0, CFG, x, attn)


def _layer1_kv_deviation_per_kv_head():
  """[K, n] squared distance, per kv head, of the request's fresh layer-1 K/V from the K/V its
  reused docs carry (each doc computed alone from position 0, its K placed at the new position)."""
  ids = _full_ids()
  layer1 = jax.tree.map(lambda w: w[1], PARAMS["layers"])
  positions = np.arange(len(ids))
  _, k_new, v_new = llama.layer_qkv(layer1, CFG, _hidden_after_layer0(ids, positions),
                                    positions[None])
  k_old, v_old = np.array(k_new[0]), np.array(v_new[0])  # non-reused tokens: no deviation
  for doc, start in ((DOC_B, 12), (DOC_A, 12 + 22 + 5), (DOC_C, 12 + 22 + 5 + 13)):
    x_alone = _hidden_after_layer0(doc, np.arange(len(doc)))
    at = start + np.arange(len(doc))
    _, k, v = llama.layer_qkv(layer1, CFG, x_alone, at[None])  # RoPE at the new positions
    k_old[at], v_old[at] = k[0], v[0]
  dev = (np.asarray(k_new[0], np.float64) - k_old) ** 2 + (np.asarray(v_new[0]) - v_old) ** 2
  return dev.sum(-1).T, (np.asarray(k_new[0]), np.asarray(v_new[0]))


def _pool_kv(eng, request, reuse, layer):
  """Runs a prefill; K and V [n, K, H] of the prompt at `layer`, read from the pool."""
  policy = reuse.resolve(eng.config)
  prompt = tokenize(request, eng.tokenizer, eng.config, 0)
  with eng.store.acquire([prompt], policy, max_new_tokens=0) as leases:
    plans, _, _ = eng._prefill([prompt], leases, policy)
    slots = eng.layout.slot_of(plans[0].page_table, np.arange(plans[0].n))
    pages, offs = slots // eng.layout.page_size, slots % eng.layout.page_size
    return tuple(np.asarray(eng.pool[x][layer][:, pages, offs]).transpose(1, 0, 2)
                 for x in ("k", "v"))


def test_refresh_threshold_kv_makes_layer_t_exact_for_every_token(warm_engine):
  """With the fresh K/V of every token kept at layer T = L - 1, the last token's input there is
  exact (full layers below) and so is every key it reads: its logits equal full prefill's,
  whatever was selected. Without the refresh, the unselected reused K/V are stale."""
  last = CFG.n_layers - 1
  full = _full_logits(_full_ids())
  base = dict(recompute_ratio=0.05, layer_threshold=last)
  fresh = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", refresh_threshold_kv=True, **base))
  stale = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", refresh_threshold_kv=False, importance_layers="last", **base))
  assert sx.ReuseConfig().refresh_threshold_kv  # the default since round 4 (docs/quality.md)
  assert _rel(fresh, full) < 1e-4
  assert _rel(stale, full) > 1e-3
  # At T = 1 the pool's layer-1 K/V of every token are the fresh ones (the model functions').
  _, (k_fresh, v_fresh) = _layer1_kv_deviation_per_kv_head()
  for refresh in (True, False):
    k, v = _pool_kv(warm_engine, _request(), sx.ReuseConfig(
        "sparsex", refresh_threshold_kv=refresh, recompute_ratio=0.05, layer_threshold=1,
        importance_layers="last"), 1)
    exact = np.isclose(k, k_fresh, rtol=1e-3, atol=1e-4).all((1, 2)) & np.isclose(
        v, v_fresh, rtol=1e-3, atol=1e-4).all((1, 2))
    assert exact.all() if refresh else exact.mean() < 0.5, refresh
  with pytest.raises(ValueError, match="sparsex options"):
    sx.ReuseConfig("cacheblend", refresh_threshold_kv=False)
  with pytest.raises(ValueError, match="refresh_threshold_kv must be True or False"):
    sx.ReuseConfig("sparsex", refresh_threshold_kv=1)


def test_sparse_prefill_reads_layers_out_of_the_whole_stack(warm_engine):
  """The layers split at T (and at the scoring layer): the program must index the stacked
  weights inside its layer loops, never cut the stack into ranges first. A cut such as w[T:L]
  is a copy of those layers' weights on the GPU: 12 GB per 8K prefill of Llama-3-8B at T=4
  (docs/ttft.md, round 4). Reads the lowered program for slices of a stacked weight."""
  from sparsex_jax import planner
  from sparsex_jax.programs.prefill import prefill
  eng = warm_engine
  for reuse in (sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3),
                sx.ReuseConfig("sparsex", layer_threshold=2, recompute_ratio=0.3,
                               refresh_threshold_kv=True)):
    policy = reuse.resolve(eng.config)
    prompt = tokenize(_request(), eng.tokenizer, eng.config, 0)
    with eng.store.acquire([prompt], policy, max_new_tokens=0) as leases:
      plans = [planner.plan_request(prompt, leases[0], policy, eng.layout)]
      batch, spec = planner.plan_batch(plans, policy, eng.config, eng.layout)
    assert 0 < spec.layer_threshold < CFG.n_layers
    text = prefill.lower(eng.kv.arrays, eng.params, batch, cfg=eng.config, spec=spec).as_text()
    stacked = {"x".join(map(str, w.shape)) for w in jax.tree.leaves(eng.params["layers"])}
    assert not _layer_range_cuts(text, stacked)
    # ... and the check sees a cut when there is one. (One layer's slice, as the deviation at
    # layer T takes of q/k/v weights, is not a range: a few tens of MB, once per prefill.)
    w = jax.tree.leaves(eng.params["layers"])[0]
    assert _layer_range_cuts(jax.jit(lambda w: w[1:]).lower(w).as_text(),
                             stacked)
    assert not _layer_range_cuts(jax.jit(lambda w: w[1]).lower(w).as_text(),
                                 stacked)


def _layer_range_cuts(hlo: str, stacked_shapes) -> list[str]:
  """StableHLO slices of more than one layer out of a stacked weight (shapes 'LxDx...')."""
  cuts = []
  for line in hlo.splitlines():
    m = re.search(r"stablehlo\.slice %\S+ \[(\d+):(\d+)", line)
    if m and int(m[2]) - int(m[1]) > 1 and any(f"(tensor<{s}x" in line for s in stacked_shapes):
      cuts.append(line)
  return cuts


def test_attention_read_at_the_threshold_layer_over_fresh_keys(warm_engine):
  """importance_layers="threshold": the Sparse-Q rows' attention at layer T = 1 itself, over
  every token's fresh layer-1 K (exact: layer 0 ran in full), against float64 attention of the
  model functions' own q and k; times the deviation norm with that signal; and the fresh K/V
  kept in the pool even where refresh_threshold_kv says otherwise."""
  ids = _full_ids()
  positions = np.arange(len(ids))
  layer1 = jax.tree.map(lambda w: w[1], PARAMS["layers"])
  q, k, _ = (np.asarray(a[0], np.float64) for a in llama.layer_qkv(
      layer1, CFG, _hidden_after_layer0(ids, positions), positions[None]))
  base = dict(recompute_ratio=0.3, layer_threshold=1, importance_layers="threshold")
  _, plan = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig("sparsex", **base,
                                                                       **PAPER_SIGNAL),
                                       return_plan=True)
  g = CFG.n_heads // CFG.n_kv_heads
  want = np.zeros(len(ids))
  for n in range(CFG.n_heads):
    s = q[plan.sparse_q, n] @ k[:, n // g].T / math.sqrt(CFG.head_dim)
    s = np.where(positions[None, :] <= positions[plan.sparse_q][:, None], s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    want += (prob / prob.sum(-1, keepdims=True)).sum(0)
  np.testing.assert_allclose(plan.scores, want[plan.reused_positions], rtol=2e-3, atol=1e-6)
  # Not layer 0's attention (the "last" full layer), which the default reads.
  layer0 = _layer0_importance_reference(np.asarray(ids), 12, plan.sparse_q)
  assert not np.allclose(plan.scores, layer0[plan.reused_positions], rtol=2e-3, atol=1e-6)
  # "last_and_threshold": the two layers' attention summed.
  _, both = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", **(base | dict(importance_layers="last_and_threshold")), **PAPER_SIGNAL),
      return_plan=True)
  np.testing.assert_allclose(both.scores, (want + layer0)[both.reused_positions], rtol=2e-3,
                             atol=1e-6)
  _, norm = warm_engine.prefill_logits(_request(), reuse=sx.ReuseConfig(
      "sparsex", importance_signal="attention_x_deviation_norm", segment_heads=0, **base),
      return_plan=True)
  deviation, (k_fresh, v_fresh) = _layer1_kv_deviation_per_kv_head()
  np.testing.assert_allclose(norm.scores, (want * np.sqrt(deviation.sum(0)))[norm.reused_positions],
                             rtol=2e-3, atol=1e-6)
  k_pool, v_pool = _pool_kv(warm_engine, _request(), sx.ReuseConfig("sparsex", **base), 1)
  np.testing.assert_allclose(k_pool, k_fresh, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(v_pool, v_fresh, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match="needs refresh_threshold_kv=True"):
    sx.ReuseConfig("sparsex", refresh_threshold_kv=False, **base)
  # The default since round 9: layers T - 1 and T at T >= 2, layer T - 1 alone at T <= 1, and
  # layer T - 1 alone wherever layer T's fresh K/V are not kept (the sum needs them).
  assert sx.ReuseConfig().importance_layers == "auto"
  cfg = warm_engine.config
  at = lambda **kw: sx.ReuseConfig("sparsex", **kw).resolve(cfg).scorer.importance_layers  # noqa
  assert [at(layer_threshold=t) for t in (0, 1, 2, 3)] == [
      "last", "last", "last_and_threshold", "last_and_threshold"]
  assert at(layer_threshold=3, refresh_threshold_kv=False) == "last"
  assert at(layer_threshold=3, importance_layers="last") == "last"
  with pytest.raises(ValueError, match="importance_layers must be one of"):
    sx.ReuseConfig("sparsex", importance_layers="first")
