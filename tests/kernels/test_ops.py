"""The dispatch layer (pallas_kernels/ops.py): backend names, the reference and the kernels behind
one interface agreeing, and the layer of a whole pool [L, K, P, S, H] read by every op."""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels.attention import paged_attention
from tests.kernels.problems import (GPU_CASES, gpu_problem, make_pool, make_positions, make_table,
                                    np_attention, on_gpu, rel_err)


def test_ops_dispatch():
  """'auto' is the reference on CPU; the interpret route agrees; bad names fail."""
  on_gpu = jax.default_backend() == "gpu"
  assert ops.resolve_backend("auto") == ("pallas" if on_gpu else "reference")
  with pytest.raises(ValueError):
    ops.resolve_backend("cuda")
  rng = np.random.default_rng(11)
  k_pages, v_pages = make_pool(rng, 2, 6, 16, 64, jnp.float32)
  table = make_table(rng, 1, 4, 6)
  kv = jnp.asarray([50], jnp.int32)
  q = jnp.asarray(rng.standard_normal((1, 5, 4, 64)), jnp.float32)
  q_pos = jnp.asarray([[3, 10, 20, 30, 49]], jnp.int32)
  is_sparse = jnp.asarray([[False, True, False, True, True]])
  a = ops.attention_with_importance(q, q_pos, is_sparse, k_pages, v_pages,
                                    table, kv, sm_scale=0.125,
                                    backend="reference")
  b = ops.attention_with_importance(q, q_pos, is_sparse, k_pages, v_pages,
                                    table, kv, sm_scale=0.125,
                                    backend="pallas_interpret")
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-6)
  d_ref = ops.decode_attention(q[:, -1], k_pages, v_pages, table, kv,
                               sm_scale=0.125, backend="reference")
  d_int = ops.decode_attention(q[:, -1], k_pages, v_pages, table, kv,
                               sm_scale=0.125, backend="pallas_interpret")
  np.testing.assert_allclose(np.asarray(d_ref), np.asarray(d_int), rtol=1e-5,
                             atol=1e-6)
  # Decode equals the last row of full attention at position kv_len - 1.
  np.testing.assert_allclose(np.asarray(d_ref), np.asarray(a[0][:, -1]),
                             rtol=1e-5, atol=1e-6)


