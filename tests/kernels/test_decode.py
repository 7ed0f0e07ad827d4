"""Paged decode attention (pallas_kernels/decode.py): the reference and the flash-decoding Triton
kernel (interpreted on CPU, compiled on the GPU) against independent maths, on random problems."""

import math
import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode import paged_decode_attention, paged_decode_attention_reference
from tests.kernels.problems import (CPU_BACKENDS, GPU_CASES, gpu_problem, kernel_or_reference,
                                    make_pool, make_table, np_decode, on_gpu, pool_past_32bit,
                                    rel_err)

# (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, num_splits)
DECODE_CASES = [
    (3, 2, 2, 64, 16, 6, (90, 1, 57), None),
    (2, 6, 2, 64, 8, 9, (72, 30), 4),  # splits past kv_len are empty
    (2, 8, 2, 128, 16, 5, (80, 17), 1),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_matches_float64_attention(case, backend):
  (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len,
   num_splits) = case
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  n_pages = batch * max_pages + 1
  k_pages, v_pages = make_pool(rng, n_kv, n_pages, page_size, head_dim,
                               jnp.float32)
  table = make_table(rng, batch, max_pages, n_pages)
  kv = jnp.asarray(kv_len, jnp.int32)
  q = jnp.asarray(rng.standard_normal((batch, n_heads, head_dim)), jnp.float32)
  scale = 1.0 / math.sqrt(head_dim)
  decode = kernel_or_reference(paged_decode_attention, paged_decode_attention_reference,
                               backend, block_k=16, num_splits=num_splits)
  out = decode(q, k_pages, v_pages, table, kv, sm_scale=scale)
  want = np_decode(q, k_pages, v_pages, np.asarray(table), kv_len, scale)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert not np.isnan(np.asarray(out)).any()
  assert rel_err(out, want) < 1e-5


# ------------------------------------------------------------------------------------------------
# Compiled on the GPU
# ------------------------------------------------------------------------------------------------


@on_gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_compiled_matches_reference(case):
  _, _, k_pages, v_pages, table, kv = gpu_problem(2, *case)
  batch = table.shape[0]
  n_heads, head_dim = case[1], case[3]
  q = jnp.asarray(np.random.default_rng(3).standard_normal(
      (batch, n_heads, head_dim)), jnp.bfloat16)
  scale = 1.0 / math.sqrt(head_dim)
  ref = paged_decode_attention_reference(q, k_pages, v_pages, table, kv,
                                         sm_scale=scale)
  for splits in (None, 1, 8):
    out = paged_decode_attention(q, k_pages, v_pages, table, kv,
                                 sm_scale=scale, num_splits=splits)
    assert not jnp.isnan(out).any()
    assert rel_err(out, ref) < 1e-2


@on_gpu
def test_compiled_layer_past_32bit_offsets():
  q, _, k_all, v_all, table, kv, layer = pool_past_32bit()
  scale = 1.0 / math.sqrt(q.shape[-1])
  dec = paged_decode_attention(q[:, -1], k_all, v_all, table, kv, sm_scale=scale, layer=layer)
  ref_dec = paged_decode_attention_reference(q[:, -1], k_all, v_all, table, kv, sm_scale=scale,
                                             layer=layer)
  assert rel_err(dec, ref_dec) < 1e-2
