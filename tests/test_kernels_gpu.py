"""GPU tests of pallas_kernels (Triton lowering, compiled): bf16 kernels vs the jnp references.

Marked `gpu` and skipped unless jax.default_backend() == "gpu". Run on the
device machine with `python -m pytest tests/test_kernels_gpu.py -m gpu`.
Inputs are random bf16 at moderate Llama-like shapes, page tables shuffled,
kv lengths ragged; the references compute in f32 from the same bf16 inputs.
Criterion: relative L2 error < 1e-2, no NaN anywhere.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels.attention import paged_attention, paged_attention_reference
from pallas_kernels.decode import (paged_decode_attention,
                                   paged_decode_attention_reference)
from pallas_kernels.importance import (sparse_q_importance,
                                       sparse_q_importance_reference)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]


def rel_err(x, ref):
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def problem(seed, batch, n_heads, n_kv, head_dim, page_size, kv_len, frac,
            n_pad=5, n_layers=None):
  """Random bf16 q and pool (one layer [K, P, S, H], or n_layers of them), shuffled pages,
  sorted random query positions per request (its last position included) and n_pad padding
  rows."""
  rng = np.random.default_rng(seed)
  max_pages = -(-max(kv_len) // page_size)
  n_pages = batch * max_pages + 7
  shape = ((n_layers,) if n_layers else ()) + (n_kv, n_pages, page_size, head_dim)
  k_pages = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  v_pages = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  table = jnp.asarray(
      rng.permutation(n_pages)[:batch * max_pages].reshape(batch, max_pages),
      jnp.int32)
  n_q = max(2, int(frac * max(kv_len)))
  rows = []
  for length in kv_len:
    m = min(n_q, length)
    p = np.sort(rng.choice(length - 1, size=m - 1, replace=False))
    p = np.concatenate([p, [length - 1], -np.ones(n_q - m + n_pad, np.int64)])
    rows.append(p)
  q_pos = jnp.asarray(np.stack(rows), jnp.int32)
  q = jnp.asarray(rng.standard_normal((batch, q_pos.shape[1], n_heads,
                                       head_dim)), jnp.bfloat16)
  return q, q_pos, k_pages, v_pages, table, jnp.asarray(kv_len, jnp.int32)


def assert_matches_reference(out, lse, q, q_pos, k_pages, v_pages, table, kv, scale):
  """A kernel's (out, lse) against the f32 reference: relative L2 < 1e-2, no NaN, padding rows
  zero with lse -inf. Returns the reference's (out, lse)."""
  ref_out, ref_lse = paged_attention_reference(q, q_pos, k_pages, v_pages, table, kv,
                                               sm_scale=scale)
  assert not jnp.isnan(out).any() and not jnp.isnan(lse).any()
  assert rel_err(out, ref_out) < 1e-2
  real = np.asarray(q_pos) >= 0
  assert rel_err(np.asarray(lse)[real], np.asarray(ref_lse)[real]) < 1e-2
  assert np.all(np.asarray(out, np.float32)[~real] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[~real]))
  return ref_out, ref_lse


CASES = [
    # (batch, n_heads, n_kv, head_dim, page_size, kv_len, frac)
    (2, 32, 8, 128, 16, (2048, 1337), 0.15),  # Llama-3-8B heads, ragged
    (1, 9, 3, 64, 16, (1500,), 0.3),  # SmolLM2 heads: group 3, dim 64
    (2, 8, 8, 64, 32, (700, 1024), 1.0),  # group 1, all positions
    (1, 32, 8, 128, 16, (8192,), 0.004),  # 32 queries over 8K keys: split over keys
]


@pytest.mark.parametrize("case", CASES)
def test_attention_and_importance_gpu(case):
  q, q_pos, k_pages, v_pages, table, kv = problem(0, *case)
  scale = 1.0 / math.sqrt(q.shape[-1])
  out, lse = paged_attention(q, q_pos, k_pages, v_pages, table, kv,
                             sm_scale=scale)
  ref_out, ref_lse = assert_matches_reference(out, lse, q, q_pos, k_pages, v_pages, table, kv,
                                              scale)
  real = np.asarray(q_pos) >= 0
  whole, whole_lse = paged_attention(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale,
                                     key_splits=1)  # one program per row block: no merge
  assert rel_err(out, whole) < 1e-2
  assert rel_err(np.asarray(lse)[real], np.asarray(whole_lse)[real]) < 1e-3

  rng = np.random.default_rng(1)
  is_sparse = jnp.asarray(rng.random(q_pos.shape) < 0.4)
  for head_reduce in ("sum", "max", "per_kv_head"):
    imp = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv, ref_lse,
                              sm_scale=scale, head_reduce=head_reduce)
    ref = sparse_q_importance_reference(q, q_pos, is_sparse, k_pages, table,
                                        kv, ref_lse, sm_scale=scale,
                                        head_reduce=head_reduce)
    assert not jnp.isnan(imp).any()
    assert rel_err(imp, ref) < 1e-2
    imp2 = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv,
                               ref_lse, sm_scale=scale, head_reduce=head_reduce)
    np.testing.assert_array_equal(np.asarray(imp), np.asarray(imp2))