# (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok, n_layers)
LAYER_CASES = [
    (2, 4, 2, 64, 16, 5, (70, 33), 9, 3),  # group 2, ragged
    (1, 6, 2, 64, 8, 6, (45,), 7, 4),  # group 3, page size 8
]


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_of_whole_pool_equals_per_layer(case):
  """layer= over the whole pool [L, K, P, S, H] gives what the layer's own slice gives.

  Every layer holds different random data, so reading the wrong layer (or the wrong kv head's
  rows of the flattened [L*K, P*S, H] view) fails. Kernels run in interpret mode, where
  unwritten outputs stay NaN. The layer is tried as a Python int and traced (inside
  lax.scan, as the engine passes it).
  """
  (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok,
   n_layers) = case
  rng = np.random.default_rng(zlib.crc32(repr(case).encode()))
  n_pages = batch * max_pages + 2
  pools = [make_pool(rng, n_kv, n_pages, page_size, head_dim, jnp.float32)
           for _ in range(n_layers)]
  k_all = jnp.stack([k for k, _ in pools])  # [L, K, P, S, H]
  v_all = jnp.stack([v for _, v in pools])
  table = make_table(rng, batch, max_pages, n_pages)
  kv = jnp.asarray(kv_len, jnp.int32)
  q_pos = make_positions(rng, kv_len, n_tok, "subset", 2)
  q = jnp.asarray(rng.standard_normal((batch, n_tok, n_heads, head_dim)),
                  jnp.float32)
  is_sparse = jnp.asarray(rng.random(q_pos.shape) < 0.5)
  scale = 1.0 / math.sqrt(head_dim)

  def all_ops(layer, k_pages, v_pages, backend):
    """attention (out, lse), importance and decode of one layer, one backend."""
    out, lse, imp = ops.attention_with_importance(
        q, q_pos, is_sparse, k_pages, v_pages, table, kv, sm_scale=scale,
        layer=layer, backend=backend)
    dec = ops.decode_attention(q[:, -1], k_pages, v_pages, table, kv,
                               sm_scale=scale, layer=layer, backend=backend)
    return out, lse, imp, dec

  for backend in ("reference", "pallas_interpret"):
    per_layer = [all_ops(None, k_all[i], v_all[i], backend)
                 for i in range(n_layers)]
    # Traced layer index, as in the engine's scan over layers.
    _, scanned = jax.lax.scan(
        lambda c, i: (c, all_ops(i, k_all, v_all, backend)), 0,
        jnp.arange(n_layers, dtype=jnp.int32))
    for i in range(n_layers):
      by_int = all_ops(i, k_all, v_all, backend)
      for want, got_int, got_scan in zip(per_layer[i], by_int, scanned):
        want = np.asarray(want)
        assert not np.isnan(want).any()
        np.testing.assert_allclose(np.asarray(got_int), want, rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(got_scan[i]), want, rtol=1e-6,
                                   atol=1e-6)
    # The layers differ, so the comparison above can tell them apart.
    assert rel_err(per_layer[0][0], per_layer[1][0]) > 0.1
  # The kernels on the whole pool still agree with the independent numpy maths.
  last = n_layers - 1
  np_out, _ = np_attention(q, np.asarray(q_pos), k_all[last], v_all[last],
                           np.asarray(table), kv_len, scale)
  out, _ = paged_attention(q, q_pos, k_all, v_all, table, kv, sm_scale=scale,
                           layer=jnp.int32(last), block_k=16, interpret=True)
  assert rel_err(out, np_out) < 1e-5


@on_gpu
def test_compiled_layer_of_whole_pool_equals_per_layer():
  """layer= over the whole pool [L, K, P, S, H] (traced, inside a scan as in the engine) gives
  what the layer's own slice gives, for the three Triton kernels, to 1e-5. (The Mosaic GPU
  attention compiles to different code for the two pool shapes and may differ by one bf16 ulp in
  a few elements; tests/kernels/test_attention_mgpu.py checks its layer against the reference.)"""
  q, q_pos, k_one, _, table, kv = gpu_problem(4, *GPU_CASES[0])
  n_layers = 3
  rng = np.random.default_rng(5)
  shape = (n_layers,) + k_one.shape
  k_all = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  v_all = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  is_sparse = jnp.asarray(rng.random(q_pos.shape) < 0.4)
  scale = 1.0 / math.sqrt(q.shape[-1])

  def all_ops(layer, k_pages, v_pages):
    out, lse, imp = ops.attention_with_importance(
        q, q_pos, is_sparse, k_pages, v_pages, table, kv, sm_scale=scale,
        layer=layer, backend="pallas_triton")
    dec = ops.decode_attention(q[:, -1], k_pages, v_pages, table, kv,
                               sm_scale=scale, layer=layer, backend="pallas_triton")
    return out, lse, imp, dec

  _, scanned = jax.jit(lambda k, v: jax.lax.scan(
      lambda c, i: (c, all_ops(i, k, v)), 0,
      jnp.arange(n_layers, dtype=jnp.int32)))(k_all, v_all)
  for i in range(n_layers):
    want = all_ops(None, k_all[i], v_all[i])
    for w, got in zip(want, scanned):
      # bf16 outputs may round differently where XLA fuses the scan's epilogue (one bf16 ulp
      # in 8192 elements on an H200, 2026-12-07): one ulp is 2^-7 relative
      rtol = 2.0**-7 if w.dtype == jnp.bfloat16 else 1e-5
      w = np.asarray(jnp.asarray(w, jnp.float32))
      got = np.asarray(jnp.asarray(got[i], jnp.float32))
      assert not np.isnan(got).any()
      np.testing.assert_allclose(got, w, rtol=rtol, atol=1e-5)
