"""A functional Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Qwen3 dense and Qwen3 MoE).

The layer maths lives in two small linen modules that hold no state: they are always applied with
explicit params (`Module.apply({"params": p}, ...)`). A layer is split around attention:

    x ──AttentionInput──> q, k, v   (RMSNorm, projections, [Qwen3: q/k RMSNorm per head,] RoPE)
    attention(q, k, v)              (NOT here: the caller picks dense, paged or sparse attention)
    x, attn ──AttentionOutputMLP──> x   (output projection, residual, RMSNorm, FFN, residual;
                                         the FFN is SwiGLU, or a mixture of experts: models/moe.py)

so the SparseX prefill can run full layers for every token below the layer threshold and only the
active tokens above it, against a paged KV pool, without this file knowing about caches.

Params are a plain pytree (docs/CONTRACTS.md) with per-layer weights stacked on a leading L axis.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import moe
from models.config import ModelConfig

_WEIGHT_INIT = nn.initializers.normal(stddev=0.02)


# ----------------------------------------------------------------------------------------------
# RoPE (Hugging Face rotate_half layout: dim i pairs with dim i + H/2)
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] (float32), with Llama 3 frequency scaling when configured.

  Computed in float64 numpy once per config: it is a constant under jit.
  """
  h = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  s = cfg.rope_scaling
  if s is not None:
    wavelen = 2 * np.pi / inv_freq
    low_freq_wavelen = s.original_max_position / s.low_freq_factor
    high_freq_wavelen = s.original_max_position / s.high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    inv_freq = np.where(is_medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [..., T, N, H] by angle positions [..., T] * inv_freq.

  Angles are computed in float32 whatever x's dtype. Rotations compose, R(a) R(b) = R(a + b), so
  `apply_rope(k_cached, new_pos - old_pos)` moves a cached key to a new position exactly.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., T, H/2]
  sin = jnp.sin(angles)[..., None, :]
  cos = jnp.cos(angles)[..., None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  xf = x.astype(jnp.float32)
  xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (xf.astype(x.dtype) * scale).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Layer maths (stateless linen modules)
# ----------------------------------------------------------------------------------------------

class AttentionInput(nn.Module):
  """RMSNorm, q/k/v projections (+ Qwen2 biases, + Qwen3 q/k norms) and RoPE: x [B, T, D] ->
  q, k, v.

  Qwen3's q/k norms act on each head's vector before RoPE. A rotation keeps the norm, and RoPE
  rotations compose, so re-rotating a cached key to a new position (the segment reuse) stays exact:
  the cached key is already normed (tests/models/test_qwen3.py checks it).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, positions):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g = n // k  # query heads per KV head
    norm = self.param("norm", nn.initializers.ones, (d,), dt)
    # q, k and v in one matrix, grouped by KV head: [:, j, :g] are KV head j's query heads (query
    # head j * g + i, as GQA pairs them), [:, j, g] its key, [:, j, g + 1] its value. One matmul
    # instead of three (at a decode step's 16 rows the narrow k and v products kept too few SMs
    # reading: docs/MODELS.md, round 22), and splitting over KV heads (tensor parallelism) keeps
    # each head's q, k and v on one device.
    wqkv = self.param("wqkv", _WEIGHT_INIT, (d, k, g + 2, h), dt)
    hx = rms_norm(x, norm, cfg.norm_eps)
    qkv = jnp.einsum("BTD,DKJH->BTKJH", hx, wqkv)
    if cfg.qkv_bias:
      qkv = qkv + self.param("bqkv", _WEIGHT_INIT, (k, g + 2, h), dt)
    q = qkv[..., :g, :].reshape(*qkv.shape[:2], n, h)
    kk, v = qkv[..., g, :], qkv[..., g + 1, :]
    if cfg.qk_norm:
      q = rms_norm(q, self.param("q_norm", nn.initializers.ones, (h,), dt), cfg.norm_eps)
      kk = rms_norm(kk, self.param("k_norm", nn.initializers.ones, (h,), dt), cfg.norm_eps)
    inv_freq = rope_inv_freq(cfg)
    return apply_rope(q, positions, inv_freq), apply_rope(kk, positions, inv_freq), v


# The MoE FFN as a function (normed hidden states, the layer's MoE params, cfg) -> output: by
# default models.moe.moe_ffn; a caller with the experts split over devices passes its own.
MoeFfn = Callable


class AttentionOutputMLP(nn.Module):
  """Output projection + residual, then RMSNorm, FFN (SwiGLU, or a mixture of SwiGLU experts) +
  residual."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, attn, moe_ffn: MoeFfn | None = None):
    cfg, dt = self.cfg, self.cfg.jnp_dtype
    d, n, h, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.ffn_dim
    wo = self.param("wo", _WEIGHT_INIT, (n, h, d), dt)
    norm = self.param("norm", nn.initializers.ones, (d,), dt)
    if cfg.is_moe:
      e, fe = cfg.n_experts, cfg.moe_ffn_dim
      experts = {
          "router": self.param("router", _WEIGHT_INIT, (d, e), dt),
          "expert_gate": self.param("expert_gate", _WEIGHT_INIT, (e, d, fe), dt),
          "expert_up": self.param("expert_up", _WEIGHT_INIT, (e, d, fe), dt),
          "expert_down": self.param("expert_down", _WEIGHT_INIT, (e, fe, d), dt),
      }
      x = x + jnp.einsum("BTNH,NHD->BTD", attn.astype(dt), wo)
      return x + (moe_ffn or moe.moe_ffn)(rms_norm(x, norm, cfg.norm_eps), experts, cfg)
    # gate and up side by side, [:, 0] and [:, 1]: one matmul (as q, k and v above).
    w_gate_up = self.param("w_gate_up", _WEIGHT_INIT, (d, 2, f), dt)
    w_down = self.param("w_down", _WEIGHT_INIT, (f, d), dt)
    x = x + jnp.einsum("BTNH,NHD->BTD", attn.astype(dt), wo)
    hx = rms_norm(x, norm, cfg.norm_eps)
    gate_up = jnp.einsum("BTD,DCF->BTCF", hx, w_gate_up)
    gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
    return x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down)


