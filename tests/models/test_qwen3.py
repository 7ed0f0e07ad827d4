"""Qwen3 dense and Qwen3 MoE against an independent float64 numpy model written here (no code
shared): q/k RMSNorm per head before RoPE, GQA attention, the router (softmax over all experts,
top-k, renormalisation), SwiGLU experts; and the re-rotation of a cached, normed key."""

import jax
import numpy as np
import pytest

from models import llama, moe
from models.config import ModelConfig, get_config
from tests import projections

# n_heads * head_dim (64) != d_model (48), as in Qwen3-0.6B and -32B.
DENSE = get_config("qwen3-tiny")
MOE = get_config("qwen3-moe-tiny")


def random_params(cfg, seed, scale=0.08):
  """Random params at the config's shapes, norm scales included (init makes them ones, which
  hides bugs). Drawn in numpy from the shapes alone: compiling the init costs seconds on CPU."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if "norm" in jax.tree_util.keystr(path):
      return (1.0 + rng.normal(0, 0.3, leaf.shape)).astype(np.float32)
    return rng.normal(0, scale, leaf.shape).astype(np.float32)

  shapes = jax.eval_shape(lambda: llama.init_params(cfg, 0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _np_norm(x, w, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _np_rope(x, pos, theta):
  """x [T, n, H] float64, rotate_half RoPE at positions pos [T]."""
  h = x.shape[-1]
  ang = pos[:, None] * theta ** (-np.arange(0, h, 2) / h)[None, :]
  c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  a, b = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([a * c - b * s, b * c + a * s], -1)


def _np_swiglu(h, w_gate, w_up, w_down):
  g = h @ w_gate
  return (g / (1 + np.exp(-g)) * (h @ w_up)) @ w_down


def _np_moe(h, ao, cfg, margins):
  """Qwen3MoeSparseMoeBlock, token by token: softmax over all experts, top k, renormalise."""
  logits = h @ ao["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.zeros_like(h)
  for t in range(h.shape[0]):
    ranked = np.argsort(-probs[t])
    top = ranked[:cfg.n_experts_per_token]
    margins.append(probs[t, top[-1]] - probs[t, ranked[cfg.n_experts_per_token]])
    w = probs[t, top]
    if cfg.norm_topk_prob:
      w = w / w.sum()
    for e, we in zip(top, w):
      out[t] += we * _np_swiglu(h[t], ao["expert_gate"][e], ao["expert_up"][e],
                                ao["expert_down"][e])
  return out


def np_forward(p, cfg, tokens, margins=None):
  """Logits [T, V] of a Qwen3 (dense or MoE) in float64. margins collects, per routed token, the
  gap between the k-th and the next expert's probability (a near tie would make float32 route
  differently: the test checks there is none)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  margins = [] if margins is None else margins
  t, eps = len(tokens), cfg.norm_eps
  pos = np.arange(t, dtype=np.float64)
  g = cfg.n_heads // cfg.n_kv_heads
  x = p["embed"][tokens]
  for layer in range(cfg.n_layers):
    ai = projections.attn_in({k: v[layer] for k, v in p["layers"]["attn_in"].items()})
    ao = projections.attn_out_mlp({k: v[layer] for k, v in p["layers"]["attn_out_mlp"].items()})
    h = _np_norm(x, ai["norm"], eps)
    q = np.einsum("td,dnh->tnh", h, ai["wq"])
    k = np.einsum("td,dkh->tkh", h, ai["wk"])
    v = np.einsum("td,dkh->tkh", h, ai["wv"])
    q, k = _np_norm(q, ai["q_norm"], eps), _np_norm(k, ai["k_norm"], eps)  # before RoPE
    q, k = _np_rope(q, pos, cfg.rope_theta), _np_rope(k, pos, cfg.rope_theta)
    attn = np.zeros_like(q)
    for n in range(cfg.n_heads):
      s = q[:, n] @ k[:, n // g].T / np.sqrt(cfg.head_dim)
      s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
      e = np.exp(s - s.max(-1, keepdims=True))
      attn[:, n] = (e / e.sum(-1, keepdims=True)) @ v[:, n // g]
    x = x + np.einsum("tnh,nhd->td", attn, ao["wo"])
    h = _np_norm(x, ao["norm"], eps)
    if cfg.n_experts:
      x = x + _np_moe(h, ao, cfg, margins)
    else:
      x = x + _np_swiglu(h, ao["w_gate"], ao["w_up"], ao["w_down"])
  x = _np_norm(x, p["final_norm"], eps)
  return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])


