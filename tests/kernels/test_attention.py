"""Sparse-query paged attention (pallas_kernels/attention.py): the reference and the Triton kernel
(interpreted on CPU, compiled on the GPU) against independent maths, on random problems."""

import math
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels._paged import choose_key_splits
from pallas_kernels.attention import paged_attention, paged_attention_reference
from tests.kernels.problems import (GPU_CASES, assert_matches_reference, gpu_problem,
                                    kernel_or_reference, make_pool, make_positions, make_table,
                                    np_attention, on_gpu, pool_past_32bit, rel_err)

# (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok, mode,
#  n_pad, block_k)
ATTN_CASES = [
    # group 1, dim 64, ragged lengths, subset queries, padding rows.
    (2, 2, 2, 64, 16, 6, (90, 37), 12, "subset", 3, 32),
    # group 3 (not a power of two), page size 8, MP*S not a multiple of BK.
    (2, 6, 2, 64, 8, 9, (70, 45), 10, "subset", 2, 32),
    # group 4, dim 128, full prefill (every position a query, many blocks).
    (1, 8, 2, 128, 16, 5, (80,), 80, "all", 0, 16),
    # group 4, dim 128, one token (decode-like) with a padding request.
    (2, 4, 1, 128, 16, 4, (61, 64), 1, "last", 0, 32),
]


@pytest.mark.parametrize("backend,key_splits", [("reference", None), ("interpret", 1),
                                                ("interpret", 3)])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_matches_float64_attention(case, backend, key_splits):
  """key_splits 3: three key ranges per row block (some empty for short rows), merged."""
  (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok, mode,
   n_pad, block_k) = case
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  n_pages = batch * max_pages + 3
  k_pages, v_pages = make_pool(rng, n_kv, n_pages, page_size, head_dim,
                               jnp.float32)
  table = make_table(rng, batch, max_pages, n_pages)
  kv = jnp.asarray(kv_len, jnp.int32)
  q_pos = make_positions(rng, kv_len, n_tok, mode, n_pad)
  q = jnp.asarray(rng.standard_normal((batch, n_tok, n_heads, head_dim)),
                  jnp.float32)
  scale = 1.0 / math.sqrt(head_dim)

  attend = kernel_or_reference(paged_attention, paged_attention_reference, backend,
                               block_k=block_k, key_splits=key_splits)
  out, lse = attend(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale)
  np_out, np_lse = np_attention(q, np.asarray(q_pos), k_pages, v_pages,
                                np.asarray(table), kv_len, scale)

  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  assert not np.isnan(np.asarray(out)).any()
  assert not np.isnan(np.asarray(lse)).any()
  assert rel_err(out, np_out) < 1e-5
  pad = np.asarray(q_pos) < 0
  assert np.all(np.isneginf(np.asarray(lse)[pad]))
  if backend != "reference":
    assert np.all(np.asarray(out)[pad] == 0)
  real = ~pad
  np.testing.assert_allclose(np.asarray(lse)[real], np_lse[real], rtol=1e-5,
                             atol=1e-5)


def test_key_splits_only_where_rows_are_too_few():
  # naive reuse at 8K: 32 tokens x 4 heads = 2 row blocks per (request, kv head), 8 kv heads
  assert choose_key_splits(1, 8, 2, 8192, 64) == 32  # 16 programs -> 512
  assert choose_key_splits(1, 8, 80, 8192, 64) == 1  # 640 programs: the rows fill the GPU
  assert choose_key_splits(1, 8, 2, 512, 64) == 2  # at least 4 key blocks per split
  assert choose_key_splits(1, 8, 2, 128, 64) == 1


