"""Paged decode attention (one query token per request): reference and flash-decoding kernel.

q [B, N, H] attends to all keys j < kv_len[b] of its request's pages (k_pages,
v_pages: one layer [K, P, S, H], or with `layer` given the whole pool
[L, K, P, S, H], as in attention.py). Decode
is memory-bound (each K/V byte is used by only G = N // K query heads), so the
kernel's job is to stream the pages at full HBM bandwidth:
  - grid (request, kv head, key split): the keys of one request are split
    into NS independent ranges (flash-decoding) so that even batch 1 fills
    the GPU; partial (acc, max, sum) are merged in jnp afterwards;
  - the G query heads of one kv head are the rows of one [GP, H] x [H, BK]
    dot (padded to GP >= 16 rows, the Triton dot minimum), so each K/V tile
    is read once for the whole group.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._paged import (LOG2E, gather_kv, kernel_pool, key_rows, layer_pages,
                                   masked_softmax_stats, merge_splits, pool_row, pool_spec)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_decode_attention_reference(q, k_pages, v_pages, page_table, kv_len, *,
                                     sm_scale, layer=None):
  """Pure-jnp paged decode attention -> [B, N, H] in q.dtype (f32 accumulation).

  layer: None (one layer [K, P, S, H]) or the layer of the whole pool to use.
  """
  batch, n_heads, head_dim = q.shape
  k_pages, v_pages = layer_pages(k_pages, layer), layer_pages(v_pages, layer)
  n_kv = k_pages.shape[0]
  group = n_heads // n_kv
  k = gather_kv(k_pages, page_table)  # [B, K, L, H]
  v = gather_kv(v_pages, page_table)
  n_keys = k.shape[2]
  qg = q.reshape(batch, n_kv, group, head_dim)
  s = jnp.einsum("BKGH,BKLH->BKGL", qg, k,
                 preferred_element_type=jnp.float32) * sm_scale
  vis = (jnp.arange(n_keys)[None, :] < kv_len[:, None])[:, None, None]
  s, m, l, _ = masked_softmax_stats(s, vis)
  p = jnp.exp(s - m[..., None]) / jnp.where(l > 0, l, 1.0)[..., None]
  out = jnp.einsum("BKGL,BKLH->BKGH", p, v.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, n_heads, head_dim).astype(q.dtype)


def _decode_kernel(layer_ref, kvlen_ref, pt_ref, q_ref, k_ref, v_ref, acc_ref,
                   m_ref, l_ref, *, sm_scale, block_k, split_len, page_size,
                   max_pages, n_kv):
  """One (request b, kv head h, split s) program over keys [s*SL, (s+1)*SL).

  Refs: layer [1]; kvlen [B]; pt [MP]; q [GP, H]; k, v [L*K, P*S, H] (the
  whole pool; row layer * K + h is read); acc [GP, H] (unnormalised f32);
  m, l [GP] (running max in log2 units, running sum).
  """
  b = pl.program_id(0)
  kv_row = pool_row(layer_ref, n_kv)
  split = pl.program_id(2)
  kv_len = kvlen_ref[b]
  q = q_ref[...]
  qk_scale = sm_scale * LOG2E
  lo = split * split_len
  hi = jnp.minimum(lo + split_len, kv_len)
  n_blk = lax.div(jnp.maximum(hi - lo, 0) + block_k - 1, block_k)
  rows_q, head_dim = q.shape

  def body(i, carry):
    acc, m_i, l_i = carry
    kpos, rows = key_rows(pt_ref, lo + i * block_k, block_k, page_size,
                          max_pages)
    k = k_ref[kv_row, rows, :]
    v = v_ref[kv_row, rows, :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * qk_scale
    s = jnp.where((kpos < hi)[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    # The first block always holds a visible key (n_blk > 0 only then), so
    # m_new is finite from here on.
    alpha = jnp.exp2(m_i - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l_i = l_i * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l_i

  carry = (jnp.zeros((rows_q, head_dim), jnp.float32),
           jnp.full((rows_q,), -jnp.inf, jnp.float32),
           jnp.zeros((rows_q,), jnp.float32))
  acc, m_i, l_i = lax.fori_loop(0, n_blk, body, carry)
  acc_ref[...] = acc
  m_ref[...] = m_i
  l_ref[...] = l_i


def choose_splits(batch, n_kv, n_keys, block_k, target_programs=512):
  """Key splits per (request, kv head): enough programs to fill the GPU
  (about 4 per SM on a 132-SM H100), never a split shorter than one block."""
  max_splits = max(1, _compat.cdiv(n_keys, block_k))
  want = _compat.next_pow2(_compat.cdiv(target_programs, batch * n_kv))
  return max(1, min(want, max_splits))


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_k", "num_splits", "num_warps",
                     "num_stages", "interpret"))
def paged_decode_attention(q, k_pages, v_pages, page_table, kv_len, *, sm_scale,
                           layer=None, block_k=64, num_splits=None, num_warps=4,
                           num_stages=3, interpret=False):
  """Pallas (Triton lowering) flash-decoding over paged KV -> [B, N, H].

  Same contract as paged_decode_attention_reference. num_splits: key ranges
  per (request, kv head); default from choose_splits. layer: None or the
  layer of the whole pool [L, K, P, S, H], selected inside the kernel.
  """
  batch, n_heads, head_dim = q.shape
  n_kv, _, page_size, _ = k_pages.shape[-4:]
  group = n_heads // n_kv
  max_pages = page_table.shape[1]
  n_keys = max_pages * page_size
  if num_splits is None:
    num_splits = choose_splits(batch, n_kv, n_keys, block_k)
  # Each split covers a whole number of blocks.
  split_len = _compat.cdiv(_compat.cdiv(n_keys, num_splits), block_k) * block_k
  rows_q = max(16, _compat.next_pow2(group))
  qg = q.reshape(batch, n_kv, group, head_dim)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows_q - group), (0, 0)))
  k_flat, layer_arr = kernel_pool(k_pages, layer)
  v_flat, _ = kernel_pool(v_pages, layer)

  kernel = functools.partial(
      _decode_kernel, sm_scale=sm_scale, block_k=block_k, split_len=split_len,
      page_size=page_size, max_pages=max_pages, n_kv=n_kv)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(batch, n_kv, num_splits),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, s: (0,)),  # layer
          pl.BlockSpec((batch,), lambda b, h, s: (0,)),  # kv_len
          pl.BlockSpec((None, max_pages), lambda b, h, s: (b, 0)),  # pages
          pl.BlockSpec((None, None, rows_q, head_dim),
                       lambda b, h, s: (b, h, 0, 0)),  # q group
          pool_spec(k_flat),  # whole k pool (row layer * K + h is read)
          pool_spec(v_flat),  # whole v pool
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, rows_q, head_dim),
                       lambda b, h, s: (b, h, s, 0, 0)),
          pl.BlockSpec((None, None, None, rows_q), lambda b, h, s: (b, h, s, 0)),
          pl.BlockSpec((None, None, None, rows_q), lambda b, h, s: (b, h, s, 0)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, n_kv, num_splits, rows_q, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((batch, n_kv, num_splits, rows_q), jnp.float32),
          jax.ShapeDtypeStruct((batch, n_kv, num_splits, rows_q), jnp.float32),
      ],
      compiler_params=_compat.triton_params(num_warps, num_stages),
      interpret=interpret,
      name="sparsex_paged_decode_attention",
  )(layer_arr, kv_len.astype(jnp.int32), page_table.astype(jnp.int32), qg, k_flat,
    v_flat)
  out, _ = merge_splits(acc[:, :, :, :group], m[:, :, :, :group],
                        l[:, :, :, :group])
  return out.reshape(batch, n_heads, head_dim).astype(q.dtype)
