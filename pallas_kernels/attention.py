"""Sparse-query attention over the paged KV pool: pure-jnp reference and Pallas kernel.

One call serves three uses: the sparse layers (queries are an arbitrary sorted
subset of a request's positions, the active set), the full layers (all
positions) and single-token steps. Keys are all of the request's pages; a
query at absolute position p sees key j iff j <= p and j < kv_len (causal by
absolute position, not by row index, which is what jax.nn.dot_product_attention
with is_causal gets wrong for a subset of queries).

Shapes (see docs/CONTRACTS.md):
  q          [B, T, N, H]   queries (N heads)
  q_pos      [B, T] int32   absolute positions; -1 marks a padding row
  k_pages    [K, P, S, H]   one layer of the pool (K kv heads, P pages of S)
  v_pages    [K, P, S, H]   or, with `layer` given, the whole pool [L, K, P, S, H]
  layer      int32 scalar   (optional) which layer of the whole pool to use
  page_table [B, MP] int32  logical key j lives in page page_table[b, j // S]
  kv_len     [B] int32
Returns out [B, T, N, H] (q.dtype) and lse [B, T, N] float32 (natural log of
the sum of exp of the scaled logits; -inf for a row that sees no key).

Kernel layout: GQA groups are processed together. Query head n uses kv head
n // G (G = N // K), so for each (request, kv head) the G heads of all T
tokens form R = T * G rows (row r = token r // G, head r % G). A program
takes a block of BM rows against one kv head: the Q @ K^T dot is
[BM, H] x [H, BK], big enough for the tensor cores even for one head group,
and every K/V tile loaded is used by all G heads. Row blocks whose positions
are small stop early: the KV loop runs only up to the block's largest query
position, which is where a sparse-query kernel beats dense masked attention.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._paged import (LN2, LOG2E, choose_key_splits, default_block_m, gather_kv,
                                   group_rows, kernel_pool, key_rows, layer_pages,
                                   map_query_chunks, masked_softmax_stats, merge_splits,
                                   pool_row, pool_spec, ungroup_rows, visibility)

# Large finite sentinel for "no valid row" in min-reductions inside kernels.
_BIG_POS = 2**30


# ----------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------


def _attention_rows(q, q_pos, k, v, kv_len, sm_scale):
  """Attention of query rows q [B, T, N, H] over gathered keys k, v [B, K, L, H]."""
  batch, n_tok, n_heads, head_dim = q.shape
  n_kv, n_keys = k.shape[1], k.shape[2]
  group = n_heads // n_kv
  qg = q.reshape(batch, n_tok, n_kv, group, head_dim)
  s = jnp.einsum("BTKGH,BKLH->BKGTL", qg, k,
                 preferred_element_type=jnp.float32) * sm_scale
  vis = visibility(q_pos, kv_len, n_keys)[:, None, None]  # [B, 1, 1, T, L]
  s, m, l, lse = masked_softmax_stats(s, vis)
  p = jnp.exp(s - m[..., None]) / jnp.where(l > 0, l, 1.0)[..., None]
  out = jnp.einsum("BKGTL,BKLH->BTKGH", p, v.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
  out = out.reshape(batch, n_tok, n_heads, head_dim).astype(q.dtype)
  lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(batch, n_tok, n_heads)
  return out, lse


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_attention_reference(q, q_pos, k_pages, v_pages, page_table, kv_len, *,
                              sm_scale, layer=None):
  """Pure-jnp sparse-query paged attention (materialises [B, N, rows, MP*S] logits
  for chunks of QUERY_CHUNK rows).

  f32 logits and accumulation whatever q's dtype. Returns (out, lse). layer:
  None (k_pages, v_pages are one layer [K, P, S, H]) or the layer of the whole
  pool [L, K, P, S, H] to use.
  """
  k = gather_kv(layer_pages(k_pages, layer), page_table)  # [B, K, L, H]
  v = gather_kv(layer_pages(v_pages, layer), page_table)
  return map_query_chunks(
      lambda qc, pc: _attention_rows(qc, pc, k, v, kv_len, sm_scale), q, q_pos)


# ----------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------


def _attention_kernel(layer_ref, kvlen_ref, pt_ref, pos_ref, q_ref, k_ref, v_ref,
                      *out_refs, sm_scale, block_k, page_size, max_pages, n_kv,
                      num_splits=1, split_blocks=0):
  """One (request b, kv head h, block of BM rows[, key split]) program.

  Refs: layer [1]; kvlen [B]; pt [MP] (row b of the page table); pos [BM];
  q [BM, H]; k, v [L*K, P*S, H] (the whole pool, pages flattened; this program
  reads row layer * K + h). Outputs: o [BM, H], lse [BM]; or, with key splits
  (num_splits > 1: program i of grid axis 2 takes split i % num_splits, the
  key blocks [s * split_blocks, (s + 1) * split_blocks)), the partials acc
  [BM, H] (unnormalised f32), m [BM] (running max, log2 units), l [BM], merged
  afterwards as in flash-decoding.
  """
  b = pl.program_id(0)
  kv_row = pool_row(layer_ref, n_kv)
  kv_len = kvlen_ref[b]
  pos = pos_ref[...]
  valid = pos >= 0
  q = q_ref[...]
  # Padding rows may hold anything; zero them so they stay finite.
  q = jnp.where(valid[:, None], q, jnp.zeros_like(q))
  # Fold log2(e) into the scale: exp2 is the cheap instruction.
  qk_scale = sm_scale * LOG2E

  # Keys [0, n_full * BK) are visible to every valid row of the block (no
  # mask needed); keys up to the block's largest position need the causal
  # mask; keys beyond it are never loaded.
  max_pos = jnp.max(pos)
  min_pos = jnp.min(jnp.where(valid, pos, _BIG_POS))
  hi = jnp.maximum(jnp.minimum(max_pos + 1, kv_len), 0)
  n_total = lax.div(hi + block_k - 1, block_k)
  n_full = jnp.minimum(lax.div(jnp.minimum(min_pos + 1, kv_len), block_k), n_total)
  first = 0
  if num_splits > 1:  # this program's key blocks only (possibly none: a split past the rows)
    first = lax.rem(pl.program_id(2), num_splits) * split_blocks
    n_total = jnp.minimum(n_total, first + split_blocks)
    n_full = jnp.maximum(jnp.minimum(n_full, n_total), first)

  block_m, head_dim = q.shape

  def body(i, carry, masked):
    acc, m_i, l_i = carry
    kpos, rows = key_rows(pt_ref, i * block_k, block_k, page_size, max_pages)
    k = k_ref[kv_row, rows, :]
    v = v_ref[kv_row, rows, :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * qk_scale
    if masked:
      vis = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < kv_len)
      s = jnp.where(vis, s, -jnp.inf)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
    # A row with nothing visible yet keeps m = -inf; shift by 0 instead so
    # exp2 gives 0, not NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m_i - m_safe)
    p = jnp.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i

  # Accumulators start from explicit zeros (interpret-mode outputs are NaN).
  carry = (jnp.zeros((block_m, head_dim), jnp.float32),
           jnp.full((block_m,), -jnp.inf, jnp.float32),
           jnp.zeros((block_m,), jnp.float32))
  carry = lax.fori_loop(first, n_full, functools.partial(body, masked=False), carry)
  carry = lax.fori_loop(n_full, n_total, functools.partial(body, masked=True),
                        carry)
  acc, m_i, l_i = carry
  ok = valid & (l_i > 0)
  if num_splits > 1:  # padding rows saw the unmasked blocks: drop them from the partials
    acc_ref, m_ref, l_ref = out_refs
    acc_ref[...] = jnp.where(ok[:, None], acc, 0.0)
    m_ref[...] = jnp.where(ok, m_i, -jnp.inf)
    l_ref[...] = jnp.where(ok, l_i, 0.0)
    return
  o_ref, lse_ref = out_refs
  l_safe = jnp.where(ok, l_i, 1.0)
  out = jnp.where(ok[:, None], acc / l_safe[:, None], 0.0)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_m", "block_k", "num_warps", "num_stages",
                     "longest_first", "key_splits", "interpret"))
def paged_attention(q, q_pos, k_pages, v_pages, page_table, kv_len, *, sm_scale,
                    layer=None, block_m=None, block_k=64, num_warps=None,
                    num_stages=2, longest_first=True, key_splits=None, interpret=False):
  """Pallas (Triton lowering) sparse-query paged attention. Returns (out, lse).

  Same contract as paged_attention_reference. block_m: rows (tokens x group
  heads) per program, a power of two >= 16 (default: up to 64). block_k:
  keys per inner step, a power of two >= 16. longest_first: launch the row
  blocks with the largest positions (the longest KV loops) first, so the
  causal triangle does not end on a tail of long programs. layer: None
  (k_pages, v_pages are one layer [K, P, S, H]) or the layer of the whole
  pool [L, K, P, S, H] to read, selected inside the kernel (no copy).
  key_splits: key ranges per row block, merged afterwards (None: choose_key_splits, which splits
  only when there are too few row blocks to fill the GPU; 1: never).
  """
  batch, n_tok, n_heads, head_dim = q.shape
  n_kv, _, page_size, _ = k_pages.shape[-4:]
  group = n_heads // n_kv
  max_pages = page_table.shape[1]
  if block_m is None:
    block_m = default_block_m(n_tok * group)
  if num_warps is None:
    num_warps = 8 if block_m >= 128 else 4
  qr, pos = group_rows(q, q_pos, n_kv, block_m)
  r_pad = qr.shape[2]
  k_flat, layer_arr = kernel_pool(k_pages, layer)
  v_flat, _ = kernel_pool(v_pages, layer)

  n_blk = r_pad // block_m
  n_keys = max_pages * page_size
  if key_splits is None:
    key_splits = choose_key_splits(batch, n_kv, n_blk, n_keys, block_k)
  split_blocks = _compat.cdiv(_compat.cdiv(n_keys, block_k), key_splits)
  kernel = functools.partial(_attention_kernel, sm_scale=sm_scale,
                             block_k=block_k, page_size=page_size,
                             max_pages=max_pages, n_kv=n_kv, num_splits=key_splits,
                             split_blocks=split_blocks)
  # The last grid axis is the slowest-varying in the Triton launch order; with key splits it
  # runs over (row block, split) pairs, the splits of one row block side by side.
  blk = ((lambda i: n_blk - 1 - i // key_splits) if longest_first
         else (lambda i: i // key_splits))
  grid = (batch, n_kv, n_blk * key_splits)
  if key_splits > 1:  # per-split partials: acc [.., NS, R, H] (f32), running max and sum
    split = lambda i: i % key_splits  # noqa: E731
    row_block = lambda b, h, i: (b, h, split(i), blk(i))  # noqa: E731
    out_specs = [pl.BlockSpec((None, None, None, block_m, head_dim),
                              lambda b, h, i: row_block(b, h, i) + (0,)),
                 pl.BlockSpec((None, None, None, block_m), row_block),
                 pl.BlockSpec((None, None, None, block_m), row_block)]
    out_shape = [jax.ShapeDtypeStruct((batch, n_kv, key_splits, r_pad, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, n_kv, key_splits, r_pad), jnp.float32),
                 jax.ShapeDtypeStruct((batch, n_kv, key_splits, r_pad), jnp.float32)]
  else:  # the normalised output and lse directly
    out_specs = [pl.BlockSpec((None, None, block_m, head_dim), lambda b, h, i: (b, h, blk(i), 0)),
                 pl.BlockSpec((None, None, block_m), lambda b, h, i: (b, h, blk(i)))]
    out_shape = [jax.ShapeDtypeStruct((batch, n_kv, r_pad, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, n_kv, r_pad), jnp.float32)]
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, i: (0,)),  # layer
          pl.BlockSpec((batch,), lambda b, h, i: (0,)),  # kv_len
          pl.BlockSpec((None, max_pages), lambda b, h, i: (b, 0)),  # page table
          pl.BlockSpec((None, block_m), lambda b, h, i: (b, blk(i))),  # pos
          pl.BlockSpec((None, None, block_m, head_dim),
                       lambda b, h, i: (b, h, blk(i), 0)),  # q rows
          pool_spec(k_flat),  # whole k pool (row layer * K + h is read)
          pool_spec(v_flat),  # whole v pool
      ],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compat.triton_params(num_warps, num_stages),
      interpret=interpret,
      name="sparsex_paged_attention" + ("_split" if key_splits > 1 else ""),
  )(layer_arr, kv_len.astype(jnp.int32), page_table.astype(jnp.int32), pos, qr,
    k_flat, v_flat)
  if key_splits > 1:
    out, lse = merge_splits(*outs)  # [B, K, R_pad, H], [B, K, R_pad]
    out = out.astype(q.dtype)
  else:
    out, lse = outs
  return ungroup_rows(out, n_tok, group), ungroup_rows(lse, n_tok, group)
