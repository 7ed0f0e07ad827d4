"""The decode program: one token for every sequence of a batch, over the paged pool."""

from __future__ import annotations

import functools

import jax

from models import llama
from models.config import ModelConfig
from pallas_kernels import ops
from sparsex_jax.programs.layers import scan_layers
from sparsex_jax.sampling import sample, step_keys


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("pool",))
def decode_step(pool, params, tokens, positions, slots, page_table, kv_len, temperature, top_p,
                seeds, step, *, cfg: ModelConfig, backend: str = "auto"):
  """tokens, positions, slots [B] (sentinel slot: a finished or padding row) -> (pool, next [B]).

  Sampling is per row: temperature, top_p, seeds [B]; the row's key is (seed, step).
  """

  def attend(q, _, pool, layer):
    out = ops.decode_attention(q[:, 0], pool["k"], pool["v"], page_table, kv_len,
                               sm_scale=cfg.sm_scale, layer=layer, backend=backend)
    return out[:, None], None

  x, pool, _ = scan_layers(params["layers"], cfg, 0, llama.embed(params, tokens[:, None]),
                           positions[:, None], slots[:, None], pool, attend)
  logits = llama.logits(params, cfg, x[:, 0])
  return pool, sample(logits, temperature, top_p, step_keys(seeds, step))