@pytest.mark.parametrize("cfg", [
    DENSE,
    DENSE.replace(tie_embeddings=False, n_kv_heads=1),
    MOE,
    MOE.replace(norm_topk_prob=False, n_experts_per_token=3, n_kv_heads=4),
], ids=["dense-tied-gqa2", "dense-untied-mqa", "moe-top2-renorm", "moe-top3-no-renorm"])
def test_forward_matches_float64_numpy(cfg):
  params = random_params(cfg, seed=2)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 29))
  got = np.asarray(jax.jit(llama.forward, static_argnums=1)(params, cfg, tokens))
  for b in range(2):
    margins = []
    want = np_forward(params, cfg, tokens[b], margins)
    rel = np.linalg.norm(got[b] - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel
    if cfg.n_experts:  # routing decided well above float32 rounding: the comparison is fair
      assert len(margins) == cfg.n_layers * tokens.shape[1] and min(margins) > 1e-5


def test_experts_split_in_blocks_sum_to_all_experts_and_idle_experts_are_skipped():
  """What expert parallelism relies on: each block of experts gives its share, the shares add up
  to the whole; an expert no token is routed to (a zero-size group) adds nothing."""
  rng = np.random.default_rng(4)
  e, d, f, m, k = 8, 12, 10, 9, 2
  hx = rng.normal(size=(m, d)).astype(np.float32)
  w_gate, w_up = (rng.normal(size=(e, d, f)).astype(np.float32) for _ in range(2))
  w_down = rng.normal(size=(e, f, d)).astype(np.float32)
  experts = rng.choice([0, 2, 3, 5, 6], size=(m, k))  # experts 1, 4, 7 idle
  experts[:, 1] = (experts[:, 0] + 3) % e  # two distinct experts per token
  weights = rng.uniform(0.1, 1.0, size=(m, k)).astype(np.float32)
  want = np.zeros((m, d))
  for t in range(m):
    for j in range(k):
      x = hx[t].astype(np.float64)
      ex = experts[t, j]
      want[t] += weights[t, j] * _np_swiglu(x, w_gate[ex], w_up[ex], w_down[ex])
  whole = np.asarray(moe.experts_ffn(hx, experts, weights, w_gate, w_up, w_down))
  np.testing.assert_allclose(whole, want, rtol=2e-5, atol=2e-5)
  shares = [np.asarray(moe.experts_ffn(hx, experts, weights, w_gate[i:i + 4], w_up[i:i + 4],
                                       w_down[i:i + 4], first_expert=i)) for i in (0, 4)]
  np.testing.assert_allclose(shares[0] + shares[1], whole, rtol=1e-5, atol=1e-5)
  assert np.abs(shares[0]).min(axis=1).max() > 0 and np.abs(shares[1]).sum() > 0


def test_router_renormalises_the_top_k_of_a_softmax_over_all_experts():
  rng = np.random.default_rng(5)
  hx = rng.normal(size=(6, MOE.d_model)).astype(np.float32)
  router = rng.normal(size=(MOE.d_model, MOE.n_experts)).astype(np.float32)
  for norm in (True, False):
    cfg = MOE.replace(norm_topk_prob=norm, n_experts_per_token=3)
    ids, w = map(np.asarray, moe.route(hx, router, cfg))
    logits = hx.astype(np.float64) @ router
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :3]
    np.testing.assert_array_equal(ids, top)
    want = np.take_along_axis(probs, top, -1)
    want = want / want.sum(-1, keepdims=True) if norm else want
    np.testing.assert_allclose(w, want, rtol=1e-5)
    assert np.allclose(w.sum(-1), 1.0) == norm  # without renormalisation they sum below 1


