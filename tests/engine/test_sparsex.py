"""SparseX prefill: the limits that must hold (DESIGN.md section 2) on a tiny random model."""

import functools
import math
import re

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from models import llama
from sparsex_jax.prompt import tokenize
from sparsex_jax.step_runner import prefill_and_commit
from tests.engine.test_engine import CFG, PARAMS, _engine, _full_logits, _ids, _rel
from tests import projections

DOC_A, DOC_B, DOC_C = _ids(13, 21), _ids(22, 22), _ids(9, 23)
SYSTEM, QUESTION = _ids(12, 24), _ids(6, 25)


def _request():
  """System prompt (exact after the first request), reused docs interleaved with new text."""
  return sx.Request([sx.Segment(SYSTEM), sx.Segment(DOC_B), sx.Segment(_ids(5, 26), cache=False),
                     sx.Segment(DOC_A), sx.Segment(DOC_C), sx.Segment(QUESTION, cache=False)])


def _full_ids():
  return SYSTEM + DOC_B + _ids(5, 26) + DOC_A + DOC_C + QUESTION


@pytest.fixture()
def warm_engine():
  return _warm()


def _warm():
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
    sx.SparseXPaper(recompute_ratio=1.0),
], ids=["T=L", "r=1", "T=0,r=1", "cacheblend-r=1", "epic-r=1", "random-r=1", "paper-r=1"])
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
  """Explicit float64 softmax of the Sparse-Q rows at layer 0 (all keys fresh at T = 1): the
  attention mass of every key, summed over the rows and heads."""
  p = projections.attn_in(jax.tree.map(lambda w: np.asarray(w[0], np.float64),
                                       PARAMS["layers"]["attn_in"]))
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
  return score.sum(0)


@pytest.mark.parametrize("ratio", [0.0, 0.15, 0.5])
def test_importance_matches_dense_reference_and_topk_count(warm_engine, ratio):
  reuse = sx.SparseXAttention(layer_threshold=1, recompute_ratio=ratio)
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
  # Nothing stored: each single run sees the caches the batch saw (and continues none of it).
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3, update_caches=False)
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


def _layer(i):
  return jax.tree.map(lambda w: w[i], PARAMS["layers"])


def _hidden_before(layer, ids, positions):
  """The input of `layer` for tokens ids at positions, computed in full (no cache: the model
  functions, float32)."""
  x = llama.embed(PARAMS, np.asarray(ids)[None])
  pos = np.asarray(positions)[None]
  for i in range(layer):
    q, k, v = llama.layer_qkv(_layer(i), CFG, x, pos)
    attn = llama.dense_attention(q, k, v, np.arange(len(ids))[None], np.array([len(ids)]),
                                 CFG.sm_scale)
    x = llama.layer_output(_layer(i), CFG, x, attn)
  return x


def _kv_deviation(layer):
  """[n] squared distance of the request's fresh K/V at `layer` from the K/V its reused docs
  carry (each doc computed alone from position 0, its K placed at the new position), and the
  fresh K/V [n, K, H]."""
  ids = _full_ids()
  positions = np.arange(len(ids))
  _, k_new, v_new = llama.layer_qkv(_layer(layer), CFG, _hidden_before(layer, ids, positions),
                                    positions[None])
  k_old, v_old = np.array(k_new[0]), np.array(v_new[0])  # non-reused tokens: no deviation
  for doc, start in ((DOC_B, 12), (DOC_A, 12 + 22 + 5), (DOC_C, 12 + 22 + 5 + 13)):
    x_alone = _hidden_before(layer, doc, np.arange(len(doc)))
    at = start + np.arange(len(doc))
    _, k, v = llama.layer_qkv(_layer(layer), CFG, x_alone, at[None])  # RoPE at the new positions
    k_old[at], v_old[at] = k[0], v[0]
  dev = (np.asarray(k_new[0], np.float64) - k_old) ** 2 + (np.asarray(v_new[0]) - v_old) ** 2
  return dev.sum((1, 2)), (np.asarray(k_new[0]), np.asarray(v_new[0]))


