"""What every paged-KV kernel shares: the pool's layout as the kernels see it, key rows read
through the page table, GQA row grouping, the masks and softmax statistics of the references, and
the split-and-merge of flash-decoding.

Private to pallas_kernels: each kernel module (attention, decode, importance, write, assemble,
attention_mgpu) imports this one and _compat, never a sibling kernel, so a kernel can change or go
without touching the others.
"""

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Queries are processed in chunks of this many rows so the [rows, keys] logits of a long prompt
# never materialise at once (a 4K-token prefill would otherwise hold GBs per layer on CPU).
QUERY_CHUNK = 256


# ------------------------------------------------------------------------------------------------
# The pool
# ------------------------------------------------------------------------------------------------


def gather_kv(pages, page_table):
  """Logical keys of each request: [K, P, S, H] x [B, MP] -> [B, K, MP*S, H]."""
  n_kv, _, page_size, head_dim = pages.shape
  batch, max_pages = page_table.shape
  x = pages[:, page_table]  # [K, B, MP, S, H]
  x = jnp.swapaxes(x, 0, 1)
  return x.reshape(batch, n_kv, max_pages * page_size, head_dim)



def layer_pages(pages, layer):
  """One layer [K, P, S, H] of `pages`: pages itself if layer is None, else pages[layer].

  For the references only: they are jnp, so XLA fuses the dynamic slice into the gather
  that reads the pages and nothing is copied.
  """
  return pages if layer is None else pages[layer]



def kernel_pool(pages, layer):
  """The kernels' view of the pool: ([L*K, P*S, H] rows, layer as an int32 [1] array).

  pages is one layer [K, P, S, H] (layer None, taken as L = 1, layer 0) or the whole pool
  [L, K, P, S, H]. The reshape merges contiguous axes, so it is free (a bitcast): the kernel
  gets the pool buffer itself and reads the rows layer * K + kv_head. Slicing pool[layer]
  outside the kernel instead would make XLA materialise that layer's K/V for the custom call,
  a copy of the layer's whole pool slice on every layer of every step. The layer travels as a
  [1] array (a ref) because the Triton lowering has no scalar prefetch.
  """
  if layer is None:
    pages, layer = pages[None], 0
  n_layers, n_kv, n_pages, page_size, head_dim = pages.shape
  rows = pages.reshape(n_layers * n_kv, n_pages * page_size, head_dim)
  return rows, jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))



def pool_spec(pool_rows):
  """Whole-array BlockSpec of the [L*K, P*S, H] pool view (any grid).

  The kernel picks its kv head's rows with a dynamic index (pool_row); the block is never
  loaded whole, only gathered by key rows, so its shape need not be a power of two.
  """
  return pl.BlockSpec(pool_rows.shape, lambda *_: (0,) * pool_rows.ndim)



def pool_row(layer_ref, n_kv):
  """Row of the [L*K, P*S, H] pool view for this program's kv head (grid axis 1)."""
  return layer_ref[0] * n_kv + pl.program_id(1)



def key_rows(pt_ref, start, block_k, page_size, max_pages):
  """Flat pool rows ([P*S] index) of logical keys start .. start+block_k-1.

  The page table is read with a vector index (a pointer gather in Triton);
  the index is clamped so the tail block of a request whose MP*S is not a
  multiple of block_k never reads past the table (those keys are masked by
  kv_len anyway).
  """
  kpos = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
  page_idx = jnp.minimum(lax.div(kpos, page_size), max_pages - 1)
  page = pt_ref[page_idx]
  return kpos, page * page_size + lax.rem(kpos, page_size)



# ------------------------------------------------------------------------------------------------
# References: masks, softmax statistics, query chunks
# ------------------------------------------------------------------------------------------------


def visibility(q_pos, kv_len, n_keys):
  """[B, T, L] bool: key j visible to row t iff j <= q_pos[b, t] and j < kv_len[b].

  A padding row (q_pos = -1) sees nothing, since no j <= -1.
  """
  j = jnp.arange(n_keys, dtype=jnp.int32)
  return ((j[None, None, :] <= q_pos[:, :, None])
          & (j[None, None, :] < kv_len[:, None, None]))



def masked_softmax_stats(s, vis):
  """Row max (finite, 0 where nothing is visible), row sum and lse of masked logits.

  Returns (m, l, lse) with lse = -inf for rows with no visible key; callers
  compute p = exp(s - m) / l, which is 0 (never NaN) on masked entries.
  """
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  l = jnp.sum(jnp.exp(s - m[..., None]), axis=-1)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return s, m, l, lse



