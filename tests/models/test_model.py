"""The decoder against an independent float64 numpy Llama written here (no code shared)."""

import jax
import numpy as np
import pytest

from models import llama
from models.config import ModelConfig, RopeScaling, get_config
from tests import projections


def _randomize(params, seed):
  """Random values everywhere, norm scales included (init makes them ones, which hides bugs)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if "norm" in jax.tree_util.keystr(path):
      return (1.0 + rng.normal(0, 0.3, leaf.shape)).astype(np.float32)
    return rng.normal(0, 0.05, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, params)


def _np_rope(x, pos, cfg):
  """x [T, n, H] float64, interleaving-free rotate_half RoPE, Llama-3 scaling done by hand."""
  h = cfg.head_dim
  freqs = cfg.rope_theta ** (-np.arange(0, h, 2) / h)
  sc = cfg.rope_scaling
  if sc is not None:
    out = []
    for f in freqs:
      wl = 2 * np.pi / f
      if wl < sc.original_max_position / sc.high_freq_factor:
        out.append(f)
      elif wl > sc.original_max_position / sc.low_freq_factor:
        out.append(f / sc.factor)
      else:
        a = (sc.original_max_position / wl - sc.low_freq_factor) / (
            sc.high_freq_factor - sc.low_freq_factor)
        out.append((1 - a) * f / sc.factor + a * f)
    freqs = np.array(out)
  ang = pos[:, None] * freqs[None, :]
  c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  a, b = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([a * c - b * s, b * c + a * s], -1)


def _np_forward(p, cfg, tokens):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  t = len(tokens)
  pos = np.arange(t, dtype=np.float64)

  def norm(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w

  x = p["embed"][tokens]
  g = cfg.n_heads // cfg.n_kv_heads
  for l in range(cfg.n_layers):
    ai = projections.attn_in({k: v[l] for k, v in p["layers"]["attn_in"].items()})
    ao = projections.attn_out_mlp({k: v[l] for k, v in p["layers"]["attn_out_mlp"].items()})
    h = norm(x, ai["norm"])
    q = np.tensordot(h, ai["wq"], 1)
    k = np.tensordot(h, ai["wk"], 1)
    v = np.tensordot(h, ai["wv"], 1)
    if cfg.qkv_bias:
      q, k, v = q + ai["bq"], k + ai["bk"], v + ai["bv"]
    q, k = _np_rope(q, pos, cfg), _np_rope(k, pos, cfg)
    attn = np.zeros_like(q)
    for n in range(cfg.n_heads):
      s = q[:, n] @ k[:, n // g].T / np.sqrt(cfg.head_dim)
      s = np.where(np.tril(np.ones((t, t))) > 0, s, -np.inf)
      e = np.exp(s - s.max(-1, keepdims=True))
      attn[:, n] = (e / e.sum(-1, keepdims=True)) @ v[:, n // g]
    x = x + np.einsum("tnh,nhd->td", attn, ao["wo"])
    h = norm(x, ao["norm"])
    gate, up = h @ ao["w_gate"], h @ ao["w_up"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ ao["w_down"]
  x = norm(x, p["final_norm"])
  return x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])


@pytest.mark.parametrize("cfg", [
    get_config("tiny"),
    get_config("tiny").replace(qkv_bias=True, tie_embeddings=True, n_kv_heads=1),
    get_config("tiny").replace(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), rope_theta=5e5,
                               n_kv_heads=4),
], ids=["gqa2-untied", "qwen-bias-tied-mqa", "llama3-rope-scaling"])
def test_forward_matches_float64_numpy(cfg):
  params = _randomize(llama.init_params(cfg, seed=1), seed=2)
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 37))
  got = np.asarray(jax.jit(llama.forward, static_argnums=1)(params, cfg, tokens))
  for b in range(2):
    want = _np_forward(params, cfg, tokens[b])
    rel = np.linalg.norm(got[b] - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel


def test_rope_rotation_composes():
  cfg = get_config("tiny")
  inv = llama.rope_inv_freq(cfg)
  x = np.random.default_rng(0).normal(size=(1, 5, 2, cfg.head_dim)).astype(np.float32)
  a = np.array([[0, 3, 9, 100, 7]], np.int32)
  d = np.array([[5, 11, 2, 900, 0]], np.int32)
  twice = llama.apply_rope(llama.apply_rope(x, a, inv), d, inv)
  once = llama.apply_rope(x, a + d, inv)
  np.testing.assert_allclose(np.asarray(twice), np.asarray(once), atol=2e-5)


def test_bfloat16_close_to_float32():
  cfg = get_config("tiny")
  params = _randomize(llama.init_params(cfg, seed=1), seed=4)
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(1, 16))
  f32 = np.asarray(llama.forward(params, cfg, tokens))
  cfg16 = cfg.replace(dtype="bfloat16")
  p16 = jax.tree.map(lambda a: a.astype(cfg16.jnp_dtype), params)
  b16 = np.asarray(llama.forward(p16, cfg16, tokens))
  assert np.linalg.norm(b16 - f32) / np.linalg.norm(f32) < 3e-2


def test_config_validation():
  with pytest.raises(ValueError, match="multiple"):
    ModelConfig("x", 10, 8, 1, 3, 2, 4, 8)
  with pytest.raises(ValueError, match="unknown model preset"):
    get_config("gpt-17")
