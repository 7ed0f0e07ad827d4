"""Sparse-query paged attention with Mosaic GPU (Hopper: wgmma, TMA, warp specialisation).

Same contract as attention.paged_attention (and its reference, attention.paged_attention_reference):
queries are an arbitrary subset of a request's positions, a query at position p sees keys
j <= p, j < kv_len, keys live in the paged pool. Returns (out [B, T, N, H], lse [B, T, N] f32).

Why a second kernel: the Triton lowering caps the sparse-query kernel near half of cuDNN's dense
rate per useful FLOP (docs/BENCHMARKS.md): no TMA, no asynchronous wgmma, no overlap of the
softmax of one row block with the matmuls of another. This kernel is built the FlashAttention-3
way, the way jax's own dense attention_mgpu reaches cuDNN parity:

- GQA rows packed: for one (request, kv head) the G query heads of every token form the rows, so
  each K/V tile loaded serves all G heads. Where G gives each head 8+ of a warpgroup's 64 rows
  (G = 1, 2, 4, 8) the rows are read from q's own [B, T, N, H] layout, one TMA copy per head
  (token-major); otherwise they are grouped around the kernel as in the Triton kernel
  (_paged.group_rows, a transpose of q and of the output).
- One CUDA block takes 2 * block_q rows in two consumer warpgroups (block_q = 64, one wgmma M)
  and a producer warpgroup that streams K/V pages into a ring of shared-memory slots with TMA;
  the consumers alternate (a schedule barrier) so one warpgroup's softmax overlaps the other's
  matmuls.
- Keys come straight from the pages: a block of block_kv keys is block_kv / page_size TMA copies
  of one page each, all landing on one barrier (it expects that many arrivals). The request's
  page table is copied to shared memory first, so the producer's page lookups are cheap.
- Each warpgroup's KV loop stops at its rows' largest position (the sparse-query saving); blocks
  below its smallest position need no mask. Both are computed outside the kernel (row_tiles).
  A warpgroup that finishes early still releases the slots the other one needs.
- Few rows over many keys (naive's 32 rows, 5% of 8K) leave SMs idle: the keys are then split
  over several programs per row block, each writes its normalised part and lse, and
  merge_key_splits combines them (flash-decoding).

Hopper only (sm_90a); attention.paged_attention (Triton) stays the fallback everywhere else.
Mosaic GPU's interpret mode in jax 0.10 has no wgmma, so on CPU the tests lower this kernel for
CUDA (a structural check); the GPU tests compare it with the reference.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._paged import (LN2, LOG2E, choose_key_splits, group_rows, kernel_pool,
                                   ungroup_rows)

# The running max starts finite so a row that sees nothing in a block never makes
# exp2(-inf - -inf) = NaN; every real scaled logit is far above it.
_M_INIT = -1e30
_CONSUMERS = 2  # compute warpgroups per block
# The page table travels as rows of this many entries: one TMA copy moves at most 256 per axis.
_PT_ROW = 128
_MAX_PT_ROWS = 256
_SMEM_LIMIT = 227 * 1024  # shared memory one block may take on sm_90
# Keys per step: 128 was the fastest of (64, 2 slots), (64, 3), (128, 2) at every 8K-32K,
# 5-30% problem on the H100 (docs/BENCHMARKS.md).
DEFAULT_BLOCK_KV = 128
# Key splits are added until about this many programs, about 4 waves of the H100's 132 SMs (one
# block per SM: its shared memory is taken), so the causal triangle's long row blocks are shared
# out instead of finishing alone.
_TARGET_PROGRAMS = 512


def available() -> bool:
  """Whether this process can run Mosaic GPU kernels (_compat.mosaic_gpu_available)."""
  return _compat.mosaic_gpu_available()


def supports(q, k_pages, page_table, block_kv=None) -> bool:
  """Whether paged_attention_mgpu runs these inputs here (else: the Triton kernel).

  A Hopper GPU; bf16/f16; head dim a multiple of 64 (one 128-byte swizzled row per 64 values);
  pages that tile a key block; a page table the kernel's shared-memory copy holds.
  """
  block_kv = block_kv or DEFAULT_BLOCK_KV
  page_size, head_dim = k_pages.shape[-2], k_pages.shape[-1]
  if block_kv % page_size:
    return False
  pt_rows = page_table_rows(page_table.shape[1], block_kv // page_size)
  return (q.dtype in (jnp.bfloat16, jnp.float16) and k_pages.dtype == q.dtype
          and head_dim % 64 == 0 and pt_rows <= _MAX_PT_ROWS
          and smem_bytes(head_dim, 64, block_kv, 2, pt_rows) <= _SMEM_LIMIT and available())


def page_table_rows(max_pages, pages_per_block):
  """Rows of _PT_ROW entries holding a page table padded to whole key blocks."""
  unit = math.lcm(pages_per_block, _PT_ROW)
  return _compat.cdiv(max_pages, unit) * (unit // _PT_ROW)


def split_steps(steps, full, first, split_blocks):
  """A warpgroup's KV blocks within one key split -> (full_end, last).

  steps, full: the tile's row_tiles entry (blocks [0, steps) are read, [0, full) need no mask);
  the split takes blocks [first, first + split_blocks). The warpgroup then runs [first, full_end)
  unmasked and [full_end, last) masked; both are empty when the split starts past its blocks
  (last <= first). Works on Python/numpy integers and on the kernel's traced scalars alike.
  """
  last = jnp.minimum(steps, first + split_blocks)
  return jnp.clip(full, first, jnp.maximum(last, first)), last


def token_major_positions(pos, group, block_q):
  """[B, T] token positions (T a multiple of block_q // group) -> [B, T * G] row positions in the
  token-major kernel's order: each block of block_q rows holds block_q // G tokens of each of the
  G heads, head-major (row = head * (block_q // G) + token)."""
  batch = pos.shape[0]
  per_head = pos.reshape(batch, -1, 1, block_q // group)  # [B, blocks, 1, tokens]
  rows = jnp.broadcast_to(per_head, (batch, per_head.shape[1], group, per_head.shape[3]))
  return rows.reshape(batch, -1)


def row_tiles(pos, block_q, block_kv):
  """Per warpgroup tile of block_q rows: [B, n_tiles, 2] int32 (kv steps, unmasked kv steps).

  pos [B, R_pad] are the rows' effective positions (-1: padding). A tile's KV loop runs over
  cdiv(max pos + 1, block_kv) blocks; the first (min valid pos + 1) // block_kv of them hold only
  keys every valid row of the tile sees, so they skip the mask.
  """
  batch, r_pad = pos.shape
  tiles = pos.reshape(batch, r_pad // block_q, block_q)
  valid = tiles >= 0
  hi = jnp.max(tiles, axis=2) + 1  # 0 for an all-padding tile
  lo = jnp.min(jnp.where(valid, tiles, jnp.iinfo(jnp.int32).max), axis=2)
  steps = (hi + block_kv - 1) // block_kv
  full = jnp.where(jnp.any(valid, axis=2), jnp.minimum((lo + 1) // block_kv, steps), 0)
  return jnp.stack([steps, full], axis=2).astype(jnp.int32)


def _load(plgpu, ref, layout):
  """The whole ref as an array in layout (jax 0.11 deprecates the separate index of 0.10)."""
  try:
    return plgpu.load(ref, layout=layout, optimized=False)
  except TypeError:  # jax 0.10: the index is a required argument
    return plgpu.load(ref, (), layout=layout, optimized=False)


def _transposed(plgpu, ref):
  """ref viewed as its 2-D transpose (jax 0.11: ref.transpose; 0.10: plgpu.transpose_ref)."""
  if hasattr(ref, "transpose"):
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))


def _kernel(layer_ref, tiles_ref, pt_ref, pos_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
            scoped, *, sm_scale, block_q, block_kv, page_size, n_kv, n_prog, n_slots, dtype,
            key_splits, split_blocks, group):
  """One (kv head, request, block of 2 * block_q rows) program; see the module docstring.

  group: None when q comes grouped ([B, K, R_pad, H], _paged.group_rows, row = token * G +
  head); else G, and q, out keep their own [B, T_pad, N, H] layout: a warpgroup's 64 rows are
  block_q / G tokens of each of the G heads, head-major (row = head * (block_q / G) + token), one
  TMA copy per head in and out, so no transposes run around the kernel. lse is then [B, N, T_pad].

  Refs (GMEM): layer [1]; tiles [B, n_tiles, 2]; pt [B, MP / 128, 128]; pos [B, R_pad];
  q [B, K, R_pad, H]; k, v [L*K, P*S, H] (the whole pool, pages flattened; row
  layer * K + kv head is read).
  Outputs: out [B, K, R_pad, H] (dtype), lse [B, K, R_pad] f32 (natural log); with key splits
  (grid axis "tile" runs over (row block, split) pairs; split s takes the key blocks
  [s * split_blocks, (s + 1) * split_blocks)) each split's normalised out [B, K, NS, R_pad, H]
  and lse [B, K, NS, R_pad], merged by merge_key_splits.
  """
  import jax.experimental.pallas.mosaic_gpu as plgpu

  (q_smem2, k_smem, v_smem, pos_smem2, lse_smem2, pt_smem), barriers = scoped[:6], scoped[6:]
  (k_ready, v_ready, q_ready, pt_ready, k_free, v_free, schedule) = barriers
  head = lax.axis_index("kv_head")
  b = lax.axis_index("batch")
  # The row blocks with the largest positions (the longest KV loops) launch first; the key
  # splits of one row block side by side.
  prog = n_prog - 1 - lax.div(lax.axis_index("tile"), key_splits)
  first = lax.rem(lax.axis_index("tile"), key_splits) * split_blocks  # this split's first block
  wg = lax.axis_index("wg")
  pages_per_block = block_kv // page_size
  kv_row = layer_ref[0] * n_kv + head
  head_dim = q_ref.shape[-1]
  # Blocks [first, prog_last) are fetched: the longer of the two warpgroups' ranges.
  prog_last = jnp.minimum(jnp.maximum(tiles_ref[b, 2 * prog, 0], tiles_ref[b, 2 * prog + 1, 0]),
                          first + split_blocks)
  split = () if key_splits == 1 else (lax.rem(lax.axis_index("tile"), key_splits),)
  tokens = None if group is None else block_q // group  # per head in a warpgroup's rows
  qk_scale = sm_scale * LOG2E

  def schedule_sync():
    plgpu.barrier_arrive(schedule)
    plgpu.barrier_wait(schedule)

  @pl.when(wg < _CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(232, action="increase")
    q_smem, pos_smem, lse_smem = q_smem2.at[wg], pos_smem2.at[wg], lse_smem2.at[wg]
    tile = 2 * prog + wg
    base = tile * block_q
    # This split's blocks: [first, full) unmasked, [full, last) masked.
    full, last = split_steps(tiles_ref[b, tile, 0], tiles_ref[b, tile, 1], first, split_blocks)
    if group is None:
      plgpu.copy_gmem_to_smem(q_ref.at[b, head, pl.ds(base, block_q)], q_smem, q_ready.at[wg])
    else:
      for g in range(group):
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(tile * tokens, tokens), head * group + g],
                                q_smem.at[pl.ds(g * tokens, tokens)], q_ready.at[wg])
    plgpu.copy_gmem_to_smem(pos_ref.at[b, pl.ds(base, block_q)], pos_smem, q_ready.at[wg])
    plgpu.barrier_wait(q_ready.at[wg])
    pos = _load(plgpu, pos_smem, plgpu.Layout.WGMMA.reduce(1))

    m_i = plgpu.layout_cast(jnp.full((block_q,), _M_INIT, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
    l_i = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
    acc = plgpu.layout_cast(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

    @pl.when(last > first)
    def _():
      plgpu.barrier_wait(k_ready.at[0])

    pl.when(wg == 1)(schedule_sync)

    def kv_step(step, carry, masked):
      acc, m_i, l_i = carry
      slot = lax.rem(step - first, n_slots)

      def qk_matmul(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, _transposed(plgpu, k_smem.at[slot]))
        schedule_sync()
        return acc_ref[...]
      s = pl.run_scoped(qk_matmul, plgpu.ACC((block_q, block_kv), jnp.float32))
      plgpu.barrier_arrive(k_free.at[slot])
      if masked:
        key = plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1,
                                     layout=plgpu.Layout.WGMMA) + step * block_kv
        s = jnp.where(key <= lax.broadcast_in_dim(pos, s.shape, [0]), s, -jnp.inf)
      # Base-2 softmax with the scale folded into one FMA per logit.
      m_new = jnp.maximum(m_i, s.max(axis=1) * qk_scale)
      alpha = jnp.exp2(m_i - m_new)
      p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l_i = l_i * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
      plgpu.barrier_arrive(schedule)  # softmax done: the other warpgroup may use the cores
      plgpu.barrier_wait(v_ready.at[slot])
      plgpu.barrier_wait(schedule)

      def pv_matmul(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        nxt = step + 1

        @pl.when(nxt < last)
        def _():
          plgpu.barrier_wait(k_ready.at[lax.rem(nxt - first, n_slots)])
      acc = pl.run_state(pv_matmul)(plgpu.ACC.init(acc))
      plgpu.barrier_arrive(v_free.at[slot])
      return acc, m_new, l_i

    def release_step(step, _):
      # Steps only the other warpgroup needs: free their slots and keep the schedule in step.
      slot = lax.rem(step - first, n_slots)
      plgpu.barrier_arrive(k_free.at[slot])
      plgpu.barrier_arrive(v_free.at[slot])
      schedule_sync()
      schedule_sync()

    carry = (acc, m_i, l_i)
    carry = lax.fori_loop(first, full, functools.partial(kv_step, masked=False), carry)
    carry = lax.fori_loop(full, last, functools.partial(kv_step, masked=True), carry)
    lax.fori_loop(jnp.maximum(last, first), prog_last, release_step, None)
    acc, m_i, l_i = carry
    pl.when(wg == 0)(schedule_sync)

    # Padding rows (pos -1) ran the unmasked blocks: zero them and give them lse -inf, as a
    # row with no key in this split (l = 0).
    valid = (pos >= 0) & (l_i > 0)
    inv_l = jnp.where(valid, 1.0 / jnp.where(l_i > 0, l_i, 1.0), 0.0)
    q_smem[...] = (acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])).astype(dtype)
    lse_smem[...] = jnp.where(valid, (m_i + jnp.log2(jnp.where(l_i > 0, l_i, 1.0))) * LN2,
                              -jnp.inf)
    plgpu.commit_smem()
    if group is None:
      plgpu.copy_smem_to_gmem(q_smem, out_ref.at[(b, head) + split + (pl.ds(base, block_q),)])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[(b, head) + split + (pl.ds(base, block_q),)])
    else:
      for g in range(group):
        rows, toks = pl.ds(g * tokens, tokens), pl.ds(tile * tokens, tokens)
        plgpu.copy_smem_to_gmem(q_smem.at[rows],
                                out_ref.at[(b,) + split + (toks, head * group + g)])
        plgpu.copy_smem_to_gmem(lse_smem.at[rows],
                                lse_ref.at[(b,) + split + (head * group + g, toks)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _CONSUMERS)
  def _producer():
    plgpu.set_max_registers(40, action="decrease")
    plgpu.copy_gmem_to_smem(pt_ref.at[b], pt_smem, pt_ready.at[0])
    plgpu.barrier_wait(pt_ready.at[0])

    def page_of(j):
      return pt_smem[lax.div(j, _PT_ROW), lax.rem(j, _PT_ROW)]

    def fetch(step, slot):
      for i in range(pages_per_block):
        page = page_of(step * pages_per_block + i)
        rows = pl.ds(page * page_size, page_size)
        dst = pl.ds(i * page_size, page_size)
        plgpu.copy_gmem_to_smem(k_ref.at[kv_row, rows], k_smem.at[slot, dst], k_ready.at[slot])
      for i in range(pages_per_block):
        page = page_of(step * pages_per_block + i)
        rows = pl.ds(page * page_size, page_size)
        dst = pl.ds(i * page_size, page_size)
        plgpu.copy_gmem_to_smem(v_ref.at[kv_row, rows], v_smem.at[slot, dst], v_ready.at[slot])

    for i in range(n_slots):
      pl.when(first + i < prog_last)(functools.partial(fetch, first + i, i))

    @pl.loop(first + n_slots, jnp.maximum(prog_last, first + n_slots))
    def _(step):
      slot = lax.rem(step - first, n_slots)
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      fetch(step, slot)


def merge_key_splits(out, lse, axis=2):
  """Per-split normalised out [..., NS, ..., H] and lse (out's shape without H) f32, the splits
  on `axis` -> out (f32) and lse without that axis: out = sum_s exp(lse_s - lse) out_s with
  lse = logsumexp_s lse_s. A split that saw no key of a row has lse_s = -inf (weight 0); a row no
  split saw keeps lse -inf and out 0."""
  top = jnp.max(lse, axis=axis, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  w = jnp.exp(lse - top)  # 0 where lse_s = -inf
  total = jnp.sum(w, axis=axis)
  out = out.astype(jnp.promote_types(out.dtype, w.dtype))
  merged = jnp.sum(w[..., None] * out, axis=axis) / jnp.where(total > 0, total, 1.0)[..., None]
  safe = jnp.where(total > 0, total, 1.0)
  return merged, jnp.where(total > 0, jnp.squeeze(top, axis) + jnp.log(safe), -jnp.inf)


def parse_configs(text):
  """Kernel options as text, "block_kv:n_slots:key_splits:token_major,..." ("auto": the kernel's
  own choice, None) -> ((block_kv, n_slots, key_splits, token_major), ...); what
  scripts/bench_kernels.py --mgpu-configs times."""
  flag = {"1": True, "0": False, "true": True, "false": False, "auto": None}
  configs = []
  for item in text.split(","):
    fields = item.strip().split(":")
    try:
      block_kv, n_slots, splits, major = fields
      configs.append((int(block_kv), int(n_slots), None if splits == "auto" else int(splits),
                      flag[major.lower()]))
    except (ValueError, KeyError):
      raise ValueError(f"kernel config {item!r}: want block_kv:n_slots:key_splits:token_major, "
                       "e.g. 128:2:auto:auto or 128:2:4:0") from None
  return tuple(configs)


def smem_bytes(head_dim, block_q, block_kv, n_slots, pt_rows, itemsize=2) -> int:
  """Shared memory the kernel allocates (the H100 gives a block at most 227 KiB)."""
  tiles = (_CONSUMERS * block_q + 2 * n_slots * block_kv) * head_dim * itemsize
  return tiles + _CONSUMERS * block_q * 8 + pt_rows * _PT_ROW * 4 + 1024  # + barriers


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_kv", "n_slots",
                                             "key_splits", "token_major", "interpret"))
def paged_attention_mgpu(q, q_pos, k_pages, v_pages, page_table, kv_len, *, sm_scale,
                         layer=None, block_q=64, block_kv=DEFAULT_BLOCK_KV, n_slots=2,
                         key_splits=None, token_major=None, interpret=False):
  """Mosaic GPU sparse-query paged attention; same contract as attention.paged_attention.

  block_q: rows per consumer warpgroup (64, one wgmma M). block_kv: keys per step, a multiple of
  the page size and of 64. n_slots: K/V shared-memory slots in flight (>= 2). layer: None (one
  layer [K, P, S, H]) or the layer of the whole pool [L, K, P, S, H], read inside the kernel.
  key_splits: key ranges per row block, merged afterwards (None: _paged.choose_key_splits,
  which splits only when the row blocks alone leave the GPU's SMs idle; 1: never).
  token_major: read q and write out in their own [B, T, N, H] layout, one TMA copy per head
  (None: wherever the group G of query heads per kv head gives each head 8 or more of a
  warpgroup's 64 rows: G in 1, 2, 4, 8); else the rows are grouped around the kernel
  (_paged.group_rows: a transpose of q and one of the output).
  """
  del interpret  # Mosaic GPU's interpret mode lacks wgmma in jax 0.10; see the module docstring
  import jax.experimental.pallas.mosaic_gpu as plgpu

  batch, n_tok, n_heads, head_dim = q.shape
  n_kv, _, page_size, _ = k_pages.shape[-4:]
  group = n_heads // n_kv
  if block_kv % page_size or block_kv % 64 or block_q != 64 or n_slots < 2:
    raise ValueError(f"block_kv={block_kv} must be a multiple of the page size {page_size} and "
                     f"of 64, block_q={block_q} must be 64, n_slots={n_slots} >= 2")
  if head_dim % 64 or q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"needs head_dim a multiple of 64 and bf16/f16, got {head_dim}, {q.dtype}")
  pages_per_block = block_kv // page_size
  # Effective positions: j <= p and j < kv_len is j <= min(p, kv_len - 1).
  eff = jnp.where(q_pos >= 0, jnp.minimum(q_pos, kv_len[:, None] - 1), -1).astype(jnp.int32)
  # TMA moves whole 8-row tiles of the swizzled shared memory: each head needs 8 rows or more.
  can_token_major = block_q % group == 0 and block_q // group >= 8
  if token_major is None:
    token_major = can_token_major
  elif token_major and not can_token_major:
    raise ValueError(f"token_major needs {group} query heads per kv head to divide {block_q} "
                     "into tiles of 8 rows or more")
  if token_major:
    tokens = _CONSUMERS * block_q // group  # per program
    t_pad = _compat.cdiv(n_tok, tokens) * tokens
    qr = jnp.pad(q, ((0, 0), (0, t_pad - n_tok), (0, 0), (0, 0)))  # none for the engine's buckets
    eff = jnp.pad(eff, ((0, 0), (0, t_pad - n_tok)), constant_values=-1)
    pos = token_major_positions(eff, group, block_q)
    n_prog = t_pad // tokens
  else:
    qr, pos = group_rows(q, eff, n_kv, _CONSUMERS * block_q)
    n_prog = qr.shape[2] // (_CONSUMERS * block_q)
  r_pad = pos.shape[1]
  tiles = row_tiles(pos, block_q, block_kv)
  # Whole key blocks of pages (the tail block reads page 0 for its masked keys), as rows of
  # _PT_ROW entries; at most 256 rows (one TMA copy), 512K keys at 16-token pages.
  max_pages = page_table.shape[1]
  pt_rows = page_table_rows(max_pages, pages_per_block)
  if pt_rows > _MAX_PT_ROWS:
    raise ValueError(f"page table of {max_pages} pages: at most {_MAX_PT_ROWS * _PT_ROW} "
                     "supported")
  pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, pt_rows * _PT_ROW - max_pages)))
  pt = pt.reshape(batch, pt_rows, _PT_ROW)
  if smem_bytes(head_dim, block_q, block_kv, n_slots, pt_rows, q.dtype.itemsize) > _SMEM_LIMIT:
    raise ValueError(f"block_kv={block_kv} x n_slots={n_slots} at head_dim {head_dim} needs more "
                     "than the 227 KiB of shared memory a block gets: fewer slots or keys")
  n_key_blocks = pt_rows * _PT_ROW // pages_per_block
  if key_splits is None:
    key_splits = choose_key_splits(batch, n_kv, n_prog, n_key_blocks * block_kv, block_kv,
                                   target_programs=_TARGET_PROGRAMS)
  split_blocks = _compat.cdiv(n_key_blocks, key_splits)
  k_flat, layer_arr = kernel_pool(k_pages, layer)
  v_flat, _ = kernel_pool(v_pages, layer)

  dtype = q.dtype
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  scratch = [
      plgpu.SMEM((_CONSUMERS, block_q, head_dim), dtype, transforms=swizzled),  # q, then out
      plgpu.SMEM((n_slots, block_kv, head_dim), dtype, transforms=swizzled),  # k ring
      plgpu.SMEM((n_slots, block_kv, head_dim), dtype, transforms=swizzled),  # v ring
      plgpu.SMEM((_CONSUMERS, block_q), jnp.int32),  # row positions
      plgpu.SMEM((_CONSUMERS, block_q), jnp.float32),  # lse
      plgpu.SMEM((pt_rows, _PT_ROW), jnp.int32),  # this request's page table
  ]
  barriers = [
      plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=n_slots),  # k_ready
      plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=n_slots),  # v_ready
      # q_ready: the q copies (one, or one per head) and the positions
      plgpu.Barrier(num_arrivals=(group if token_major else 1) + 1, num_barriers=_CONSUMERS),
      plgpu.Barrier(num_barriers=1),  # pt_ready
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=n_slots),  # k_free
      plgpu.Barrier(num_arrivals=_CONSUMERS, num_barriers=n_slots),  # v_free
      plgpu.Barrier(num_arrivals=_CONSUMERS),  # schedule
  ]
  kernel = functools.partial(
      _kernel, sm_scale=sm_scale, block_q=block_q, block_kv=block_kv, page_size=page_size,
      n_kv=n_kv, n_prog=n_prog, n_slots=n_slots, dtype=dtype, key_splits=key_splits,
      split_blocks=split_blocks, group=group if token_major else None)

  def entry(*refs):
    pl.run_scoped(lambda *scoped: kernel(*refs, scoped), *scratch, *barriers,
                  collective_axes="wg")

  splits = () if key_splits == 1 else (key_splits,)
  if token_major:
    t_pad = qr.shape[1]
    out_type = (jax.ShapeDtypeStruct((batch,) + splits + (t_pad, n_heads, head_dim), dtype),
                jax.ShapeDtypeStruct((batch,) + splits + (n_heads, t_pad), jnp.float32))
  else:
    out_type = (jax.ShapeDtypeStruct((batch, n_kv) + splits + (r_pad, head_dim), dtype),
                jax.ShapeDtypeStruct((batch, n_kv) + splits + (r_pad,), jnp.float32))
  out, lse = plgpu.kernel(
      entry,
      out_type=out_type,
      # kv heads vary fastest, then requests, then row blocks (the slowest axis, so every
      # head's longest row block starts before any shorter one).
      grid=(n_kv, batch, n_prog * key_splits),
      grid_names=("kv_head", "batch", "tile"),
      num_threads=_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
  )(layer_arr, tiles, pt, pos, qr, k_flat, v_flat)
  if token_major:
    lse = jnp.swapaxes(lse, -1, -2)  # [B, (NS,) T_pad, N]: small
    if key_splits > 1:
      out, lse = merge_key_splits(out, lse, axis=1)
      out = out.astype(dtype)
    return out[:, :n_tok], lse[:, :n_tok]
  if key_splits > 1:
    out, lse = merge_key_splits(out, lse)
    out = out.astype(dtype)
  return ungroup_rows(out, n_tok, group), ungroup_rows(lse, n_tok, group)