def map_query_chunks(fn, q, q_pos, *extra, per_row=True):
  """Applies fn(q, q_pos, *extra) ([B, C, ...] row chunks) over T in chunks of QUERY_CHUNK.

  per_row: fn's outputs are [B, C, ...] per row, stacked back to [B, T, ...]. Otherwise fn
  returns [B, 1, ...] per chunk and the result is [B, n_chunks, ...]. Padding rows get q_pos -1.
  """
  batch, n_tok = q_pos.shape
  if n_tok <= QUERY_CHUNK:
    return fn(q, q_pos, *extra)
  pad = -n_tok % QUERY_CHUNK
  n_chunks = (n_tok + pad) // QUERY_CHUNK

  def split(x, fill):
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.swapaxes(x.reshape((batch, n_chunks, QUERY_CHUNK) + x.shape[2:]), 0, 1)

  outs = lax.map(lambda a: fn(*a), (split(q, 0), split(q_pos, -1))
                 + tuple(split(e, 0) for e in extra))
  if not per_row:
    return jax.tree.map(lambda o: jnp.swapaxes(o[:, :, 0], 0, 1), outs)
  return jax.tree.map(
      lambda o: jnp.swapaxes(o, 0, 1).reshape((batch, n_chunks * QUERY_CHUNK) + o.shape[3:])[
          :, :n_tok], outs)



# ------------------------------------------------------------------------------------------------
# Kernels: GQA rows, block sizes, key splits
# ------------------------------------------------------------------------------------------------


def group_rows(q, q_pos, n_kv, block_m):
  """[B, T, N, H] -> rows [B, K, R_pad, H] (row = token * G + head) and row positions.

  R = T * G rows are padded to a multiple of block_m with position -1.
  """
  batch, n_tok, n_heads, head_dim = q.shape
  group = n_heads // n_kv
  n_rows = n_tok * group
  r_pad = _compat.cdiv(n_rows, block_m) * block_m
  qr = q.reshape(batch, n_tok, n_kv, group, head_dim)
  qr = jnp.transpose(qr, (0, 2, 1, 3, 4)).reshape(batch, n_kv, n_rows, head_dim)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, r_pad - n_rows), (0, 0)))
  pos = jnp.repeat(q_pos.astype(jnp.int32), group, axis=1)
  pos = jnp.pad(pos, ((0, 0), (0, r_pad - n_rows)), constant_values=-1)
  return qr, pos



def ungroup_rows(x, n_tok, group):
  """Inverse of group_rows for [B, K, R_pad, ...] -> [B, T, N, ...]."""
  batch, n_kv = x.shape[:2]
  tail = x.shape[3:]
  x = x[:, :, :n_tok * group].reshape(batch, n_kv, n_tok, group, *tail)
  x = jnp.moveaxis(x, 2, 1)  # [B, T, K, G, ...]
  return x.reshape(batch, n_tok, n_kv * group, *tail)



def default_block_m(n_rows):
  """Row block: 64 rows where there are that many (fastest in the H100 sweep,
  docs/BENCHMARKS.md), never under 16 (the Triton dot minimum)."""
  return max(16, min(64, _compat.next_pow2(n_rows)))



def choose_key_splits(batch, n_kv, n_row_blocks, n_keys, block_k, target_programs=512,
                      min_split_blocks=4):
  """Key splits per row block: few query rows over many keys (naive reuse: 32 rows over 8-32K
  keys) make batch * n_kv * row blocks programs, too few to fill an H100's 132 SMs; splitting
  the keys (flash-decoding) multiplies them. Splits of at least min_split_blocks key blocks, so
  the merge stays small next to the work; 1 (no split) when the rows alone fill the GPU."""
  programs = batch * n_kv * n_row_blocks
  if programs >= target_programs:
    return 1
  max_splits = max(1, _compat.cdiv(n_keys, block_k) // min_split_blocks)
  want = _compat.next_pow2(_compat.cdiv(target_programs, programs))
  return max(1, min(want, _compat.next_pow2(max_splits + 1) // 2))



def merge_splits(acc, m, l):
  """Combine flash-decoding partials along NS -> (out, natural-log lse).

  acc [..., NS, G, H] unnormalised, m [..., NS, G] running max in log2 units,
  l [..., NS, G] running sums. Empty splits (m = -inf, l = 0) weigh 0.
  """
  m_all = jnp.max(m, axis=-2)  # [.., GP]
  m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
  w = jnp.exp2(m - m_safe[..., None, :])  # 0 for empty splits (m = -inf)
  l_all = jnp.sum(l * w, axis=-2)
  out = jnp.sum(acc * w[..., None], axis=-3)
  ok = l_all > 0
  l_safe = jnp.where(ok, l_all, 1.0)
  out = jnp.where(ok[..., None], out / l_safe[..., None], 0.0)
  lse = jnp.where(ok, (m_safe + jnp.log2(l_safe)) * LN2, -jnp.inf)
  return out, lse
