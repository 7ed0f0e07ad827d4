"""Sparse-Q importance (pallas_kernels/importance.py): the reference and the Triton kernel
(interpreted on CPU, compiled on the GPU) against independent maths, on random problems."""

import math
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import paged_attention_reference
from pallas_kernels.importance import sparse_q_importance, sparse_q_importance_reference
from tests.kernels.problems import (CPU_BACKENDS, GPU_CASES, gpu_problem, kernel_or_reference,
                                    make_pool, make_positions, make_table, np_importance, on_gpu,
                                    pool_past_32bit, rel_err)

# (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok, block_k)
IMP_CASES = [
    (2, 2, 2, 64, 16, 5, (75, 40), 14, 32),
    (2, 6, 2, 64, 8, 7, (50, 33), 12, 16),  # group 3, page size 8
    (1, 8, 2, 128, 16, 4, (64,), 20, 32),
    (1, 8, 2, 128, 16, 4, (57,), 20, 64),  # one key block past kv_len
    (2, 6, 3, 64, 8, 6, (45, 30), 12, 16),  # 3 kv heads
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", IMP_CASES)
def test_matches_float64_importance(case, backend):
  (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok, block_k) = case
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  n_pages = batch * max_pages + 2
  k_pages, v_pages = make_pool(rng, n_kv, n_pages, page_size, head_dim,
                               jnp.float32)
  table = make_table(rng, batch, max_pages, n_pages)
  kv = jnp.asarray(kv_len, jnp.int32)
  q_pos = make_positions(rng, kv_len, n_tok, "subset", 2)
  q = jnp.asarray(rng.standard_normal((batch, n_tok, n_heads, head_dim)),
                  jnp.float32)
  # Sparse-Q rows: a random subset of the real rows plus each request's last
  # real row; padding rows are flagged too, to check they are ignored.
  is_sparse = rng.random((batch, n_tok)) < 0.5
  is_sparse[:, n_tok - 3] = True
  is_sparse[:, -1] = True
  is_sparse = jnp.asarray(is_sparse)
  scale = 1.0 / math.sqrt(head_dim)
  _, lse = paged_attention_reference(q, q_pos, k_pages, v_pages, table, kv,
                                     sm_scale=scale)

  score = kernel_or_reference(sparse_q_importance, sparse_q_importance_reference, backend,
                              block_m=16, block_k=block_k)
  imp = score(q, q_pos, is_sparse, k_pages, table, kv, lse, sm_scale=scale)
  want = np_importance(q, np.asarray(q_pos), np.asarray(is_sparse), k_pages,
                       np.asarray(table), kv_len, lse, scale)
  assert imp.shape == (batch, max_pages * page_size)
  assert imp.dtype == jnp.float32
  assert not np.isnan(np.asarray(imp)).any()
  assert rel_err(imp, want) < 1e-5
  # Keys at or beyond kv_len get no mass.
  for b, length in enumerate(kv_len):
    assert np.all(np.asarray(imp)[b, length:] == 0)
  # Deterministic: a second run is bit-identical.
  imp2 = score(q, q_pos, is_sparse, k_pages, table, kv, lse, sm_scale=scale)
  np.testing.assert_array_equal(np.asarray(imp), np.asarray(imp2))


def test_bf16():
  """bf16 inputs take the split (hi + lo) bf16 path for the per-head sums."""
  rng = np.random.default_rng(21)
  batch, n_heads, n_kv, head_dim, page_size, max_pages = 1, 8, 2, 64, 16, 6
  kv_len = (90,)
  k_pages, v_pages = make_pool(rng, n_kv, 8, page_size, head_dim, jnp.bfloat16)
  table = make_table(rng, batch, max_pages, 8)
  kv = jnp.asarray(kv_len, jnp.int32)
  q_pos = make_positions(rng, kv_len, 24, "subset", 0)
  q = jnp.asarray(rng.standard_normal((batch, 24, n_heads, head_dim)),
                  jnp.bfloat16)
  is_sparse = jnp.asarray(rng.random((batch, 24)) < 0.6)
  _, lse = paged_attention_reference(q, q_pos, k_pages, v_pages, table, kv,
                                     sm_scale=0.125)
  imp = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv, lse,
                            sm_scale=0.125, block_m=32, block_k=32, interpret=True)
  ref = sparse_q_importance_reference(q, q_pos, is_sparse, k_pages, table,
                                      kv, lse, sm_scale=0.125)
  assert not np.isnan(np.asarray(imp)).any()
  assert rel_err(imp, ref) < 1e-3


# ------------------------------------------------------------------------------------------------
# Compiled on the GPU
# ------------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_compiled_matches_reference(case):
  q, q_pos, k_pages, v_pages, table, kv = gpu_problem(0, *case)
  scale = 1.0 / math.sqrt(q.shape[-1])
  _, ref_lse = paged_attention_reference(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale)
  rng = np.random.default_rng(1)
  is_sparse = jnp.asarray(rng.random(q_pos.shape) < 0.4)
  imp = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv, ref_lse, sm_scale=scale)
  ref = sparse_q_importance_reference(q, q_pos, is_sparse, k_pages, table, kv, ref_lse,
                                      sm_scale=scale)
  assert not jnp.isnan(imp).any()
  assert rel_err(imp, ref) < 1e-2
  imp2 = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv, ref_lse, sm_scale=scale)
  np.testing.assert_array_equal(np.asarray(imp), np.asarray(imp2))


@on_gpu
def test_compiled_layer_past_32bit_offsets():
  q, q_pos, k_all, v_all, table, kv, layer = pool_past_32bit()
  scale = 1.0 / math.sqrt(q.shape[-1])
  _, ref_lse = paged_attention_reference(q, q_pos, k_all, v_all, table, kv, sm_scale=scale,
                                         layer=layer)
  imp = sparse_q_importance(q, q_pos, q_pos >= 0, k_all, table, kv, ref_lse, sm_scale=scale,
                            layer=layer)
  ref_imp = sparse_q_importance_reference(q, q_pos, q_pos >= 0, k_all, table, kv, ref_lse,
                                          sm_scale=scale, layer=layer)
  assert rel_err(imp, ref_imp) < 1e-2