@pytest.mark.parametrize("case", CASES)
def test_decode_gpu(case):
  _, _, k_pages, v_pages, table, kv = problem(2, *case)
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


def test_auto_backend_is_pallas_on_gpu():
  assert ops.resolve_backend("auto") == "pallas"


def test_layer_of_whole_pool_gpu():
  """layer= over the whole pool [L, K, P, S, H] (traced, inside a scan as in the engine) gives
  what the layer's own slice gives, for the three Triton kernels, to 1e-5. (The Mosaic GPU
  attention compiles to different code for the two pool shapes and may differ by one bf16 ulp in
  a few elements; tests/test_kernels_mgpu.py checks its layer against the reference.)"""
  q, q_pos, k_one, _, table, kv = problem(4, *CASES[0])
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
      w = np.asarray(jnp.asarray(w, jnp.float32))
      got = np.asarray(jnp.asarray(got[i], jnp.float32))
      assert not np.isnan(got).any()
      np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)


def test_layer_past_32bit_offsets_gpu():
  """A pool whose flat [L*K, P*S, H] view has over 2**31 elements (the engine's case: offsets
  into it need 64-bit arithmetic): the last layer's last kv heads live past 2**31."""
  n_layers, n_kv, n_pages, page_size, head_dim = 2, 8, 72000, 16, 128
  shape = (n_layers, n_kv, n_pages, page_size, head_dim)
  assert (n_layers * n_kv - 1) * n_pages * page_size * head_dim > 2**31
  kk, kv_key = jax.random.split(jax.random.PRNGKey(0))
  k_all = jax.random.normal(kk, shape, jnp.bfloat16)
  v_all = jax.random.normal(kv_key, shape, jnp.bfloat16)
  rng = np.random.default_rng(6)
  kv_len = (1500, 900)
  max_pages = -(-max(kv_len) // page_size)
  # Pages near the end of the pool: the largest offsets.
  table = jnp.asarray(n_pages - 1 - rng.permutation(2 * max_pages).reshape(2, max_pages),
                      jnp.int32)
  kv = jnp.asarray(kv_len, jnp.int32)
  q_pos = jnp.asarray(np.stack([np.arange(l - 64, l) for l in kv_len]), jnp.int32)
  q = jnp.asarray(rng.standard_normal((2, 64, 32, head_dim)), jnp.bfloat16)
  scale = 1.0 / math.sqrt(head_dim)
  layer = jnp.int32(n_layers - 1)
  out, lse = paged_attention(q, q_pos, k_all, v_all, table, kv, sm_scale=scale, layer=layer)
  ref_out, ref_lse = paged_attention_reference(q, q_pos, k_all, v_all, table, kv,
                                               sm_scale=scale, layer=layer)
  assert rel_err(out, ref_out) < 1e-2 and rel_err(lse, ref_lse) < 1e-2
  imp = sparse_q_importance(q, q_pos, q_pos >= 0, k_all, table, kv, ref_lse, sm_scale=scale,
                            layer=layer)
  ref_imp = sparse_q_importance_reference(q, q_pos, q_pos >= 0, k_all, table, kv, ref_lse,
                                          sm_scale=scale, layer=layer)
  assert rel_err(imp, ref_imp) < 1e-2
  dec = paged_decode_attention(q[:, -1], k_all, v_all, table, kv, sm_scale=scale, layer=layer)
  ref_dec = paged_decode_attention_reference(q[:, -1], k_all, v_all, table, kv, sm_scale=scale,
                                             layer=layer)
  assert rel_err(dec, ref_dec) < 1e-2


def test_write_kv_past_32bit_offsets_gpu():
  """The in-place K/V write against its XLA reference on a pool whose flat view passes 2**31
  elements, at the last layer (a traced index), with padding slots."""
  from pallas_kernels.write import write_kv, write_kv_reference
  n_layers, n_kv, n_pages, page_size, head_dim = 2, 8, 72000, 16, 128
  shape = (n_layers, n_kv, n_pages, page_size, head_dim)
  kk, kv_key = jax.random.split(jax.random.PRNGKey(1))
  k_pool = jax.random.normal(kk, shape, jnp.bfloat16)
  v_pool = jax.random.normal(kv_key, shape, jnp.bfloat16)
  rng = np.random.default_rng(7)
  sentinel = n_pages * page_size
  slots = rng.choice(np.arange(sentinel - 40000, sentinel), size=(2, 3000), replace=False)
  slots[1, -100:] = sentinel
  slots = jnp.asarray(slots, jnp.int32)
  k = jnp.asarray(rng.standard_normal((2, 3000, n_kv, head_dim)), jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((2, 3000, n_kv, head_dim)), jnp.bfloat16)
  layer = jnp.int32(n_layers - 1)
  want = jax.jit(lambda kp, vp: write_kv_reference(kp, vp, slots, k, v, layer=layer))(
      k_pool, v_pool)
  got = jax.jit(lambda kp, vp: write_kv(kp, vp, slots, k, v, layer=layer))(k_pool, v_pool)
  for g, w in zip(got, want):
    assert bool(jnp.all(g == w))
