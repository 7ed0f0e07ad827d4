"""Building blocks shared by the device programs: K/V writes, the gather of cached K/V, and the
scanned layer loop over the paged pool."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from models import llama
from models.config import ModelConfig
from sparsex_jax.kv.layout import page_and_offset
from sparsex_jax.sharding import constrain_replicated

# attend(q [B,T,N,H], positions [B,T], pool, layer) -> (out [B,T,N,H], lse [B,T,N] or None);
# with scan_layers(..., pass_kv=True) also attend(..., k=k, v=v): the layer's fresh K/V [B,T,K,H]
Attend = Callable
# score(q, positions, lse, pool, layer) -> per-key importance [B, MP*S]
Score = Callable


def pool_sentinel(pool) -> int:
  """The dropped-write slot of this pool (num_pages * page_size)."""
  _, _, p, s, _ = pool["k"].shape
  return p * s


def write_kv(pool, layer, slots, k, v):
  """Writes k, v [B, T, K, H] at flat slots [B, T] of one layer (sentinel slots are dropped)."""
  page, offset = page_and_offset(slots, pool["k"].shape[3])
  return {"k": pool["k"].at[layer, :, page, offset].set(k.astype(pool["k"].dtype), mode="drop"),
          "v": pool["v"].at[layer, :, page, offset].set(v.astype(pool["v"].dtype), mode="drop")}


def gather_kv(pool, src_slots):
  """K and V of every layer at flat slots [B, T]: [L, K, B, T, H] each (slots must be valid)."""
  page, offset = page_and_offset(src_slots, pool["k"].shape[3])
  return pool["k"][:, :, page, offset], pool["v"][:, :, page, offset]


def scatter_kv(pool, dst_slots, k, v):
  """Writes K and V [L, K, B, T, H] of every layer at flat slots [B, T] (sentinel: dropped)."""
  page, offset = page_and_offset(dst_slots, pool["k"].shape[3])
  return {"k": pool["k"].at[:, :, page, offset].set(k, mode="drop"),
          "v": pool["v"].at[:, :, page, offset].set(v, mode="drop")}


def scan_layers(layers, cfg: ModelConfig, first_layer: int, x, positions, slots, pool,
                attend: Attend, score: Score | None = None, importance=None,
                unroll: bool = False, pass_kv: bool = False):
  """Runs the stacked `layers` (absolute indices first_layer, ...) over tokens x [B, T, D].

  Each layer writes its K/V at `slots`, then attends with `attend`. With `score`, also adds each
  layer's per-key importance to `importance` [B, MP*S]. Returns (x, pool, importance).

  `layers` is the stacked pytree (leading axis L), or a list of per-layer pytrees. unroll=True (or
  a list) runs a Python loop over the layers instead of lax.scan. A scan reads each layer's
  weights through a dynamic slice of the stack; with programs/options.COMPILER_OPTIONS (cuBLAS,
  dynamic-slice fusion) the GPU reads it in place, so the scan is the default everywhere and the
  loops stay decode options for measurement (docs/throughput.md). Unrolling costs compile time
  (L copies of the layer in the program).
  pass_kv: hand `attend` the layer's fresh K/V too (k=, v=), for attention over contiguous K/V
  (the dense full layers) that need not read them back from the pages.
  """
  def one_layer(carry, xs):
    x, pool, acc = carry
    layer_params, layer = xs
    x = constrain_replicated(x)  # tensor parallel: the residual stream is replicated
    q, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
    pool = write_kv(pool, layer, slots, k, v)
    out, lse = (attend(q, positions, pool, layer, k=k, v=v) if pass_kv
                else attend(q, positions, pool, layer))
    if score is not None:
      acc = acc + score(q, positions, lse, pool, layer)
    return (constrain_replicated(llama.layer_output(layer_params, cfg, x, out)), pool, acc), None

  if isinstance(layers, (list, tuple)) or unroll:
    per_layer = list(layers) if isinstance(layers, (list, tuple)) else [
        jax.tree.map(lambda w, i=i: w[i], layers)
        for i in range(jax.tree.leaves(layers)[0].shape[0])]
    carry = (x, pool, importance)
    for i, layer_params in enumerate(per_layer):
      carry, _ = one_layer(carry, (layer_params, jnp.int32(first_layer + i)))
    return carry
  n = jax.tree.leaves(layers)[0].shape[0]
  if n == 0:
    return x, pool, importance
  layer_ids = first_layer + jnp.arange(n, dtype=jnp.int32)
  (x, pool, importance), _ = jax.lax.scan(one_layer, (x, pool, importance), (layers, layer_ids))
  return x, pool, importance
