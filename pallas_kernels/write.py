"""The K/V write of one layer: each token's fresh K and V rows into its flat pool slot, in place.

Shapes: k_pool, v_pool [L, K, P, S, H] (the whole pool); slots [...] int32 flat slots
(page * S + offset), any shape, e.g. [B, T]; k, v [..., K, H] of that shape; layer an int32 scalar
(traced or not). A slot at or beyond P*S (the
pool's sentinel) is a padding token: nothing is written. Returns the updated (k_pool, v_pool).

Why a kernel: XLA writes a layer's K/V as a scatter of [K, H] per token into the [L, K, P, S, H]
pool, whose kv-head axis lies outside the slot axis: 2K rows of H elements per token, far apart.
On an H100 at Llama-3-8B shapes those scatters ran at about 215 GB/s (20 ms per 32K-token full
prefill, docs/ttft.md, round 4). Here a program owns one kv head of the layer and a block of
tokens, and writes each token's H-element row with one contiguous store; the pool is aliased to
the output (input_output_aliases), so under a donating jit nothing else of the pool is touched.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._paged import kernel_pool


@jax.jit
def write_kv_reference(k_pool, v_pool, slots, k, v, *, layer):
  """XLA scatter (the programs' write before the kernel). Same contract as write_kv."""
  page_size = k_pool.shape[3]
  page, offset = slots // page_size, slots % page_size  # sentinel: page P, out of range, dropped
  return (k_pool.at[layer, :, page, offset].set(k.astype(k_pool.dtype), mode="drop"),
          v_pool.at[layer, :, page, offset].set(v.astype(v_pool.dtype), mode="drop"))


def _write_kernel(layer_ref, slot_ref, k_ref, v_ref, k_in, v_in, k_out, v_out, *, n_kv, n_slots):
  """One (kv head, block of BT tokens) program. Refs: layer [1]; slots [BT]; k, v [BT, H];
  k_in, v_in (aliased to k_out, v_out) [L*K, P*S, H]."""
  del k_in, v_in  # the same buffers as k_out, v_out
  row = layer_ref[0] * n_kv + pl.program_id(0)
  slots = slot_ref[...]
  ok = slots < n_slots
  # A padding token rewrites slot 0 (the null page, which no request owns) with the value just
  # read from it: no masked store is needed, and no real token's row is touched.
  slots = jnp.where(ok, slots, 0)
  head = pl.ds(0, k_ref.shape[-1])
  keep = ok[:, None]
  k_out[row, slots, head] = jnp.where(keep, k_ref[...].astype(k_out.dtype), k_out[row, slots, head])
  v_out[row, slots, head] = jnp.where(keep, v_ref[...].astype(v_out.dtype), v_out[row, slots, head])


@functools.partial(jax.jit, static_argnames=("block_t", "num_warps", "interpret"))
def write_kv(k_pool, v_pool, slots, k, v, *, layer, block_t=64, num_warps=4, interpret=False):
  """Pallas (Triton lowering) K/V write, in place: same contract as write_kv_reference.

  The update is in place where the pool is donated (the prefill and decode programs); called on
  a pool the caller keeps, XLA copies it first.
  """
  n_layers, n_kv, n_pages, page_size, head_dim = k_pool.shape
  n_slots = n_pages * page_size
  n_tok = slots.size
  n_pad = _compat.cdiv(n_tok, block_t) * block_t
  pad = n_pad - n_tok
  slots = jnp.pad(slots.reshape(-1).astype(jnp.int32), (0, pad), constant_values=n_slots)
  kt = jnp.pad(k.reshape(n_tok, n_kv, head_dim), ((0, pad), (0, 0), (0, 0)))
  vt = jnp.pad(v.reshape(n_tok, n_kv, head_dim), ((0, pad), (0, 0), (0, 0)))
  k_rows, layer_arr = kernel_pool(k_pool, layer)
  v_rows, _ = kernel_pool(v_pool, layer)
  whole = pl.BlockSpec(k_rows.shape, lambda h, i: (0, 0, 0))
  tok = pl.BlockSpec((block_t,), lambda h, i: (i,))
  row = pl.BlockSpec((block_t, None, head_dim), lambda h, i: (i, h, 0))
  k_rows, v_rows = pl.pallas_call(
      functools.partial(_write_kernel, n_kv=n_kv, n_slots=n_slots),
      grid=(n_kv, n_pad // block_t),
      in_specs=[pl.BlockSpec((1,), lambda h, i: (0,)), tok, row, row, whole, whole],
      out_specs=[whole, whole],
      out_shape=[jax.ShapeDtypeStruct(k_rows.shape, k_rows.dtype),
                 jax.ShapeDtypeStruct(v_rows.shape, v_rows.dtype)],
      input_output_aliases={4: 0, 5: 1},
      compiler_params=_compat.triton_params(num_warps, 1),
      interpret=interpret,
      name="sparsex_write_kv",
  )(layer_arr, slots, kt, vt, k_rows, v_rows)
  return k_rows.reshape(k_pool.shape), v_rows.reshape(v_pool.shape)
