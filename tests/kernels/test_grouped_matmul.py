"""The experts' grouped matmul (pallas_kernels/grouped_matmul.py).

On CPU: the dispatch (ops.grouped_matmul) against a float64 numpy loop over the groups, empty groups
and rows past the groups included; and the Mosaic GPU kernel lowered for CUDA through jax.export
at Qwen3-30B-A3B's expert shapes (prefill and decode row counts: both row block sizes), so shape
and layout mistakes fail here. On a Hopper GPU: the kernel's bf16 output against the same float64
loop (relative L2 < 1e-2), and inside the MoE FFN against XLA's ragged_dot.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import moe
from models.config import get_config
from pallas_kernels import _compat, ops
from pallas_kernels import grouped_matmul as gm

on_hopper = pytest.mark.skipif(not _compat.mosaic_gpu_available(), reason="needs a Hopper GPU")


def _problem(m, k, n, sizes, dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = rng.standard_normal((m, k)).astype(np.float32)
  rhs = (rng.standard_normal((len(sizes), k, n)) / np.sqrt(k)).astype(np.float32)
  return (jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype), jnp.asarray(sizes, jnp.int32))


def _float64(lhs, rhs, sizes):
  """Each group's rows times its matrix, in float64; rows past the groups: NaN (unspecified)."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.full((lhs.shape[0], rhs.shape[2]), np.nan)
  start = 0
  for g, size in enumerate(np.asarray(sizes)):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _rel_err(got, want):
  rows = ~np.isnan(want[:, 0])
  got = np.asarray(got, np.float64)[rows]
  return np.linalg.norm(got - want[rows]) / np.linalg.norm(want[rows])


@pytest.mark.parametrize("sizes", [(5, 0, 9, 3), (0, 0, 17, 0), (1, 1, 1, 1)])
def test_dispatch_matches_float64(sizes):
  """Rows past sum(sizes) are left out (the last case: 4 of 10 rows routed)."""
  m = max(sum(sizes), 10)
  lhs, rhs, gs = _problem(m, 24, 16, sizes, jnp.float32)
  with jax.default_matmul_precision("float32"):  # a GPU's default is TF32 (1e-3)
    got = ops.grouped_matmul(lhs, rhs, gs)
  assert _rel_err(got, _float64(lhs, rhs, gs)) < 1e-6


def test_the_kernel_is_not_chosen_where_it_cannot_run():
  lhs, rhs, _ = _problem(8, 128, 256, (8,), jnp.bfloat16)
  assert not gm.supports(lhs, rhs) or _compat.mosaic_gpu_available()
  lhs32, rhs32, _ = _problem(8, 128, 256, (8,), jnp.float32)
  assert not gm.supports(lhs32, rhs32)  # wgmma takes 16-bit operands here
  _, odd, _ = _problem(8, 128, 200, (8,), jnp.bfloat16)
  assert not gm.supports(lhs, odd)  # N not a multiple of the column block


@pytest.mark.parametrize("m", [65_536, 128])  # an 8K prefill's assignments; a decode batch's
@pytest.mark.parametrize("k,n", [(2048, 768), (768, 2048)])  # gate/up, down
def test_lowers_for_cuda(m, k, n):
  from jax import export
  groups = 128
  args = (jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
          jax.ShapeDtypeStruct((groups, k, n), jnp.bfloat16),
          jax.ShapeDtypeStruct((groups,), jnp.int32))
  exported = export.export(jax.jit(gm.grouped_matmul), platforms=("cuda",))(*args)
  assert "mosaic_gpu" in exported.mlir_module()
  assert exported.out_avals[0].shape == (m, n)


def test_row_blocks_follow_the_rows_per_group():
  assert gm.block_rows(65_536, 128) == 128 and gm.block_rows(128, 128) == 64


@on_hopper
@pytest.mark.parametrize("m,sizes_seed", [(65_536, 0), (1000, 1), (128, 2)])
def test_kernel_matches_float64_on_hopper(m, sizes_seed):
  rng = np.random.default_rng(sizes_seed)
  groups = 128
  sizes = rng.multinomial(m - 7, rng.dirichlet(np.ones(groups) * 0.5))  # 7 rows past the groups
  lhs, rhs, gs = _problem(m, 256, 384, sizes, jnp.bfloat16, seed=sizes_seed)
  got = gm.grouped_matmul(lhs, rhs, gs)
  assert got.shape == (m, 384) and got.dtype == jnp.bfloat16
  assert _rel_err(got, _float64(lhs, rhs, gs)) < 1e-2


@on_hopper
def test_moe_ffn_with_the_kernel_matches_xla_on_hopper():
  cfg = get_config("qwen3-moe-tiny", dtype="bfloat16").replace(
      d_model=256, moe_ffn_dim=128, n_experts=16, n_experts_per_token=4)
  rng = np.random.default_rng(5)
  params = {"router": jnp.asarray(rng.standard_normal((256, 16)) * 0.1, jnp.bfloat16)}
  for name, shape in (("expert_gate", (16, 256, 128)), ("expert_up", (16, 256, 128)),
                      ("expert_down", (16, 128, 256))):
    params[name] = jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[1]), jnp.bfloat16)
  hx = jnp.asarray(rng.standard_normal((300, 256)), jnp.bfloat16)
  want = np.asarray(moe.moe_ffn(hx, params, cfg), np.float64)
  got = np.asarray(moe.moe_ffn(hx, params, cfg, grouped_matmul=gm.grouped_matmul), np.float64)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
