"""Building blocks shared by the device programs: K/V writes, the gather of cached K/V, and the
scanned layer loop over the paged pool."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from models import llama
from models.config import ModelConfig
from sparsex_jax.programs import kernels
from sparsex_jax.kv.layout import page_and_offset
from sparsex_jax.sharding import constrain_replicated, expert_parallel_ffn

# attend(q [B,T,N,H], positions [B,T], pool, layer) -> (out [B,T,N,H], lse [B,T,N] or None);
# with scan_layers(..., pass_kv=True) also attend(..., k=k, v=v): the layer's fresh K/V [B,T,K,H]
Attend = Callable
# score(q, positions, lse, pool, layer) -> per-key importance [B, MP*S]
Score = Callable


def pool_sentinel(pool) -> int:
  """The dropped-write slot of this pool (num_pages * page_size)."""
  _, _, p, s, _ = pool["k"].shape
  return p * s


def write_kv(pool, layer, slots, k, v, backend: str = "reference"):
  """Writes k, v [B, T, K, H] at flat slots [B, T] of one layer (sentinel slots are dropped).

  backend: of kernels.write_kv. The prefill passes its own ("auto": the in-place kernel on the GPU,
  925 against XLA's 421 GB/s for 32K tokens, docs/BENCHMARKS.md); the decode step's one token
  per row stays an XLA scatter ("reference"), measured at its byte floor (docs/throughput.md).
  """
  k_pool, v_pool = kernels.write_kv(pool["k"], pool["v"], slots, k, v, layer=layer,
                                    backend=backend)
  return {"k": k_pool, "v": v_pool}


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
                unroll: bool = False, pass_kv: bool = False, stop_layer: int | None = None,
                write_backend: str = "reference", ffn_backend: str = "auto"):
  """Runs layers [first_layer, stop_layer) of the stacked `layers` over tokens x [B, T, D].

  Each layer writes its K/V at `slots`, then attends with `attend`. With `score`, also adds each
  layer's per-key importance to `importance` [B, MP*S]. Returns (x, pool, importance).

  `layers` is the whole stacked pytree (leading axis L; stop_layer None: L), or a list of
  per-layer pytrees (absolute indices first_layer, ...). unroll=True (or a list) runs a Python
  loop over the layers instead of the device loop (lax.fori_loop). The device loop reads each
  layer's weights through a dynamic slice of the whole stack, at the layer's absolute index; with
  programs/options.COMPILER_OPTIONS (cuBLAS, dynamic-slice fusion) the GPU reads it in place, so
  it is the default everywhere and the Python loops stay decode options for measurement
  (docs/throughput.md). The stack is never cut to the range first: a slice such as w[T:L]
  outside the loop is a copy of those layers' weights (XLA materialises it, 12 GB per prefill of
  Llama-3-8B split at T=4: docs/ttft.md, round 4).
  Unrolling costs compile time (L copies of the layer in the program).
  pass_kv: hand `attend` the layer's fresh K/V too (k=, v=), for attention over contiguous K/V
  (the dense full layers) that need not read them back from the pages.
  write_backend: of each layer's K/V write (write_kv).
  ffn_backend: of a mixture-of-experts FFN's grouped matmul (kernels.grouped_matmul: "auto" is
  the Mosaic GPU kernel on a Hopper GPU; XLA's ragged_dot, out of memory there at long prompts,
  otherwise).
  """
  grouped_matmul = functools.partial(kernels.grouped_matmul, backend=ffn_backend)
  moe_ffn = functools.partial(expert_parallel_ffn, grouped_matmul=grouped_matmul)

  def one_layer(carry, xs):
    x, pool, acc = carry
    layer_params, layer = xs
    x = constrain_replicated(x)  # tensor parallel: the residual stream is replicated
    q, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
    pool = write_kv(pool, layer, slots, k, v, write_backend)
    out, lse = (attend(q, positions, pool, layer, k=k, v=v) if pass_kv
                else attend(q, positions, pool, layer))
    if score is not None:
      acc = acc + score(q, positions, lse, pool, layer)
    x = llama.layer_output(layer_params, cfg, x, out, moe_ffn=moe_ffn)
    return (constrain_replicated(x), pool, acc), None

  if isinstance(layers, (list, tuple)):
    stop_layer = first_layer + len(layers) if stop_layer is None else stop_layer
    per_layer = {first_layer + i: p for i, p in enumerate(layers)}
  else:
    stop_layer = jax.tree.leaves(layers)[0].shape[0] if stop_layer is None else stop_layer
  if stop_layer <= first_layer:
    return x, pool, importance
  carry = (x, pool, importance)
  if isinstance(layers, (list, tuple)) or unroll:
    for i in range(first_layer, stop_layer):
      layer_params = (per_layer[i] if isinstance(layers, (list, tuple))
                      else jax.tree.map(lambda w, i=i: w[i], layers))
      carry, _ = one_layer(carry, (layer_params, jnp.int32(i)))
    return carry

  # The loop counter itself indexes the stack (an XLA induction variable): dynamic-slice fusion
  # then computes each layer's weight address on the host and cuBLAS reads them in place. An
  # index loaded from device memory (e.g. scanning over an array of layer ids) cannot be: XLA
  # copies the layer's weights out first (measured: naive reuse at 8K, 11 -> 21 ms).
  def indexed_layer(layer, carry):
    layer_params = jax.tree.map(
        lambda w: jax.lax.dynamic_index_in_dim(w, layer, axis=0, keepdims=False), layers)
    return one_layer(carry, (layer_params, layer))[0]

  return jax.lax.fori_loop(first_layer, stop_layer, indexed_layer, carry)