def test_rerotating_a_normed_key_equals_norming_then_rotating_at_the_new_position():
  """Segment reuse moves cached keys by RoPE alone: with Qwen3's q/k norms before RoPE the cached
  key is already normed, so re-rotation by p' - p gives the key computed at p'."""
  cfg = DENSE
  params = random_params(cfg, seed=7)
  layer = jax.tree.map(lambda w: w[0], params["layers"])
  x = np.random.default_rng(8).normal(size=(1, 6, cfg.d_model)).astype(np.float32)
  p = np.array([[0, 3, 17, 40, 41, 900]], np.int32)
  p_new = np.array([[250, 5, 17, 1000, 2, 901]], np.int32)
  _, k_at_p, _ = llama.layer_qkv(layer, cfg, x, p)
  _, k_at_new, _ = llama.layer_qkv(layer, cfg, x, p_new)
  moved = llama.apply_rope(k_at_p, p_new - p, llama.rope_inv_freq(cfg))
  np.testing.assert_allclose(np.asarray(moved), np.asarray(k_at_new), atol=3e-5)

  # The test has teeth: had the norm come after RoPE (its scale is not uniform over the head),
  # re-rotating would not give the key at p'.
  k_raw = np.einsum("td,dkh->tkh", np.asarray(llama.rms_norm(x, layer["attn_in"]["norm"],
                                                            cfg.norm_eps))[0],
                    projections.attn_in(layer["attn_in"])["wk"]).astype(np.float64)
  w = np.asarray(layer["attn_in"]["k_norm"], np.float64)
  wrong_at_p = _np_norm(_np_rope(k_raw, p[0], cfg.rope_theta), w, cfg.norm_eps)
  wrong_at_new = _np_norm(_np_rope(k_raw, p_new[0], cfg.rope_theta), w, cfg.norm_eps)
  wrong_moved = _np_rope(wrong_at_p, (p_new - p)[0], cfg.rope_theta)
  assert np.abs(wrong_moved - wrong_at_new).max() > 1e-2
  right = _np_rope(_np_norm(k_raw, w, cfg.norm_eps), p_new[0], cfg.rope_theta)
  np.testing.assert_allclose(np.asarray(k_at_new)[0], right, atol=3e-5)


def test_presets_have_the_real_shapes():
  shapes = {name: (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim,
                   c.vocab_size, c.tie_embeddings, c.qk_norm, c.qkv_bias)
            for name in ("qwen3-0.6b", "qwen3-8b", "qwen3-32b") for c in [get_config(name)]}
  assert shapes == {
      "qwen3-0.6b": (28, 1024, 16, 8, 128, 3072, 151936, True, True, False),
      "qwen3-8b": (36, 4096, 32, 8, 128, 12288, 151936, False, True, False),
      "qwen3-32b": (64, 5120, 64, 8, 128, 25600, 151936, False, True, False)}
  a3b = get_config("qwen3-30b-a3b")
  assert (a3b.n_layers, a3b.d_model, a3b.n_heads, a3b.n_kv_heads, a3b.head_dim, a3b.n_experts,
          a3b.n_experts_per_token, a3b.moe_ffn_dim, a3b.norm_topk_prob,
          a3b.tie_embeddings) == (48, 2048, 32, 4, 128, 128, 8, 768, True, False)
  # Parameter counts as published: 0.6B, 8.2B, 32.8B; 30.5B total with 3.3B active (3.35B with
  # the embedding and the head).
  assert [round(get_config(n).num_params() / 1e9, 1) for n in
          ("qwen3-0.6b", "qwen3-8b", "qwen3-32b", "qwen3-30b-a3b")] == [0.6, 8.2, 32.8, 30.5]
  assert 3.3e9 < a3b.num_params(active=True) < 3.4e9
  params = jax.eval_shape(lambda: llama.init_params(get_config("qwen3-0.6b")))
  assert params["layers"]["attn_in"]["wqkv"].shape == (28, 1024, 8, 2 + 2, 128)
  assert params["layers"]["attn_out_mlp"]["wo"].shape == (28, 16, 128, 1024)
  experts = jax.eval_shape(lambda: llama.init_params(a3b))["layers"]["attn_out_mlp"]
  assert experts["expert_gate"].shape == (48, 128, 2048, 768)
  assert experts["expert_down"].shape == (48, 128, 768, 2048)
  assert experts["router"].shape == (48, 2048, 128) and "w_gate_up" not in experts


