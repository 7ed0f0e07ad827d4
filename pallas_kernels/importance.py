"""Sparse-Q importance: per-key attention mass of the Sparse-Q rows. Reference and kernel.

importance[b, j] = sum over query heads n and over rows t with q_is_sparse[b, t] of
    exp(s[b, t, n, j] - lse[b, t, n]),
where s are the scaled logits and lse comes from the attention pass (so the
probabilities are exact, normalised over all visible keys). Masked keys
(j > q_pos or j >= kv_len) contribute 0. k_pages is one layer [K, P, S, H] or,
with `layer` given, the whole pool [L, K, P, S, H] (as in attention.py).
Only the sum over heads: the max over heads and a sum per kv head were measured
and not adopted (docs/quality.md), and went.

Determinism: no float atomics, no scatter-add. The kernel owns one block of
keys (for one kv head) per program and loops over the query rows itself, so
every output element is written by exactly one program in a fixed order; the
head sum is a plain jnp reduce over a [B, N, L] array afterwards.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._paged import (LOG2E, default_block_m, gather_kv, group_rows, kernel_pool,
                                   key_rows, layer_pages, map_query_chunks, pool_row, pool_spec,
                                   visibility)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def sparse_q_importance_reference(q, q_pos, q_is_sparse, k_pages, page_table,
                                  kv_len, lse, *, sm_scale, layer=None):
  """Pure-jnp Sparse-Q importance -> [B, MP*S] float32 (layer: as paged_attention)."""
  batch, _, n_heads, head_dim = q.shape
  k_pages = layer_pages(k_pages, layer)
  n_kv = k_pages.shape[0]
  group = n_heads // n_kv
  k = gather_kv(k_pages, page_table)  # [B, K, L, H]
  n_keys = k.shape[2]

  def per_head_mass(qc, pc, sparse_c, lse_c):
    """Per-head attention mass [B, 1, N, L] of one chunk of rows (summed over its rows)."""
    n_tok = qc.shape[1]
    qg = qc.reshape(batch, n_tok, n_kv, group, head_dim)
    s = jnp.einsum("BTKGH,BKLH->BKGTL", qg, k,
                   preferred_element_type=jnp.float32) * sm_scale
    lse_g = jnp.transpose(lse_c.reshape(batch, n_tok, n_kv, group), (0, 2, 3, 1))
    keep = visibility(pc, kv_len, n_keys) & (sparse_c & (pc >= 0))[:, :, None]
    p = jnp.where(keep[:, None, None], jnp.exp(s - lse_g[..., None]), 0.0)
    return jnp.sum(p, axis=3).reshape(batch, 1, n_heads, n_keys)

  # Row chunks come back as [B, n_chunks, N, L]: sum them and the heads.
  per_head = map_query_chunks(per_head_mass, q, q_pos, q_is_sparse, lse, per_row=False)
  return jnp.sum(per_head, axis=(1, 2))


def _importance_kernel(layer_ref, kvlen_ref, nrow_ref, rstart_ref, pt_ref, pos_ref,
                       lse_ref, q_ref, k_ref, o_ref, *, sm_scale, block_m,
                       block_k, page_size, max_pages, group, split_p, n_kv):
  """One (request b, kv head h, key block c) program.

  Rows are the compacted Sparse-Q rows of the G query heads of kv head h
  (row r = Sparse-Q token r // G, head r % G), in ascending position order.
  Refs: layer [1]; kvlen, nrow [B] (nrow = Sparse-Q rows = G x Sparse-Q
  tokens); rstart [C] (first row whose position reaches key block c); pt [MP];
  pos, lse [R_pad]; q [R_pad, H]; k [L*K, P*S, H] (the whole pool; row
  layer * K + h is read); o [GP, BK] per-head sums.
  """
  b = pl.program_id(0)
  c = pl.program_id(2)
  kv_len = kvlen_ref[b]
  n_rows = nrow_ref[b]
  start = c * block_k
  kpos, rows = key_rows(pt_ref, start, block_k, page_size, max_pages)
  k = k_ref[pool_row(layer_ref, n_kv), rows, :]
  key_ok = kpos < kv_len
  qk_scale = sm_scale * LOG2E
  heads_p = o_ref.shape[0]

  # Rows before rstart cannot see this key block (causal); rows from n_rows
  # on are padding (position -1, masked below).
  first = lax.div(rstart_ref[c], block_m)
  last = jnp.where(start < kv_len, lax.div(n_rows + block_m - 1, block_m), 0)
  # Per-head column sums as a [GP, BM] x [BM, BK] dot with a one-hot head
  # selector: a tensor-core product instead of a cross-warp reduction of p
  # every step.
  sel_dtype = jnp.bfloat16 if split_p else jnp.float32
  head_of = lax.broadcasted_iota(jnp.int32, (heads_p, block_m), 0)
  row_of = lax.broadcasted_iota(jnp.int32, (heads_p, block_m), 1)

  def body(i, acc):
    r0 = pl.multiple_of(i * block_m, block_m)
    # Head of global row r0 + r (block_m need not be a multiple of G).
    sel = (head_of == lax.rem(r0 + row_of, group)).astype(sel_dtype)
    pos = pos_ref[pl.ds(r0, block_m)]
    lse = lse_ref[pl.ds(r0, block_m)] * LOG2E
    q = q_ref[pl.ds(r0, block_m), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * qk_scale
    keep = (kpos[None, :] <= pos[:, None]) & key_ok[None, :]
    # exp2 of masked-out entries may overflow (lse = -inf on padding rows);
    # the where discards them before the sum.
    p = jnp.where(keep, jnp.exp2(s - lse[:, None]), 0.0)
    dims = (((1,), (0,)), ((), ()))
    if split_p:
      # p = hi + lo in two bf16 parts keeps ~16 mantissa bits through the
      # bf16 tensor-core dot (the selector is exact in bf16).
      hi = p.astype(jnp.bfloat16)
      lo = (p - hi.astype(jnp.float32)).astype(jnp.bfloat16)
      acc = acc + lax.dot_general(sel, hi, dims,
                                  preferred_element_type=jnp.float32)
      acc = acc + lax.dot_general(sel, lo, dims,
                                  preferred_element_type=jnp.float32)
    else:
      acc = acc + lax.dot_general(sel, p, dims,
                                  preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(first, last, body,
                      jnp.zeros((heads_p, block_k), jnp.float32))
  o_ref[...] = acc


def compact_sparse_rows(q_pos, q_is_sparse):
  """Stable order putting Sparse-Q rows first (ascending position), and their count."""
  sel = q_is_sparse & (q_pos >= 0)
  order = jnp.argsort(jnp.logical_not(sel), axis=1, stable=True)
  return order.astype(jnp.int32), jnp.sum(sel, axis=1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_m", "block_k",
                     "num_warps", "num_stages", "interpret"))
def sparse_q_importance(q, q_pos, q_is_sparse, k_pages, page_table, kv_len, lse,
                        *, sm_scale, block_m=None,
                        block_k=128, num_warps=4, num_stages=2, interpret=False,
                        layer=None):
  """Pallas (Triton lowering) Sparse-Q importance -> [B, MP*S] float32.

  Same contract as sparse_q_importance_reference. Grid: (request, kv head,
  key block); each program loops over only the Sparse-Q rows (tokens x the
  G heads of its kv head) that can see its keys, and writes per-head sums;
  the head sum is a jnp reduce afterwards. Outside the kernel (plain
  jnp, O(T) work): compact the Sparse-Q rows to the front, and find per key
  block the first row that reaches it. Defaults (block_m 64, block_k 128,
  4 warps, 2 stages) are the H100 sweep's best (docs/BENCHMARKS.md). layer:
  None or the layer of the whole pool [L, K, P, S, H], selected inside the
  kernel.
  """
  batch, n_tok, n_heads, head_dim = q.shape
  n_kv, _, page_size, _ = k_pages.shape[-4:]
  group = n_heads // n_kv
  heads_p = max(16, _compat.next_pow2(group))
  max_pages = page_table.shape[1]
  n_keys = max_pages * page_size
  n_cblk = _compat.cdiv(n_keys, block_k)
  if block_m is None:
    block_m = default_block_m(n_tok * group)

  order, n_sp = compact_sparse_rows(q_pos, q_is_sparse)
  is_row = jnp.arange(n_tok, dtype=jnp.int32)[None, :] < n_sp[:, None]
  pos_c = jnp.take_along_axis(q_pos.astype(jnp.int32), order, axis=1)
  pos_c = jnp.where(is_row, pos_c, -1)
  # First compacted token with position >= each key block's start, in rows.
  pos_sorted = jnp.where(is_row, pos_c, jnp.iinfo(jnp.int32).max)
  starts = jnp.arange(n_cblk, dtype=jnp.int32) * block_k
  rstart = jax.vmap(lambda p: jnp.searchsorted(p, starts, side="left"))(
      pos_sorted).astype(jnp.int32) * group  # [B, C]

  q_c = jnp.take_along_axis(q, order[:, :, None, None], axis=1)
  qr, pos_r = group_rows(q_c, pos_c, n_kv, block_m)  # [B, K, R_pad, H]
  lse_c = jnp.take_along_axis(lse.astype(jnp.float32), order[:, :, None],
                              axis=1)
  lse_r, _ = group_rows(lse_c[..., None], pos_c, n_kv, block_m)
  lse_r = lse_r[..., 0]  # [B, K, R_pad]
  r_pad = qr.shape[2]
  k_flat, layer_arr = kernel_pool(k_pages, layer)
  split_p = jnp.dtype(q.dtype).itemsize < 4

  kernel = functools.partial(
      _importance_kernel, sm_scale=sm_scale, block_m=block_m, block_k=block_k,
      page_size=page_size, max_pages=max_pages, group=group, split_p=split_p,
      n_kv=n_kv)
  per_head = pl.pallas_call(
      kernel,
      grid=(batch, n_kv, n_cblk),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, c: (0,)),  # layer
          pl.BlockSpec((batch,), lambda b, h, c: (0,)),  # kv_len
          pl.BlockSpec((batch,), lambda b, h, c: (0,)),  # Sparse-Q rows
          pl.BlockSpec((None, n_cblk), lambda b, h, c: (b, 0)),  # rstart
          pl.BlockSpec((None, max_pages), lambda b, h, c: (b, 0)),  # pages
          pl.BlockSpec((None, r_pad), lambda b, h, c: (b, 0)),  # pos
          pl.BlockSpec((None, None, r_pad), lambda b, h, c: (b, h, 0)),  # lse
          pl.BlockSpec((None, None, r_pad, head_dim),
                       lambda b, h, c: (b, h, 0, 0)),  # q rows
          pool_spec(k_flat),  # whole k pool (row layer * K + h is read)
      ],
      out_specs=pl.BlockSpec((None, None, heads_p, block_k),
                             lambda b, h, c: (b, h, 0, c)),
      out_shape=jax.ShapeDtypeStruct(
          (batch, n_kv, heads_p, n_cblk * block_k), jnp.float32),
      compiler_params=_compat.triton_params(num_warps, num_stages),
      interpret=interpret,
      name="sparsex_sparse_q_importance",
  )(layer_arr, kv_len.astype(jnp.int32), n_sp * group, rstart,
    page_table.astype(jnp.int32), pos_r, lse_r, qr, k_flat)
  return jnp.sum(per_head[:, :, :group, :n_keys], axis=(1, 2))
