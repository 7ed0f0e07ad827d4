"""The fused projection weights (models/llama.py: wqkv [.., D, K, G + 2, H], bqkv, w_gate_up
[.., D, 2, F]) viewed per projection, as the tests' independent references read them:
wq [.., D, N, H], wk and wv [.., D, K, H], bq/bk/bv, w_gate and w_up [.., D, F]. numpy slicing,
leading axes (the stacked layers) kept."""

import numpy as np


def attn_in(p: dict) -> dict:
  """A layer's (or the stack's) attn_in params with wq, wk, wv (and bq, bk, bv) added."""
  out = dict(p)
  w = np.asarray(p["wqkv"])
  k, g = w.shape[-3], w.shape[-2] - 2
  out["wq"] = w[..., :g, :].reshape(*w.shape[:-3], k * g, w.shape[-1])
  out["wk"], out["wv"] = w[..., g, :], w[..., g + 1, :]
  if "bqkv" in p:
    b = np.asarray(p["bqkv"])
    out["bq"] = b[..., :g, :].reshape(*b.shape[:-3], k * g, b.shape[-1])
    out["bk"], out["bv"] = b[..., g, :], b[..., g + 1, :]
  return out


def attn_out_mlp(p: dict) -> dict:
  """attn_out_mlp params with w_gate and w_up added (a dense FFN's)."""
  out = dict(p)
  if "w_gate_up" in p:
    w = np.asarray(p["w_gate_up"])
    out["w_gate"], out["w_up"] = w[..., 0, :], w[..., 1, :]
  return out