def test_moe_config_validation():
  base = dict(name="x", vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
              head_dim=4, ffn_dim=8)
  with pytest.raises(ValueError, match="n_experts_per_token=9"):
    ModelConfig(**base, n_experts=8, n_experts_per_token=9, moe_ffn_dim=4)
  with pytest.raises(ValueError, match="moe_ffn_dim"):
    ModelConfig(**base, n_experts=8, n_experts_per_token=2)
  with pytest.raises(ValueError, match="n_experts is 0"):
    ModelConfig(**base, n_experts_per_token=2)


@pytest.mark.parametrize("largest,form", [(100, "capacity 128"), (150, "capacity 192"),
                                          (250, "grouped")])
def test_both_forms_of_the_experts_match_float64(largest, form):
  """A prefill-sized layer (mean 80 rows per expert: capacities 128 and 192) computes its experts
  as one batched matmul over rows padded to the smallest capacity that holds its largest group,
  or, past the largest, as a grouped matmul: the same sums either way, whole or split in blocks
  of experts (expert parallelism); an idle expert adds nothing."""
  rng = np.random.default_rng(largest)
  e, d, f, m, k = 4, 12, 10, 160, 2
  assert moe.capacities(m * k, e) == (128, 192)
  # Expert 0 takes `largest` of the 320 assignments, expert 3 none, 1 and 2 half the rest each.
  rest = m * k - largest
  flat = np.repeat([0, 1, 2], [largest, rest // 2, rest - rest // 2])
  experts = flat[rng.permutation(m * k)].reshape(m, k)
  sizes = np.bincount(experts.reshape(-1), minlength=e)
  assert sizes[0] == largest and sizes[3] == 0
  caps = moe.capacities(m * k, e)
  assert form == (f"capacity {caps[np.searchsorted(caps, sizes.max())]}"
                  if sizes.max() <= caps[-1] else "grouped")
  hx = rng.normal(size=(m, d)).astype(np.float32)
  w_gate, w_up = (rng.normal(size=(e, d, f)).astype(np.float32) for _ in range(2))
  w_down = rng.normal(size=(e, f, d)).astype(np.float32)
  weights = rng.uniform(0.1, 1.0, size=(m, k)).astype(np.float32)
  want = np.zeros((m, d))
  for t in range(m):
    for j in range(k):
      ex = experts[t, j]
      want[t] += weights[t, j] * _np_swiglu(hx[t].astype(np.float64), w_gate[ex], w_up[ex],
                                            w_down[ex])
  ffn = jax.jit(moe.experts_ffn, static_argnames="first_expert")
  whole = np.asarray(ffn(hx, experts, weights, w_gate, w_up, w_down))
  np.testing.assert_allclose(whole, want, rtol=2e-5, atol=2e-4)
  shares = [np.asarray(ffn(hx, experts, weights, w_gate[i:i + 2], w_up[i:i + 2],
                           w_down[i:i + 2], first_expert=i)) for i in (0, 2)]
  np.testing.assert_allclose(shares[0] + shares[1], whole, rtol=1e-5, atol=1e-4)


def test_small_groups_take_the_grouped_matmul():
  """A decode step's groups (a few rows an expert) never pad: the grouped matmul reads only the
  experts its tokens hit."""
  assert moe.capacities(16 * 8, 128) == () and moe.capacities(63 * 128, 128) == ()
  assert moe.capacities(65_536, 128) == (512, 640, 768, 1024)  # an 8K prefill of 30B-A3B


def test_a_prefill_long_enough_to_pad_its_experts_matches_float64():
  """300 tokens of the tiny MoE (8 experts, top 2: 75 rows an expert on average) take the padded
  form in every layer; the whole forward still matches the float64 model."""
  tokens = np.random.default_rng(7).integers(0, MOE.vocab_size, size=(1, 300))
  assert moe.capacities(300 * MOE.n_experts_per_token, MOE.n_experts)
  params = random_params(MOE, seed=11)
  got = np.asarray(jax.jit(llama.forward, static_argnums=1)(params, MOE, tokens))[0]
  margins = []
  want = np_forward(params, MOE, tokens[0], margins)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
  assert min(margins) > 1e-6
