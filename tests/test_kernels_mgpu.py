"""The Mosaic GPU sparse-query kernel (pallas_kernels/attention_mgpu.py).

On CPU: its row-tile arithmetic against a numpy count, and the kernel lowered for CUDA through
jax.export (Mosaic GPU's lowering runs in Python, so shape, layout and barrier mistakes fail
here; Mosaic GPU's interpret mode in jax 0.10 has no wgmma, so the numbers are checked on the GPU).
On a Hopper GPU: bf16 outputs and lse against the f32 jnp reference (relative L2 < 1e-2), padding
rows zero with lse -inf, key splits, both query layouts (token-major and grouped rows), the layer
of a whole pool read inside a scan.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_mgpu
from pallas_kernels.attention import paged_attention_reference
from pallas_kernels.attention_mgpu import merge_key_splits, paged_attention_mgpu, row_tiles
from tests.test_kernels_gpu import assert_matches_reference, problem, rel_err

on_hopper = pytest.mark.skipif(not attention_mgpu.available(), reason="needs a Hopper GPU")


def test_row_tiles_against_numpy_count():
  rng = np.random.default_rng(0)
  block_q, block_kv = 64, 64
  pos = np.sort(rng.choice(5000, size=300, replace=False))
  pos = np.concatenate([pos, -np.ones(84, np.int64)])  # padding at the end, 384 = 6 tiles
  got = np.asarray(row_tiles(jnp.asarray(pos[None], jnp.int32), block_q, block_kv))[0]
  for t in range(6):
    rows = pos[t * block_q:(t + 1) * block_q]
    valid = rows[rows >= 0]
    if valid.size == 0:
      assert tuple(got[t]) == (0, 0)
      continue
    steps = -(-(valid.max() + 1) // block_kv)
    # Unmasked blocks: every key in them is visible to every valid row of the tile.
    full = sum(1 for j in range(steps) if (j + 1) * block_kv - 1 <= valid.min())
    assert tuple(got[t]) == (steps, full), t
  assert got[-1, 0] == 0 and got[4, 0] > got[0, 0]


def _args(batch, n_heads, n_kv, head_dim, page_size, n_layers=None):
  n_tok, max_pages, n_pages = 300, 96, 200
  pool = ((n_layers,) if n_layers else ()) + (n_kv, n_pages, page_size, head_dim)
  return (jax.ShapeDtypeStruct((batch, n_tok, n_heads, head_dim), jnp.bfloat16),
          jax.ShapeDtypeStruct((batch, n_tok), jnp.int32),
          jax.ShapeDtypeStruct(pool, jnp.bfloat16), jax.ShapeDtypeStruct(pool, jnp.bfloat16),
          jax.ShapeDtypeStruct((batch, max_pages), jnp.int32),
          jax.ShapeDtypeStruct((batch,), jnp.int32))


@pytest.mark.parametrize("case,kw", [
    ((2, 32, 8, 128, 16), dict()),  # Llama-3-8B heads
    ((1, 9, 3, 64, 16), dict(block_kv=64, n_slots=3)),  # SmolLM2 heads
    ((1, 8, 8, 64, 32, 4), dict(layer=2)),  # group 1, 32-token pages, a layer of the pool
    ((2, 32, 8, 128, 16), dict(key_splits=4)),
    ((2, 32, 8, 128, 16), dict(token_major=False)),  # rows grouped around the kernel
    ((2, 32, 8, 128, 16), dict(token_major=False, key_splits=2)),
])
def test_lowers_for_cuda(case, kw):
  from jax import export
  layer = kw.pop("layer", None)

  def f(*a):
    return paged_attention_mgpu(*a, sm_scale=0.1,
                                layer=None if layer is None else jnp.int32(layer), **kw)
  exported = export.export(jax.jit(f), platforms=("cuda",))(*_args(*case))
  assert "mosaic_gpu" in exported.mlir_module()


def test_merge_key_splits_against_float64_attention():
  """Attention over key ranges, merged, equals attention over all keys (numpy, float64)."""
  rng = np.random.default_rng(3)
  n_rows, n_keys, dim, bounds = 7, 40, 16, (0, 9, 25, 40)
  q, k, v = (rng.standard_normal((n, dim)) for n in (n_rows, n_keys, n_keys))
  pos = np.array([3, 8, 9, 20, 30, 39, -1])  # row i sees keys j <= pos[i]; -1: none

  def attend(lo, hi):  # rows over keys [lo, hi): normalised out and lse (-inf: nothing seen)
    s = q @ k[lo:hi].T
    vis = np.arange(lo, hi)[None] <= pos[:, None]
    s = np.where(vis, s, -np.inf)
    m = np.max(s, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    total = e.sum(axis=1)
    out = (e @ v[lo:hi]) / np.where(total > 0, total, 1.0)[:, None]
    with np.errstate(divide="ignore"):
      return out, np.where(total > 0, m[:, 0] + np.log(total), -np.inf)

  parts = [attend(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
  out_s = np.stack([o for o, _ in parts])[None, None]  # [1, 1, NS, R, H]
  lse_s = np.stack([l for _, l in parts])[None, None]
  assert np.isneginf(lse_s).sum() > 1  # some rows see nothing in some splits
  with jax.enable_x64():
    out, lse = merge_key_splits(jnp.asarray(out_s), jnp.asarray(lse_s))
  want_out, want_lse = attend(0, n_keys)
  np.testing.assert_allclose(np.asarray(out)[0, 0], want_out, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(np.asarray(lse)[0, 0][:-1], want_lse[:-1], rtol=1e-12)
  assert np.isneginf(np.asarray(lse)[0, 0, -1]) and np.all(np.asarray(out)[0, 0, -1] == 0)


def test_rejects_unsupported_blocks():
  q, q_pos, k, v, pt, kv = (jnp.zeros(a.shape, a.dtype) for a in _args(1, 8, 8, 64, 16))
  with pytest.raises(ValueError, match="block_kv=48"):
    paged_attention_mgpu(q, q_pos, k, v, pt, kv, sm_scale=0.1, block_kv=48)
  with pytest.raises(ValueError, match="shared memory"):
    paged_attention_mgpu(q, q_pos, k, v, pt, kv, sm_scale=0.1, block_kv=128, n_slots=8)
  q3 = jnp.zeros((1, 300, 9, 64), jnp.bfloat16)  # group 3 does not tile 64 rows per head
  k3 = jnp.zeros((3, 200, 16, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="token_major"):
    paged_attention_mgpu(q3, q_pos, k3, k3, pt, kv, sm_scale=0.1, token_major=True)
  with pytest.raises(ValueError, match="bf16"):
    paged_attention_mgpu(q.astype(jnp.float32), q_pos, k, v, pt, kv, sm_scale=0.1)


def test_dispatch_names():
  from pallas_kernels import ops
  assert ops.compiled("pallas") and ops.compiled("pallas_triton")
  assert not ops.compiled("reference") and not ops.compiled("pallas_interpret")
  args = [jnp.zeros(a.shape, a.dtype) for a in _args(1, 32, 8, 128, 16)]
  # No Hopper here: the dispatcher keeps the Triton kernel (or the reference).
  assert attention_mgpu.supports(args[0], args[2], args[4]) == attention_mgpu.available()
  assert not attention_mgpu.supports(args[0].astype(jnp.float32), args[2], args[4])


GPU_CASES = [
    # (batch, n_heads, n_kv, head_dim, page_size, kv_len, frac), kernel options
    ((2, 32, 8, 128, 16, (2048, 1337), 0.15), dict()),  # Llama-3-8B heads, ragged
    ((2, 32, 8, 128, 16, (2048, 1337), 0.15), dict(block_kv=64, n_slots=3)),
    ((1, 9, 3, 64, 16, (1500,), 0.3), dict()),  # SmolLM2 heads: group 3, dim 64
    ((2, 8, 8, 64, 32, (700, 1024), 1.0), dict()),  # group 1, every position, 32-token pages
    ((1, 32, 8, 128, 16, (8192,), 0.05), dict(block_kv=64, n_slots=4)),  # long rows
    ((1, 32, 8, 128, 16, (4096,), 0.004), dict()),  # a few rows, one partial tile (auto splits)
    ((2, 32, 8, 128, 16, (2048, 1337), 0.15), dict(key_splits=4)),  # splits past short rows
    ((1, 9, 3, 64, 16, (1500,), 0.3), dict(key_splits=3, block_kv=64)),
    ((2, 32, 8, 128, 16, (2048, 1337), 0.15), dict(token_major=False)),  # grouped rows
    ((2, 32, 8, 128, 16, (2048, 1337), 0.15), dict(token_major=False, key_splits=4)),
    ((2, 16, 2, 128, 16, (1024, 999), 0.3), dict()),  # group 8: 8 rows per head, token-major
]


@pytest.mark.gpu
@on_hopper
@pytest.mark.parametrize("case,kw", GPU_CASES)
def test_matches_reference_gpu(case, kw):
  q, q_pos, k_pages, v_pages, table, kv = problem(0, *case)
  scale = 1.0 / math.sqrt(q.shape[-1])
  out, lse = paged_attention_mgpu(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale, **kw)
  assert_matches_reference(out, lse, q, q_pos, k_pages, v_pages, table, kv, scale)


@pytest.mark.gpu
@on_hopper
def test_layer_of_whole_pool_gpu():
  """layer= over the whole pool [L, K, P, S, H], traced inside a scan as in the engine."""
  q, q_pos, k_all, v_all, table, kv = problem(4, *GPU_CASES[0][0], n_layers=3)
  scale = 1.0 / math.sqrt(q.shape[-1])
  _, scanned = jax.jit(lambda k, v: jax.lax.scan(
      lambda c, i: (c, paged_attention_mgpu(q, q_pos, k, v, table, kv, sm_scale=scale,
                                            layer=i)), 0, jnp.arange(3, dtype=jnp.int32)))(
      k_all, v_all)
  for i in range(3):
    want, _ = paged_attention_reference(q, q_pos, k_all[i], v_all[i], table, kv, sm_scale=scale)
    assert rel_err(scanned[0][i], want) < 1e-2


@pytest.mark.gpu
@on_hopper
def test_ops_dispatch_gpu():
  """ops.attention under "pallas" runs this kernel; "pallas_triton" the Triton one; both agree."""
  from pallas_kernels import ops
  q, q_pos, k_pages, v_pages, table, kv = problem(6, *GPU_CASES[0][0])
  scale = 1.0 / math.sqrt(q.shape[-1])
  got = {b: ops.attention(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale, backend=b)
         for b in ("pallas", "pallas_triton")}
  mine = paged_attention_mgpu(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale)
  np.testing.assert_array_equal(np.asarray(got["pallas"][0], np.float32),
                                np.asarray(mine[0], np.float32))
  assert rel_err(got["pallas"][0], got["pallas_triton"][0]) < 1e-2
