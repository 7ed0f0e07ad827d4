"""Grouped matmul, the experts of a mixture-of-experts FFN: the rows of lhs are sorted by group
and each group's rows are multiplied by that group's own matrix.

    out[r] = lhs[r] @ rhs[g]   for rows r in [sum(group_sizes[:g]), sum(group_sizes[:g + 1]))
    rows r >= sum(group_sizes): unspecified (callers mask them: models/moe.py does)

grouped_matmul: jax's Mosaic GPU kernel for Hopper (jax.experimental.pallas.ops.gpu.
ragged_dot_mgpu: one persistent program per SM walks (row block, column block) tiles, TMA loads,
wgmma; a row block that straddles a group boundary is computed once for each group in it, which is
why it runs up to cdiv(M, block_m) + G - 1 row tiles). It reads each expert's weights only for the
rows routed to it and builds nothing of size M x G.
grouped_matmul_reference: jax.lax.ragged_dot as XLA lowers it. On the CPU that is a plain loop; on
the GPU jax 0.10-0.11 lower it by zero-padding every row over all G groups (G times the FLOPs and
an [M, G x K] operand: 12 GB at an 8K prefill of Qwen3-30B-A3B, out of memory on an H100,
docs/MODELS.md), which is why the kernel exists.

supports(lhs, rhs) says whether the kernel runs these inputs here; pallas_kernels/ops.py picks.
"""

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _compat

# Tile shapes: wgmma needs row blocks of 64 or 128; 128 columns and 64-deep k steps (one 128-byte
# swizzled bf16 row) as jax's own benchmark of the kernel uses.
BLOCK_N = 128
BLOCK_K = 64


def supports(lhs, rhs) -> bool:
  """A Hopper GPU, bf16 or f16 operands of one dtype, K a multiple of BLOCK_K and N of BLOCK_N."""
  _, k = lhs.shape
  _, k2, n = rhs.shape
  return (lhs.dtype in (jnp.bfloat16, jnp.float16) and rhs.dtype == lhs.dtype and k == k2
          and k % BLOCK_K == 0 and n % BLOCK_N == 0 and _compat.mosaic_gpu_available())


def block_rows(m: int, groups: int) -> int:
  """128-row blocks when the groups are large enough to fill them; 64 (wgmma's smallest) when
  most groups hold a few rows (a decode step: every row block is mostly one group's few rows)."""
  return 128 if m >= 128 * groups else 64


@functools.partial(jax.jit, static_argnames=("block_m", "max_concurrent_steps"))
def grouped_matmul(lhs, rhs, group_sizes, *, block_m=None, max_concurrent_steps=4):
  """lhs [M, K] (rows sorted by group), rhs [G, K, N], group_sizes [G] -> [M, N] in lhs.dtype."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  m = lhs.shape[0]
  block_m = block_m or block_rows(m, rhs.shape[0])
  padded = -(-m // block_m) * block_m  # whole row blocks: the last TMA load stays in bounds
  if padded != m:
    lhs = jnp.pad(lhs, ((0, padded - m), (0, 0)))
  out = ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes.astype(jnp.int32),
                                   block_m=block_m, block_n=BLOCK_N, block_k=BLOCK_K,
                                   max_concurrent_steps=max_concurrent_steps, grid_block_n=1)
  return out[:m]


def grouped_matmul_reference(lhs, rhs, group_sizes):
  """The same product through jax.lax.ragged_dot (XLA's lowering)."""
  return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
