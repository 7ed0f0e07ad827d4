"""The K/V write of one layer (pallas_kernels/write.py): the in-place kernel (interpreted on CPU,
compiled on the GPU) against its XLA scatter reference, on random pools."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.write import write_kv, write_kv_reference
from tests.kernels.problems import on_gpu, random_pool


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_interpreted_matches_reference(dtype):
  rng = np.random.default_rng(8)
  n_layers, n_kv, n_pages, page, head_dim = 3, 2, 12, 4, 16
  k_pool, v_pool = random_pool(rng, (n_layers, n_kv, n_pages, page, head_dim), dtype)
  sentinel = n_pages * page
  # [B=2, T=19] slots in pages >= 1 (page 0 is the null page), padding tokens at the sentinel.
  slots = rng.choice(np.arange(page, sentinel), size=38, replace=False).reshape(2, 19)
  slots[0, -3:] = slots[1, -7:] = sentinel
  slots = jnp.asarray(slots, jnp.int32)
  k = jnp.asarray(rng.normal(size=(2, 19, n_kv, head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 19, n_kv, head_dim)), jnp.float32)
  for layer in range(n_layers):  # the layer traced, as inside the programs' layer loops
    run = jax.jit(lambda kp, vp, layer: write_kv(kp, vp, slots, k, v, layer=layer, block_t=16,
                                                 interpret=True))
    got = run(k_pool, v_pool, jnp.int32(layer))
    want = write_kv_reference(k_pool, v_pool, slots, k, v, layer=jnp.int32(layer))
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    # The real tokens' rows hold k (cast to the pool's dtype); nothing else changed.
    ok = np.asarray(slots) < sentinel
    flat = np.asarray(got[0], np.float32).reshape(n_layers, n_kv, sentinel, head_dim)
    np.testing.assert_array_equal(
        flat[layer][:, np.asarray(slots)[ok]],
        np.asarray(jnp.asarray(k, dtype), np.float32)[ok].transpose(1, 0, 2))
    before = np.asarray(k_pool, np.float32).reshape(flat.shape)
    changed = np.any(flat != before, axis=(1, 3))
    assert sorted(zip(*np.nonzero(changed))) == sorted((layer, s) for s in np.asarray(slots)[ok])


@on_gpu
def test_compiled_past_32bit_offsets():
  """The in-place K/V write against its XLA reference on a pool whose flat view passes 2**31
  elements, at the last layer (a traced index), with padding slots."""
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