def test_bf16_and_block_m():
  """bf16 inputs, f32 accumulation; a small row block forces several row blocks."""
  rng = np.random.default_rng(7)
  batch, n_heads, n_kv, head_dim, page_size, max_pages = 1, 8, 2, 64, 16, 8
  kv_len = (120,)
  k_pages, v_pages = make_pool(rng, n_kv, 11, page_size, head_dim, jnp.bfloat16)
  table = make_table(rng, batch, max_pages, 11)
  q_pos = make_positions(rng, kv_len, 20, "subset", 1)
  q = jnp.asarray(rng.standard_normal((batch, 20, n_heads, head_dim)),
                  jnp.bfloat16)
  kv = jnp.asarray(kv_len, jnp.int32)
  out, lse = paged_attention(q, q_pos, k_pages, v_pages, table, kv,
                             sm_scale=0.125, block_m=16, block_k=32,
                             interpret=True)
  split_out, split_lse = paged_attention(q, q_pos, k_pages, v_pages, table, kv, sm_scale=0.125,
                                         block_m=16, block_k=32, key_splits=2, interpret=True)
  assert split_out.dtype == jnp.bfloat16
  assert rel_err(split_out, out) < 1e-2
  ref_out, ref_lse = paged_attention_reference(q, q_pos, k_pages, v_pages,
                                               table, kv, sm_scale=0.125)
  np_out, _ = np_attention(q.astype(jnp.float32), np.asarray(q_pos),
                           k_pages.astype(jnp.float32),
                           v_pages.astype(jnp.float32), np.asarray(table),
                           kv_len, 0.125)
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, np_out) < 1e-2
  assert rel_err(out, ref_out) < 1e-2
  real = np.asarray(q_pos) >= 0
  np.testing.assert_allclose(np.asarray(lse)[real], np.asarray(ref_lse)[real],
                             rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_empty_request_gives_zero_and_neg_inf(backend):
  """kv_len = 0: every row sees nothing -> out 0, lse -inf, never NaN."""
  rng = np.random.default_rng(3)
  k_pages, v_pages = make_pool(rng, 1, 4, 16, 64, jnp.float32)
  table = make_table(rng, 1, 2, 4)
  q = jnp.asarray(rng.standard_normal((1, 4, 2, 64)), jnp.float32)
  q_pos = jnp.asarray([[0, 1, 2, 3]], jnp.int32)
  kv = jnp.zeros((1,), jnp.int32)
  attend = kernel_or_reference(paged_attention, paged_attention_reference, backend)
  out, lse = attend(q, q_pos, k_pages, v_pages, table, kv, sm_scale=0.1)
  assert np.all(np.asarray(out) == 0)
  assert np.all(np.isneginf(np.asarray(lse)))


# ------------------------------------------------------------------------------------------------
# Compiled on the GPU
# ------------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_compiled_matches_reference(case):
  q, q_pos, k_pages, v_pages, table, kv = gpu_problem(0, *case)
  scale = 1.0 / math.sqrt(q.shape[-1])
  out, lse = paged_attention(q, q_pos, k_pages, v_pages, table, kv,
                             sm_scale=scale)
  assert_matches_reference(out, lse, q, q_pos, k_pages, v_pages, table, kv, scale)
  real = np.asarray(q_pos) >= 0
  whole, whole_lse = paged_attention(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale,
                                     key_splits=1)  # one program per row block: no merge
  assert rel_err(out, whole) < 1e-2
  assert rel_err(np.asarray(lse)[real], np.asarray(whole_lse)[real]) < 1e-3


@on_gpu
def test_auto_backend_is_pallas_on_gpu():
  assert ops.resolve_backend("auto") == "pallas"


@on_gpu
def test_compiled_layer_past_32bit_offsets():
  """A pool whose flat [L*K, P*S, H] view has over 2**31 elements (the engine's case: offsets
  into it need 64-bit arithmetic): the last layer's last kv heads live past 2**31. (The
  importance and decode kernels on the same pool: tests/kernels/test_importance.py,
  test_decode.py.)"""
  q, q_pos, k_all, v_all, table, kv, layer = pool_past_32bit()
  scale = 1.0 / math.sqrt(q.shape[-1])
  out, lse = paged_attention(q, q_pos, k_all, v_all, table, kv, sm_scale=scale, layer=layer)
  ref_out, ref_lse = paged_attention_reference(q, q_pos, k_all, v_all, table, kv,
                                               sm_scale=scale, layer=layer)
  assert rel_err(out, ref_out) < 1e-2 and rel_err(lse, ref_lse) < 1e-2
