"""Assembly of reused K/V (pallas_kernels/assemble.py): gather, re-rotate and write in one pass,
the kernel (interpret mode) against its XLA reference, in place, on a random pool."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.assemble import assemble_kv, assemble_kv_reference
from tests.kernels.problems import random_pool


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_interpreted_matches_reference(dtype):
  rng = np.random.default_rng(3)
  n_layers, n_kv, n_pages, page, head_dim = 2, 2, 12, 4, 16
  k, v = random_pool(rng, (n_layers, n_kv, n_pages, page, head_dim), dtype)
  sentinel = n_pages * page
  # Row 0: a segment moved by 3 positions; row 1: by 1000 (angles far from 0); padding tokens
  # (sentinel dst) write nothing, whatever their src.
  src = np.array([[4, 5, 6, 7, 8, 3, 0], [9, 10, 11, 0, 0, 0, 0]], np.int32)
  dst = np.array([[20, 21, 22, 23, 24, sentinel, sentinel],
                  [30, 31, 32, sentinel, sentinel, sentinel, sentinel]], np.int32)
  delta = np.array([[3, 3, 3, 3, 3, 9, 0], [1000, 1000, 1000, 0, 0, 0, 0]], np.int32)
  inv_freq = (1.0 / (10000 ** (np.arange(0, head_dim, 2) / head_dim))).astype(np.float32)
  want_k, want_v = assemble_kv_reference(k, v, src, dst, delta, inv_freq)
  got_k, got_v = assemble_kv(k, v, src, dst, delta, inv_freq, block_t=16, interpret=True)
  tol = 1e-6 if dtype == np.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32),
                             atol=tol)
  np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))
  # Only the destination slots changed, and K there is the source rotated (not a copy).
  changed = np.any(np.asarray(got_k, np.float32) != np.asarray(k, np.float32), axis=(0, 1, 4))
  assert sorted(np.flatnonzero(changed.reshape(-1))) == [20, 21, 22, 23, 24, 30, 31, 32]


def _assemble_float64(k, v, src, dst, delta, inv_freq, first_layer=0):
  """An independent float64 numpy assembly: each real token's cached K rotated by its delta
  (RoPE on the two halves of the head dim, as models/llama.py applies it), V copied; layers
  below first_layer as they were."""
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  n_layers, n_kv, n_pages, page, head_dim = k.shape
  k_flat, v_flat = k.reshape(n_layers, n_kv, -1, head_dim), v.reshape(n_layers, n_kv, -1, head_dim)
  want_k, want_v = k_flat.copy(), v_flat.copy()
  for s, d, p in zip(src.ravel(), dst.ravel(), delta.ravel()):
    if d >= n_pages * page:
      continue
    angle = p * np.asarray(inv_freq, np.float64)
    a, b = np.split(k_flat[:, :, s], 2, axis=-1)
    rotated = np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                              b * np.cos(angle) + a * np.sin(angle)], axis=-1)
    want_k[first_layer:, :, d] = rotated[first_layer:]
    want_v[first_layer:, :, d] = v_flat[first_layer:, :, s]
  return want_k.reshape(k.shape), want_v.reshape(v.shape)


@pytest.mark.parametrize("first_layer", [0, 2])
@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_assembly_rotates_by_delta_against_float64_numpy(backend, first_layer):
  """Every layer, or layers [2, 3) only (the prefill's sparse layers at T = 2)."""
  rng = np.random.default_rng(11)
  n_layers, n_kv, n_pages, page, head_dim = 3, 2, 10, 4, 16
  k, v = random_pool(rng, (n_layers, n_kv, n_pages, page, head_dim), np.float32)
  sentinel = n_pages * page
  src = rng.choice(np.arange(page, sentinel), size=(2, 8), replace=False).astype(np.int32)
  dst = rng.choice(np.setdiff1d(np.arange(page, sentinel), src), size=(2, 8),
                   replace=False).astype(np.int32)
  dst[1, -3:] = sentinel  # padding: written nowhere
  delta = rng.integers(-50, 5000, size=(2, 8)).astype(np.int32)
  inv_freq = (1.0 / (1e5 ** (np.arange(0, head_dim, 2) / head_dim))).astype(np.float32)
  if backend == "reference":
    got_k, got_v = assemble_kv_reference(k, v, src, dst, delta, inv_freq, first_layer)
  else:
    got_k, got_v = assemble_kv(k, v, src, dst, delta, inv_freq, first_layer, block_t=16,
                               interpret=True)
  want_k, want_v = _assemble_float64(k, v, src, dst, delta, inv_freq, first_layer)
  # float32 angles of up to 5000 radians: about 5000 * 2**-24 of absolute phase error
  np.testing.assert_allclose(np.asarray(got_k, np.float64), want_k, atol=2e-3, rtol=0)
  np.testing.assert_array_equal(np.asarray(got_v, np.float64), want_v)
