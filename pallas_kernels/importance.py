"""Sparse-Q importance: per-key attention mass of the Sparse-Q rows. Reference and kernel.

importance[b, j] = reduce over query heads n (sum or max) of
    sum over rows t with q_is_sparse[b, t] of exp(s[b, t, n, j] - lse[b, t, n]),
where s are the scaled logits and lse comes from the attention pass (so the
probabilities are exact, normalised over all visible keys). Masked keys
(j > q_pos or j >= kv_len) contribute 0.

Determinism: no float atomics, no scatter-add. The kernel owns one block of
keys per program and loops over the query rows itself, so every output element
is written by exactly one program in a fixed order; the head reduction is a
plain jnp reduce over a [B, N, L] array afterwards.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels.attention import gather_kv, key_rows, visibility

_LOG2E = math.log2(math.e)


def _reduce_heads(per_head, head_reduce, axis):
  if head_reduce == "sum":
    return jnp.sum(per_head, axis=axis)
  if head_reduce == "max":
    return jnp.max(per_head, axis=axis)
  raise ValueError(f"head_reduce must be 'sum' or 'max', got {head_reduce!r}")


@functools.partial(jax.jit, static_argnames=("sm_scale", "head_reduce"))
def sparse_q_importance_reference(q, q_pos, q_is_sparse, k_pages, page_table,
                                  kv_len, lse, *, sm_scale, head_reduce="sum"):
  """Pure-jnp Sparse-Q importance -> [B, MP*S] float32."""
  batch, n_tok, n_heads, head_dim = q.shape
  n_kv = k_pages.shape[0]
  group = n_heads // n_kv
  k = gather_kv(k_pages, page_table)  # [B, K, L, H]
  n_keys = k.shape[2]
  qg = q.reshape(batch, n_tok, n_kv, group, head_dim)
  s = jnp.einsum("BTKGH,BKLH->BKGTL", qg, k,
                 preferred_element_type=jnp.float32) * sm_scale
  lse_g = jnp.transpose(lse.reshape(batch, n_tok, n_kv, group), (0, 2, 3, 1))
  sel = q_is_sparse & (q_pos >= 0)  # [B, T]
  keep = visibility(q_pos, kv_len, n_keys) & sel[:, :, None]  # [B, T, L]
  p = jnp.where(keep[:, None, None], jnp.exp(s - lse_g[..., None]), 0.0)
  per_head = jnp.sum(p, axis=3)  # [B, K, G, L]
  return _reduce_heads(per_head.reshape(batch, n_heads, n_keys), head_reduce,
                       axis=1)


def _importance_kernel(kvlen_ref, nsp_ref, rstart_ref, pt_ref, pos_ref, lse_ref,
                       q_ref, k_ref, o_ref, *, sm_scale, block_q, block_k,
                       page_size, max_pages, group):
  """One (request b, query head n, key block c) program.

  Refs: kvlen, nsp [B]; rstart [C] (first Sparse-Q row, in compacted order,
  whose position reaches key block c); pt [MP]; pos [T_pad] and lse [T_pad]
  (compacted Sparse-Q rows of head n); q [T_pad, H]; k [P*S, H] (kv head
  n // G); o [BK].
  """
  b = pl.program_id(0)
  c = pl.program_id(2)
  kv_len = kvlen_ref[b]
  n_sp = nsp_ref[b]
  start = c * block_k
  kpos, rows = key_rows(pt_ref, start, block_k, page_size, max_pages)
  k = k_ref[rows, :]
  key_ok = kpos < kv_len
  qk_scale = sm_scale * _LOG2E

  # Rows are compacted Sparse-Q rows in ascending position order: rows before
  # rstart cannot see this key block (causal), rows from n_sp on are padding.
  first = lax.div(rstart_ref[c], block_q)
  last = jnp.where(start < kv_len, lax.div(n_sp + block_q - 1, block_q), 0)

  def body(i, acc):
    r0 = pl.multiple_of(i * block_q, block_q)
    rid = r0 + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
    pos = pos_ref[pl.ds(r0, block_q)]
    lse = lse_ref[pl.ds(r0, block_q)] * _LOG2E
    q = q_ref[pl.ds(r0, block_q), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * qk_scale
    keep = ((rid < n_sp)[:, None] & (kpos[None, :] <= pos[:, None])
            & key_ok[None, :])
    # exp2 of the masked-out entries may overflow (lse = -inf rows); the
    # where discards them before the sum.
    p = jnp.where(keep, jnp.exp2(s - lse[:, None]), 0.0)
    return acc + jnp.sum(p, axis=0)

  acc = lax.fori_loop(first, last, body, jnp.zeros((block_k,), jnp.float32))
  o_ref[...] = acc


def compact_sparse_rows(q_pos, q_is_sparse):
  """Stable order putting Sparse-Q rows first (ascending position), and their count."""
  sel = q_is_sparse & (q_pos >= 0)
  order = jnp.argsort(jnp.logical_not(sel), axis=1, stable=True)
  return order.astype(jnp.int32), jnp.sum(sel, axis=1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "head_reduce", "block_q", "block_k",
                     "num_warps", "num_stages", "interpret"))
def sparse_q_importance(q, q_pos, q_is_sparse, k_pages, page_table, kv_len, lse,
                        *, sm_scale, head_reduce="sum", block_q=64, block_k=64,
                        num_warps=4, num_stages=2, interpret=False):
  """Pallas (Triton lowering) Sparse-Q importance -> [B, MP*S] float32.

  Same contract as sparse_q_importance_reference. Grid: (request, query head,
  key block); each program loops over only the Sparse-Q rows that can see its
  keys. Outside the kernel (plain jnp, O(T) work): compact the Sparse-Q rows to
  the front, and find per key block the first row that reaches it.
  """
  batch, n_tok, n_heads, head_dim = q.shape
  n_kv, n_pages, page_size, _ = k_pages.shape
  group = n_heads // n_kv
  max_pages = page_table.shape[1]
  n_keys = max_pages * page_size
  n_cblk = _compat.cdiv(n_keys, block_k)
  block_q = min(block_q, max(16, _compat.next_pow2(n_tok)))
  t_pad = _compat.cdiv(n_tok, block_q) * block_q

  order, n_sp = compact_sparse_rows(q_pos, q_is_sparse)
  tok = jnp.arange(n_tok, dtype=jnp.int32)
  is_row = tok[None, :] < n_sp[:, None]
  pos_c = jnp.take_along_axis(q_pos.astype(jnp.int32), order, axis=1)
  pos_c = jnp.where(is_row, pos_c, -1)
  # First compacted row with position >= each key block's start.
  pos_sorted = jnp.where(is_row, pos_c, jnp.iinfo(jnp.int32).max)
  starts = jnp.arange(n_cblk, dtype=jnp.int32) * block_k
  rstart = jax.vmap(lambda p: jnp.searchsorted(p, starts, side="left"))(
      pos_sorted).astype(jnp.int32)  # [B, C]

  q_c = jnp.take_along_axis(q, order[:, :, None, None], axis=1)  # [B, T, N, H]
  q_c = jnp.transpose(q_c, (0, 2, 1, 3))  # [B, N, T, H]
  lse_c = jnp.take_along_axis(lse, order[:, :, None], axis=1)
  lse_c = jnp.transpose(lse_c, (0, 2, 1))  # [B, N, T]
  pad = t_pad - n_tok
  q_c = jnp.pad(q_c, ((0, 0), (0, 0), (0, pad), (0, 0)))
  lse_c = jnp.pad(lse_c.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
  pos_c = jnp.pad(pos_c, ((0, 0), (0, pad)), constant_values=-1)
  k_flat = k_pages.reshape(n_kv, n_pages * page_size, head_dim)

  kernel = functools.partial(
      _importance_kernel, sm_scale=sm_scale, block_q=block_q, block_k=block_k,
      page_size=page_size, max_pages=max_pages, group=group)
  per_head = pl.pallas_call(
      kernel,
      grid=(batch, n_heads, n_cblk),
      in_specs=[
          pl.BlockSpec((batch,), lambda b, n, c: (0,)),  # kv_len
          pl.BlockSpec((batch,), lambda b, n, c: (0,)),  # n_sp
          pl.BlockSpec((None, n_cblk), lambda b, n, c: (b, 0)),  # rstart
          pl.BlockSpec((None, max_pages), lambda b, n, c: (b, 0)),  # pages
          pl.BlockSpec((None, t_pad), lambda b, n, c: (b, 0)),  # pos
          pl.BlockSpec((None, None, t_pad), lambda b, n, c: (b, n, 0)),  # lse
          pl.BlockSpec((None, None, t_pad, head_dim),
                       lambda b, n, c: (b, n, 0, 0)),  # q
          pl.BlockSpec((None, n_pages * page_size, head_dim),
                       lambda b, n, c: (n // group, 0, 0)),  # k of kv head
      ],
      out_specs=pl.BlockSpec((None, None, block_k), lambda b, n, c: (b, n, c)),
      out_shape=jax.ShapeDtypeStruct((batch, n_heads, n_cblk * block_k),
                                     jnp.float32),
      compiler_params=_compat.triton_params(num_warps, num_stages),
      interpret=interpret,
      name="sparsex_sparse_q_importance",
  )(kv_len.astype(jnp.int32), n_sp, rstart, page_table.astype(jnp.int32),
    pos_c, lse_c, q_c, k_flat)
  return _reduce_heads(per_head[:, :, :n_keys], head_reduce, axis=1)