def _attention_reference(layer, sparse_q, ids=None):
  """[n] float64 attention mass the rows `sparse_q` pay every token at `layer`, over every
  token's fresh keys (the layers below computed in full), from the model functions' q and k."""
  ids = _full_ids() if ids is None else ids
  positions = np.arange(len(ids))
  q, k, _ = (np.asarray(a[0], np.float64) for a in llama.layer_qkv(
      _layer(layer), CFG, _hidden_before(layer, ids, positions), positions[None]))
  g = CFG.n_heads // CFG.n_kv_heads
  want = np.zeros(len(ids))
  for n in range(CFG.n_heads):
    s = q[sparse_q, n] @ k[:, n // g].T / math.sqrt(CFG.head_dim)
    s = np.where(positions[None, :] <= positions[sparse_q][:, None], s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    want += (prob / prob.sum(-1, keepdims=True)).sum(0)
  return want


def _pool_kv(eng, request, reuse, layer):
  """Runs a prefill; K and V [n, K, H] of the prompt at `layer`, read from the pool."""
  policy = reuse.resolve(eng.config)
  prompt = tokenize(request, eng.tokenizer, eng.config, 0)
  with eng.store.acquire([prompt], policy, max_new_tokens=0) as leases:
    plans, _, _ = prefill_and_commit(eng, [prompt], leases, policy)
    slots = eng.layout.slot_of(plans[0].page_table, np.arange(plans[0].n))
    pages, offs = slots // eng.layout.page_size, slots % eng.layout.page_size
    return tuple(np.asarray(eng.pool[x][layer][:, pages, offs]).transpose(1, 0, 2)
                 for x in ("k", "v"))


def test_sparse_prefill_reads_layers_out_of_the_whole_stack(warm_engine):
  """The layers split at T (and at the scoring layer): the program must index the stacked
  weights inside its layer loops, never cut the stack into ranges first. A cut such as w[T:L]
  is a copy of those layers' weights on the GPU: 12 GB per 8K prefill of Llama-3-8B at T=4
  (docs/ttft.md, round 4). Reads the lowered program for slices of a stacked weight."""
  from sparsex_jax import planner
  from sparsex_jax.programs.prefill import prefill
  eng = warm_engine
  for reuse in (sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3),
                sx.ReuseConfig("sparsex", layer_threshold=2, recompute_ratio=0.3),
                sx.SparseXAttention(layer_threshold=2, recompute_ratio=0.3)):
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




def _top_k_with_forced(plan, k, forced=()):
  """The reused positions a top-k over plan.scores selects, forced positions first."""
  score = dict(zip(plan.reused_positions.tolist(), plan.scores))
  rest = [p for p in sorted(score, key=lambda p: -score[p]) if p not in forced
          and p != len(_full_ids()) - 1]  # the last token is a Sparse-Q row
  return sorted(list(forced) + rest[:k - len(forced)])


def test_default_scores_attention_times_deviation_norm_at_t1(warm_engine):
  """At T = 1 the default's score of reused token j is a_j * |dK_j, dV_j|: the Sparse-Q
  attention at layer 0 times the norm of its K/V deviation at layer 1, both against float64
  references from the model functions; the top ceil(r * n) are selected."""
  _, plan = warm_engine.prefill_logits(_request(), reuse=sx.SparseX(
      recompute_ratio=0.3, layer_threshold=1, segment_heads=0, context_heads=0),
      return_plan=True)
  attention = _layer0_importance_reference(np.asarray(_full_ids()), 12, plan.sparse_q)
  deviation, _ = _kv_deviation(1)
  want = attention * np.sqrt(deviation)
  np.testing.assert_allclose(plan.scores, want[plan.reused_positions], rtol=2e-3, atol=1e-6)
  k = math.ceil(0.3 * plan.reused_positions.size)
  np.testing.assert_array_equal(plan.selected_positions, _top_k_with_forced(plan, k))
  # ... the product of the paper's signal and CacheBlend's, computed by the engine too
  _, att = warm_engine.prefill_logits(_request(), reuse=sx.SparseXAttention(
      recompute_ratio=0.3, layer_threshold=1), return_plan=True)
  _, dev = warm_engine.prefill_logits(_request(), reuse=sx.CacheBlend(
      recompute_ratio=0.3, layer_threshold=1), return_plan=True)
  np.testing.assert_allclose(plan.scores, att.scores * np.sqrt(dev.scores), rtol=1e-5, atol=1e-9)
  # At T = 0 there is no deviation (layer-0 K/V depend only on token and position): attention
  # alone ranks, as the paper's rule does.
  at_zero = [warm_engine.prefill_logits(_request(), reuse=m(recompute_ratio=0.3, layer_threshold=0))
             for m in (functools.partial(sx.SparseX, segment_heads=0, context_heads=0),
                       sx.SparseXAttention)]
  np.testing.assert_array_equal(at_zero[0], at_zero[1])


def test_default_reads_layers_t_minus_1_and_t_at_t2(warm_engine):
  """At T = 2 the attention is layer 1's plus layer 2's over every token's fresh layer-2 K/V
  (exact: layers 0 and 1 ran in full), times the deviation norm at layer 2; the fresh K/V are
  kept in the pool for every token; the first 2 tokens of every reused segment are selected
  whatever their score, the rest of the budget by score."""
  _, plan = warm_engine.prefill_logits(_request(), reuse=sx.SparseX(
      recompute_ratio=0.3, layer_threshold=2), return_plan=True)
  deviation, (k_fresh, v_fresh) = _kv_deviation(2)
  want = (_attention_reference(1, plan.sparse_q) + _attention_reference(2, plan.sparse_q)) \
      * np.sqrt(deviation)
  np.testing.assert_allclose(plan.scores, want[plan.reused_positions], rtol=2e-3, atol=1e-6)
  heads = [p for start in (12, 12 + 22 + 5, 12 + 22 + 5 + 13) for p in (start, start + 1)]
  k = math.ceil(0.3 * plan.reused_positions.size)
  np.testing.assert_array_equal(plan.selected_positions, _top_k_with_forced(plan, k, heads))
  assert not set(heads) <= set(_top_k_with_forced(plan, k))  # the heads are there by force
  k_pool, v_pool = _pool_kv(warm_engine, _request(), sx.SparseX(
      recompute_ratio=0.3, layer_threshold=2), 2)
  np.testing.assert_allclose(k_pool, k_fresh, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(v_pool, v_fresh, rtol=1e-3, atol=1e-4)


def test_default_keeps_layer_t_exact_for_every_token(warm_engine):
  """The default writes the fresh K/V of every token at layer T: at T = L - 1 the last token's
  input there is exact (full layers below) and so is every key it reads, so its logits equal
  full prefill's whatever was selected. The paper's rule leaves unselected reused K/V stale."""
  full = _full_logits(_full_ids())
  last = CFG.n_layers - 1
  fresh = warm_engine.prefill_logits(_request(), reuse=sx.SparseX(
      recompute_ratio=0.05, layer_threshold=last))
  stale = warm_engine.prefill_logits(_request(), reuse=sx.SparseXAttention(
      recompute_ratio=0.05, layer_threshold=last))
  assert _rel(fresh, full) < 1e-4
  assert _rel(stale, full) > 1e-3
  # At T = 1 the pool's layer-1 K/V of every token are the fresh ones (the model functions').
  _, (k_fresh, v_fresh) = _kv_deviation(1)
  for method in (sx.SparseX, sx.SparseXAttention):
    k, v = _pool_kv(warm_engine, _request(), method(recompute_ratio=0.05, layer_threshold=1), 1)
    exact = np.isclose(k, k_fresh, rtol=1e-3, atol=1e-4).all((1, 2)) & np.isclose(
        v, v_fresh, rtol=1e-3, atol=1e-4).all((1, 2))
    assert exact.all() if method is sx.SparseX else exact.mean() < 0.5, method


def test_paper_rule_scores_with_the_tail_queries_and_recomputes_ov_and_tail(warm_engine):
  """The paper's rule on a prompt that ends in a reused segment (DOC_C): the tail fallback's
  queries (DOC_C's last 6 tokens) join the Sparse-Q rows; the scores are their summed attention
  at the boundary layer T - 1 = 0 against float64; the overflow blocks around the new interval,
  the tail and the top ceil(r n) by score are recomputed."""
  ids = SYSTEM + DOC_B + _ids(5, 26) + DOC_A + DOC_C
  req = sx.Request([sx.Segment(SYSTEM), sx.Segment(DOC_B), sx.Segment(_ids(5, 26), cache=False),
                    sx.Segment(DOC_A), sx.Segment(DOC_C)])
  method = sx.SparseXPaper(recompute_ratio=0.2, layer_threshold=1, overflow_block=2,
                           tail_queries=6)
  _, plan = warm_engine.prefill_logits(req, reuse=method, return_plan=True)
  new = np.arange(12 + 22, 12 + 22 + 5)
  tail = np.arange(len(ids) - 6, len(ids))
  rows = np.zeros(len(ids), bool)
  rows[new] = rows[tail] = True
  assert np.array_equal(plan.sparse_q, np.isin(np.arange(len(ids)), np.append(new, len(ids) - 1)))
  want = _attention_reference(0, rows, ids)
  np.testing.assert_allclose(plan.scores, want[plan.reused_positions], rtol=2e-3, atol=1e-6)
  # the attention-only form scores with the Sparse-Q rows alone: other scores
  _, alone = warm_engine.prefill_logits(req, reuse=sx.SparseXAttention(
      recompute_ratio=0.2, layer_threshold=1), return_plan=True)
  np.testing.assert_allclose(alone.scores, _attention_reference(0, plan.sparse_q, ids)[
      alone.reused_positions], rtol=2e-3, atol=1e-6)
  forced = [32, 33, 39, 40] + list(tail[:-1])  # 2 before and after the new run; the tail
  k = math.ceil(0.2 * plan.reused_positions.size)
  score = dict(zip(plan.reused_positions.tolist(), plan.scores))
  ranked = [p for p in sorted(score, key=lambda p: -score[p])
            if p not in forced and p != len(ids) - 1][:k]
  np.testing.assert_array_equal(plan.selected_positions, sorted(forced + ranked))


def _alone_and_in_context(alone_first=True):
  """A request reusing one segment cached alone (computed from position 0) and one computed in
  context (after another segment), between new tokens."""
  eng = _engine()
  alone, head, in_context = _ids(11, 31), _ids(7, 32), _ids(12, 33)
  eng.cache_segments([alone])
  eng.prefill_logits(sx.Request([sx.Segment(head), sx.Segment(in_context)]), sx.SparseX())
  new_a, new_b = _ids(4, 34), _ids(5, 35)
  middle = [sx.Segment(alone), sx.Segment(in_context)]
  request = sx.Request([sx.Segment(new_a, cache=False)] + middle[::1 if alone_first else -1]
                       + [sx.Segment(new_b, cache=False)])
  return eng, request, len(new_a), len(alone), len(in_context)


def test_default_forces_more_heads_of_segments_computed_in_context():
  """segment_heads tokens at the head of the segment cached alone, context_heads at the head of
  the one computed in context, the rest of the budget by score."""
  eng, request, n_new_a, n_alone, n_in_context = _alone_and_in_context()
  rule = sx.SparseX(recompute_ratio=0.5, layer_threshold=1, segment_heads=2, context_heads=6)
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
  eng, request, n_new_a, _, n_in_context = _alone_and_in_context(alone_first=False)
  rule = sx.SparseX(recompute_ratio=0.25, layer_threshold=1, segment_heads=2, context_heads=6)
  _, plan = eng.prefill_logits(request, rule, return_plan=True)
  assert math.ceil(0.25 * len(plan.reused_positions)) == 6
  start_ctx, start_alone = n_new_a, n_new_a + n_in_context
  want = list(range(start_ctx, start_ctx + 4)) + list(range(start_alone, start_alone + 2))
  np.testing.assert_array_equal(plan.selected_positions, want)


def test_the_next_chat_turn_continues_the_last_one_as_its_decoding_saw_it(warm_engine):
  """A prompt that starts with a whole earlier prompt of the same method continues that prompt's
  K/V as it was computed (the continuation cache): the history is neither recomputed nor
  re-blended, so the next turn sees exactly what the decoding of the last one saw. The turn's
  prompt is the last one and all but the last of its answer's tokens: its first token must be
  the answer's last, and nothing of the history may be reused anew."""
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3)
  sp = sx.SamplingParams(max_new_tokens=6, ignore_eos=True)
  last = warm_engine.generate([_request()], sp, reuse=reuse)[0]
  assert last.stats.n_reused > 0 and last.stats.n_continued == 0
  turn = sx.Request(_request().segments + (sx.Segment(last.token_ids[:-1], cache=False),))
  nxt = warm_engine.generate([turn], sx.SamplingParams(max_new_tokens=1), reuse=reuse)[0]
  # The last prompt and the answer its decoding fed back (5 tokens), in full pages; the page of
  # the turn's last token is computed.
  n_full = (len(_full_ids()) + 5 - 1) // 4 * 4
  assert (nxt.stats.n_exact, nxt.stats.n_reused) == (n_full, 0)
  assert nxt.stats.n_continued == n_full - len(SYSTEM)  # the system prompt's pages are exact
  assert nxt.token_ids == last.token_ids[-1:]
  # Another setting of the method does not continue it: the history is reused and blended anew.
  other = warm_engine.generate([turn], sx.SamplingParams(max_new_tokens=1),
                               reuse=sx.ReuseConfig("sparsex", layer_threshold=1,
                                                    recompute_ratio=0.5))[0]
  assert other.stats.n_continued == 0 and other.stats.n_reused > 0


def test_a_turn_continues_past_the_answer_with_the_logits_of_computing_it():
  """The answer's K/V, written by the decode loop, is cached as the rest of its prompt's
  continuation. A turn that resends prompt and answer continues both; its logits equal those of
  an engine that continued the prompt alone and computed the answer in the turn's prefill (the
  same attention over the same history, done by the decode loop in one and the prefill in the
  other). An answer the client edited is not continued past the prompt."""
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3)
  sp = sx.SamplingParams(max_new_tokens=9, ignore_eos=True)
  decoded, computed = _warm(), _warm()
  answer = decoded.generate([_request()], sp, reuse=reuse)[0].token_ids
  computed.prefill_logits(_request(), reuse=reuse)  # the prompt's continuation only
  turn = sx.Request(_request().segments + (sx.Segment(answer[:-1] + _ids(3, 80), cache=False),))
  got, plan = decoded.prefill_logits(turn, reuse=reuse, return_plan=True)
  want, want_plan = computed.prefill_logits(turn, reuse=reuse, return_plan=True)
  n, exact = len(_full_ids()), lambda plan: int(np.sum(plan.labels == 0))
  assert exact(want_plan) == n // 4 * 4  # the prompt's full pages (continued) ...
  assert exact(plan) == (n + len(answer) - 1) // 4 * 4  # ... and the answer's
  assert not np.any(plan.labels == 1) and not np.any(want_plan.labels == 1)  # nothing re-blended
  assert _rel(got, want) < 1e-5
  edited = answer[:-2] + [answer[-2] + 1]
  _, plan = decoded.prefill_logits(sx.Request(_request().segments + (
      sx.Segment(edited, cache=False),)), reuse=reuse, return_plan=True)
  assert exact(plan) == n // 4 * 4


