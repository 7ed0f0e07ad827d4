"""Assembly of reused K/V: gather cached slots, re-rotate K, write the request's slots. One pass.

For every layer and kv head, token i's K/V moves from flat pool slot src[i] to slot dst[i], and
its K is rotated by delta[i] = new_pos - old_pos (RoPE, Hugging Face rotate_half layout: dim d
pairs with d + H/2; angles delta * inv_freq in float32, so R(delta) R(old) = R(new) exactly as
in models.llama.apply_rope). A dst at or beyond P*S (the pool's sentinel) is a padding token:
nothing is written.

Shapes: k_pool, v_pool [L, K, P, S, H] (the whole pool); src, dst, delta [B, T] int32;
inv_freq [H/2] float32. Returns the updated (k_pool, v_pool). first_layer (static): only layers
[first_layer, L) move; the others are left as they are (SparseX's full layers [0, T) recompute
every reused token's K/V, so their cached values are never read).

Why a kernel: XLA does this as a gather to [L, K, B, T, H], a transpose-rotate and a scatter,
three passes with row gathers of H elements that reached about 360 GB/s on the H100 (5.7 ms for
7,680 tokens of Llama-3-8B). The kernel reads each cached row once and writes it once in place:
the pool is aliased to the output (input_output_aliases), so under a donating jit nothing else
of the pool is touched. A program owns one (layer, kv head) row of the pool and a block of
tokens; each token is one contiguous H-element row, and consecutive tokens of a segment are
consecutive slots of a page, so the loads and stores are long runs.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat


def rotate_half(x, delta, inv_freq):
  """x [..., T, H] rotated by angles delta [..., T] * inv_freq [H/2] (float32 angles)."""
  angles = delta.astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("first_layer",))
def assemble_kv_reference(k_pool, v_pool, src, dst, delta, inv_freq, first_layer=0):
  """Pure-jnp assembly (XLA gather, rotate, scatter). Same contract as assemble_kv."""
  page_size = k_pool.shape[3]
  k = k_pool[first_layer:, :, src // page_size, src % page_size]  # [L - first_layer, K, B, T, H]
  v = v_pool[first_layer:, :, src // page_size, src % page_size]
  k = rotate_half(k, delta, jnp.asarray(inv_freq, jnp.float32))
  page, offset = dst // page_size, dst % page_size
  # dst = P*S has page P: out of range, dropped (a -1 would wrap).
  return (k_pool.at[first_layer:, :, page, offset].set(k, mode="drop"),
          v_pool.at[first_layer:, :, page, offset].set(v, mode="drop"))


def _assemble_kernel(src_ref, dst_ref, delta_ref, inv_ref, k_in, v_in, k_out, v_out, *,
                     n_slots, half, first_row):
  """One (pool row = layer * K + kv head, block of BT tokens) program; rows from first_row.

  Refs: src, dst, delta [BT]; inv [H/2]; k_in, v_in (aliased to k_out, v_out) [L*K, P*S, H].
  """
  del k_in, v_in  # the same buffers as k_out, v_out (aliased): read and write through those
  row = first_row + pl.program_id(0)
  dst = dst_ref[...]
  ok = dst < n_slots
  # A padding token copies slot 0 onto itself, bit for bit (no masked store: the interpreter
  # has none for row gathers). Every such write stores the value just read from the same slot,
  # so the races between programs doing it are harmless.
  src = jnp.where(ok, src_ref[...], 0)
  dst = jnp.where(ok, dst, 0)
  angles = jnp.where(ok, delta_ref[...], 0).astype(jnp.float32)[:, None] * inv_ref[...][None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  lo_idx, hi_idx = pl.ds(0, half), pl.ds(half, half)
  lo, hi = k_out[row, src, lo_idx], k_out[row, src, hi_idx]
  v_lo, v_hi = v_out[row, src, lo_idx], v_out[row, src, hi_idx]
  lo32, hi32 = lo.astype(jnp.float32), hi.astype(jnp.float32)
  keep = ok[:, None]
  # A token's source and destination slots differ (the source is a cached segment's page, the
  # destination the request's own): no program writes a row another one reads.
  k_out[row, dst, lo_idx] = jnp.where(keep, (lo32 * cos - hi32 * sin).astype(lo.dtype), lo)
  k_out[row, dst, hi_idx] = jnp.where(keep, (hi32 * cos + lo32 * sin).astype(hi.dtype), hi)
  v_out[row, dst, lo_idx] = v_lo
  v_out[row, dst, hi_idx] = v_hi


@functools.partial(jax.jit, static_argnames=("first_layer", "block_t", "num_warps", "num_stages",
                                             "interpret"))
def assemble_kv(k_pool, v_pool, src, dst, delta, inv_freq, first_layer=0, *, block_t=64,
                num_warps=8, num_stages=1, interpret=False):
  """Pallas (Triton lowering) assembly, in place: same contract as assemble_kv_reference.

  block_t: tokens per program (a power of two >= 16); (64, 8 warps) and (32, 4 warps) ran at
  2.58 TB/s on the H100 (90% of copy), (64, 4) at 2.20, (128, 4) at 0.40 (docs/BENCHMARKS.md).
  The update is in place where the pool is
  donated (the prefill program); called on a pool the caller keeps, XLA copies it first.
  """
  n_layers, n_kv, n_pages, page_size, head_dim = k_pool.shape
  n_slots = n_pages * page_size
  n_tok = src.size
  n_pad = _compat.cdiv(n_tok, block_t) * block_t
  pad = (0, n_pad - n_tok)
  src = jnp.pad(src.reshape(-1).astype(jnp.int32), pad)
  dst = jnp.pad(dst.reshape(-1).astype(jnp.int32), pad, constant_values=n_slots)
  delta = jnp.pad(delta.reshape(-1).astype(jnp.int32), pad)
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  # Merging contiguous axes is a bitcast: the kernel gets the pool buffers themselves.
  k_rows = k_pool.reshape(n_layers * n_kv, n_slots, head_dim)
  v_rows = v_pool.reshape(n_layers * n_kv, n_slots, head_dim)
  whole = pl.BlockSpec(k_rows.shape, lambda r, i: (0, 0, 0))
  tok = pl.BlockSpec((block_t,), lambda r, i: (i,))
  k_rows, v_rows = pl.pallas_call(
      functools.partial(_assemble_kernel, n_slots=n_slots, half=head_dim // 2,
                        first_row=first_layer * n_kv),
      grid=((n_layers - first_layer) * n_kv, n_pad // block_t),
      in_specs=[tok, tok, tok, pl.BlockSpec((head_dim // 2,), lambda r, i: (0,)), whole, whole],
      out_specs=[whole, whole],
      out_shape=[jax.ShapeDtypeStruct(k_rows.shape, k_rows.dtype),
                 jax.ShapeDtypeStruct(v_rows.shape, v_rows.dtype)],
      input_output_aliases={4: 0, 5: 1},
      compiler_params=_compat.triton_params(num_warps, num_stages),
      interpret=interpret,
      name="sparsex_assemble_kv",
  )(src, dst, delta, inv_freq, k_rows, v_rows)
  return k_rows.reshape(k_pool.shape), v_rows.reshape(v_pool.shape)