def layer_qkv(layer_params, cfg: ModelConfig, x, positions):
  """One layer's q [B,T,N,H], k [B,T,K,H], v [B,T,K,H] (RoPE applied) from its input x."""
  return AttentionInput(cfg).apply({"params": layer_params["attn_in"]}, x, positions)


def layer_output(layer_params, cfg: ModelConfig, x, attn, moe_ffn: MoeFfn | None = None):
  """One layer's output hidden states from its input x and attention output attn [B,T,N,H].

  moe_ffn: how a mixture-of-experts layer runs its experts (default models.moe.moe_ffn, every
  expert here); the engine passes an expert-parallel one under a mesh.
  """
  return AttentionOutputMLP(cfg).apply({"params": layer_params["attn_out_mlp"]}, x, attn,
                                       moe_ffn)


def embed(params, tokens: jax.Array) -> jax.Array:
  return jnp.take(params["embed"], tokens, axis=0)


def logits(params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
  """Final norm and LM head; float32 logits [..., V]."""
  hx = rms_norm(x, params["final_norm"], cfg.norm_eps)
  if cfg.tie_embeddings:
    out = jnp.einsum("...D,VD->...V", hx, params["embed"])
  else:
    out = jnp.einsum("...D,DV->...V", hx, params["lm_head"])
  return out.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Dense attention over contiguous keys, and the full causal forward (the correctness reference
# for every cached path).
# ----------------------------------------------------------------------------------------------

def dense_attention(q, k, v, q_pos, kv_len, sm_scale):
  """q [B,T,N,H] attends over k, v [B,S,K,H] where key j is at absolute position j.

  Key j is visible to query t iff j <= q_pos[b, t] and j < kv_len[b]. Softmax in float32.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * sm_scale
  key_pos = jnp.arange(k.shape[1])
  visible = (key_pos[None, None, :] <= q_pos[:, :, None]) & (
      key_pos[None, None, :] < kv_len[:, None, None])  # [B, T, S]
  s = jnp.where(visible[:, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def forward(params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
  """Full causal prefill of tokens [B, T] from position 0 with no cache: logits [B, T, V]."""
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  kv_len = jnp.full((b,), t, jnp.int32)

  def one_layer(x, layer_params):
    q, k, v = layer_qkv(layer_params, cfg, x, positions)
    attn = dense_attention(q, k, v, positions, kv_len, cfg.sm_scale)
    return layer_output(layer_params, cfg, x, attn), None

  x, _ = jax.lax.scan(one_layer, embed(params, tokens), params["layers"])
  return logits(params, cfg, x)


def init_params(cfg: ModelConfig, seed: int = 0):
  """Random params at the config's real shapes (for tests and speed benchmarks)."""
  key_embed, key_head, key_layers = jax.random.split(jax.random.PRNGKey(seed), 3)
  dt = cfg.jnp_dtype
  x = jnp.zeros((1, 1, cfg.d_model), dt)
  pos = jnp.zeros((1, 1), jnp.int32)
  attn = jnp.zeros((1, 1, cfg.n_heads, cfg.head_dim), dt)

  def init_layer(key):
    k1, k2 = jax.random.split(key)
    return {
        "attn_in": AttentionInput(cfg).init(k1, x, pos)["params"],
        "attn_out_mlp": AttentionOutputMLP(cfg).init(k2, x, attn)["params"],
    }

  layers = jax.jit(jax.vmap(init_layer))(jax.random.split(key_layers, cfg.n_layers))
  params = {
      "embed": _WEIGHT_INIT(key_embed, (cfg.vocab_size, cfg.d_model), dt),
      "layers": layers,
      "final_norm": jnp.ones((cfg.d_model,), dt),
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = _WEIGHT_INIT(key_head, (cfg.d_model, cfg.vocab_size), dt)
  return params