@pytest.mark.parametrize("method", ["prefix", "sparsex"])
def test_an_exact_answer_is_cached_as_exact_prefix_blocks(method):
  """With every token of the prompt exact, the answer's K/V is exact too: it joins the prefix
  cache, and a turn that resends it hits it with the logits of a full forward pass."""
  eng = _engine()
  ids = _ids(23, 81)
  sp = sx.SamplingParams(max_new_tokens=11, ignore_eos=True)
  answer = eng.generate([sx.Request([sx.Segment(ids)])], sp, reuse=sx.ReuseConfig(method))[0]
  turn = ids + answer.token_ids[:-1] + _ids(2, 82)
  stats = eng.generate([sx.Request([sx.Segment(turn)])], sx.SamplingParams(max_new_tokens=1),
                       reuse=sx.ReuseConfig(method))[0].stats
  assert (stats.n_exact, stats.n_continued) == ((23 + 10) // 4 * 4, 0)
  got = eng.prefill_logits(sx.Request([sx.Segment(turn)]), reuse=sx.ReuseConfig(method))
  assert _rel(got, _full_logits(turn)) < 1e-4
  eng.store.check_invariants()


def test_a_failure_to_cache_the_answer_loses_nothing_of_the_output(monkeypatch):
  """Caching the answer is best effort: if it raises, the request's output is whole (the tokens
  of an engine that cached it), a warning names the request, and no page is left behind."""
  ids, sp = _ids(23, 83), sx.SamplingParams(max_new_tokens=11, ignore_eos=True)
  want = _engine().generate([sx.Request([sx.Segment(ids)])], sp)[0].token_ids
  eng = _engine()

  def broken(*_):
    raise RuntimeError("no room")

  monkeypatch.setattr(eng.store, "keep_output", broken)
  with pytest.warns(UserWarning, match="its answer's K/V was not cached: no room"):
    out = eng.generate([sx.Request([sx.Segment(ids)], id="r7")], sp)[0]
  assert out.token_ids == want and out.request_id == "r7"
  eng.store.check_invariants()
  assert eng.store.allocator.num_used == eng.store.num_cached_pages


def test_a_group_prefills_requests_without_hits_apart_from_those_with_hits(warm_engine):
  """One request without segment hits (every token active) would pad every row of a reuse
  batch to all its tokens in the sparse layers: the step runner prefills the two kinds apart,
  and each gives what it gives alone."""
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3, update_caches=False)
  reqs = [_request(), sx.Request([sx.Segment(_ids(30, 77), cache=False)]),
          sx.Request([sx.Segment(_ids(4, 78), cache=False), sx.Segment(DOC_B)])]
  sp = sx.SamplingParams(max_new_tokens=3, ignore_eos=True)
  seen = set(warm_engine.kv.log._seen)
  together = warm_engine.generate(reqs, sp, reuse=reuse)
  ran = set(warm_engine.kv.log._seen) - seen
  specs = [dict(static)["spec"] for name, static, _, _ in ran if name == "prefill"]
  # The request without hits ran the full prefill (every layer, nothing selected); the two with
  # hits ran one sparse prefill of two rows.
  assert sorted(s.layer_threshold for s in specs) == [1, CFG.n_layers]
  alone = [warm_engine.generate([r], sp, reuse=reuse)[0] for r in reqs]
  assert [o.token_ids for o in together] == [o.token_ids for o in alone]
  assert [o.stats.n_recomputed for o in together] == [o.stats.n_recomputed for o in alone]
  assert [o.stats.n_reused > 0 for o in together] == [True, False, True]
