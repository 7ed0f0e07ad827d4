"""Issue 30, round 22 candidate: a grouped matmul whose persistent loop skips the tiles that hold no rows.

jax's Mosaic GPU kernel (ragged_dot_mgpu, what pallas_kernels/grouped_matmul.py calls) has a static
grid of cdiv(M, block_m) + G - 1 row tiles: room for every row block that straddles two groups.
Each program finds its tile's group by an unrolled pass over all G group sizes, and a tile with
no rows (past the last group, or an empty group's) still runs its whole K pipeline and stores
nothing: at an 8K prefill of Qwen3-30B-A3B (65,536 rows, 128 experts, 128-row blocks) 639 tiles
for about 575 that hold rows; in a decode step (128 rows, 64-row blocks) 129 for the 80-odd
experts its tokens hit.

Here the tiles are listed before the kernel runs, by XLA, in a table of [group, row block, first
row in the block, rows] per tile (the non-empty tiles first, in group order). The kernel reads its
tile's four entries and skips the pipeline when the tile has no rows. Everything else is as the
Hopper kernel: TMA loads of [block_m, block_k] and [block_k, block_n] blocks through a pipeline,
wgmma into a float32 accumulator, and a store of the tile's rows as a ladder of power-of-two TMA
stores (TMA boxes are static; the row count is not).

    grouped_matmul(lhs [M, K] sorted by group, rhs [G, K, N], group_sizes [G]) -> [M, N]

Rows past sum(group_sizes) are unspecified. M must be a multiple of block_m (callers pad).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

H100_SMS = 132


def tile_table(group_sizes, m: int, block_m: int) -> jax.Array:
  """[4, cdiv(m, block_m) + G - 1] int32: each tile's group, row block, first row within the block
  and row count; the tiles that hold rows first (in group order), then tiles of 0 rows."""
  g_count = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first_block = starts // block_m
  last_block = jnp.maximum(ends - 1, 0) // block_m
  tiles = jnp.where(sizes > 0, last_block - first_block + 1, 0)
  tiles_end = jnp.cumsum(tiles)
  n_tiles = pl.cdiv(m, block_m) + g_count - 1
  t = jnp.arange(n_tiles, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(tiles_end, t, side="right"), g_count - 1).astype(jnp.int32)
  block = first_block[group] + t - (tiles_end - tiles)[group]
  lo = jnp.maximum(starts[group], block * block_m)
  hi = jnp.minimum(ends[group], (block + 1) * block_m)
  rows = jnp.where(t < tiles_end[-1], hi - lo, 0)
  block = jnp.where(rows > 0, block, 0)
  return jnp.stack([group, block, jnp.where(rows > 0, lo - block * block_m, 0), rows])


def _num_sms() -> int:
  try:
    device = jax.devices()[0]
    return int(getattr(device, "core_count", 0)) or H100_SMS
  except RuntimeError:
    return H100_SMS


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "steps", "num_sms"))
def grouped_matmul(lhs, rhs, group_sizes, *, block_m=128, block_n=128, block_k=64, steps=4,
                   num_sms=None):
  m, k = lhs.shape
  _, k2, n = rhs.shape
  if k != k2 or k % block_k or n % block_n or m % block_m:
    raise ValueError(f"shapes lhs {lhs.shape}, rhs {rhs.shape} do not tile by "
                     f"({block_m}, {block_n}, {block_k})")
  table = tile_table(group_sizes, m, block_m)
  n_tiles = table.shape[1]
  grid_n = n // block_n

  def body(table_gmem, lhs_gmem, rhs_gmem, out_gmem):
    @plgpu.nd_loop((n_tiles * grid_n,), collective_axes="sm")
    def _tile(info):
      tile = lax.div(info.index[0], jnp.int32(grid_n))
      ni = lax.rem(info.index[0], jnp.int32(grid_n))
      group, block = table_gmem[0, tile], table_gmem[1, tile]
      first, rows = table_gmem[2, tile], table_gmem[3, tile]

      @pl.when(rows > 0)
      def _compute():
        def accumulate(acc_ref):
          plgpu.emit_pipeline(
              lambda _, lhs_smem, rhs_smem: plgpu.wgmma(acc_ref, lhs_smem, rhs_smem),
              grid=(k // block_k,),
              in_specs=[
                  plgpu.BlockSpec((block_m, block_k), lambda kk: (block, kk), delay_release=1),
                  plgpu.BlockSpec((block_k, block_n), lambda kk: (kk, ni), delay_release=1),
              ],
              max_concurrent_steps=steps,
          )(lhs_gmem, rhs_gmem.at[group])
          return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((block_m, block_n)))

        def store(out_smem):
          out_smem[...] = acc.astype(out_smem.dtype)
          plgpu.commit_smem()
          # rows = sum of its binary digits: one static-size TMA store per set bit, largest first.
          offset, size = first, block_m
          while size:
            plgpu.copy_smem_to_gmem(
                out_smem.at[pl.ds(offset, size)],
                out_gmem.at[pl.ds(block * block_m + offset, size), pl.ds(ni * block_n, block_n)],
                predicate=(rows & size) != 0)
            offset = offset + (rows & size)
            size //= 2
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        pl.run_scoped(store, plgpu.SMEM((block_m, block_n), out_gmem.dtype))

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n), lhs.dtype), grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
  return kernel(table, lhs, rhs)
