"""Shared by the kernel tests (tests/kernels/test_*.py): an independent float64 numpy
implementation of the attention maths (loops; shares no code with pallas_kernels), random paged
problems, and the backends a test runs its kernel on.

Backends: "reference" (the pure-jnp reference), "interpret" (the Pallas kernel in interpret mode,
on CPU: unaliased outputs start as NaN there, the poison every test checks for) and "compiled"
(the Pallas kernel compiled for the GPU: marked `gpu` and skipped unless jax's default backend is
the GPU; run them with `python -m pytest tests/kernels -m gpu` on the device machine).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import paged_attention_reference

ON_GPU = jax.default_backend() == "gpu"
GPU_MARKS = (pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs a GPU"))
# Small float32 problems against the float64 numpy maths (the kernel's float32 dots on a GPU
# would be TF32: not to 1e-5).
CPU_BACKENDS = ["reference", "interpret"]


def on_gpu(test):
  """A "compiled"-backend test: moderate bf16 problems at Llama-like shapes against the f32 jnp
  reference, marked `gpu` and skipped unless jax runs on the GPU."""
  for mark in reversed(GPU_MARKS):
    test = mark(test)
  return test


def kernel_or_reference(kernel, reference, backend, **kernel_kwargs):
  """The function a backend runs: reference, or kernel (interpreted or compiled) with
  kernel_kwargs (block sizes, splits: the reference takes none)."""
  if backend == "reference":
    return reference
  return lambda *a, **kw: kernel(*a, **kw, **kernel_kwargs, interpret=(backend == "interpret"))


# ----------------------------------------------------------------------------
# Independent float64 reference (numpy, loops; shares no code with the package)
# ----------------------------------------------------------------------------


def np_keys(pages, table_row):
  """[K, P, S, H] pages, [MP] table -> [K, MP*S, H] float64 logical keys."""
  k = np.asarray(pages, np.float64)[:, np.asarray(table_row)]
  return k.reshape(k.shape[0], -1, k.shape[-1])


def np_attention(q, q_pos, k_pages, v_pages, page_table, kv_len, scale):
  q = np.asarray(q, np.float64)
  batch, n_tok, n_heads, head_dim = q.shape
  group = n_heads // k_pages.shape[0]
  out = np.zeros((batch, n_tok, n_heads, head_dim))
  lse = np.full((batch, n_tok, n_heads), -np.inf)
  for b in range(batch):
    keys = np_keys(k_pages, page_table[b])
    vals = np_keys(v_pages, page_table[b])
    j = np.arange(keys.shape[1])
    for t in range(n_tok):
      vis = (j <= q_pos[b, t]) & (j < kv_len[b])
      if not vis.any():
        continue
      for n in range(n_heads):
        s = keys[n // group][vis] @ q[b, t, n] * scale
        mx = s.max()
        e = np.exp(s - mx)
        lse[b, t, n] = mx + math.log(e.sum())
        out[b, t, n] = (e / e.sum()) @ vals[n // group][vis]
  return out, lse


def np_importance(q, q_pos, q_is_sparse, k_pages, page_table, kv_len, lse, scale):
  q = np.asarray(q, np.float64)
  lse = np.asarray(lse, np.float64)
  batch, n_tok, n_heads, _ = q.shape
  group = n_heads // k_pages.shape[0]
  n_keys = page_table.shape[1] * k_pages.shape[2]
  per_head = np.zeros((batch, n_heads, n_keys))
  for b in range(batch):
    keys = np_keys(k_pages, page_table[b])
    j = np.arange(n_keys)
    for t in range(n_tok):
      if not q_is_sparse[b, t] or q_pos[b, t] < 0:
        continue
      vis = (j <= q_pos[b, t]) & (j < kv_len[b])
      for n in range(n_heads):
        s = keys[n // group] @ q[b, t, n] * scale
        per_head[b, n] += np.where(vis, np.exp(s - lse[b, t, n]), 0.0)
  return per_head.sum(1)


def np_decode(q, k_pages, v_pages, page_table, kv_len, scale):
  q_pos = (np.asarray(kv_len) - 1)[:, None]
  out, _ = np_attention(np.asarray(q)[:, None], q_pos, k_pages, v_pages,
                        page_table, kv_len, scale)
  return out[:, 0]


# ----------------------------------------------------------------------------
# Random problems
# ----------------------------------------------------------------------------


def rel_err(x, ref):
  """Relative L2 error, in float64 (bf16 arrays go through float32 first)."""
  x = np.asarray(jnp.asarray(x, jnp.float32) if _is_bf16(x) else x, np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32) if _is_bf16(ref) else ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def _is_bf16(x):
  return getattr(x, "dtype", None) == jnp.bfloat16


def make_pool(rng, n_kv, n_pages, page_size, head_dim, dtype):
  shape = (n_kv, n_pages, page_size, head_dim)
  k = rng.standard_normal(shape).astype(np.float32)
  v = rng.standard_normal(shape).astype(np.float32)
  return jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def make_table(rng, batch, max_pages, n_pages):
  """Each request gets distinct pool pages in shuffled order."""
  perm = rng.permutation(n_pages)[:batch * max_pages]
  return jnp.asarray(perm.reshape(batch, max_pages), jnp.int32)


def make_positions(rng, kv_len, n_tok, mode, n_pad):
  """[B, T] sorted query positions: a random subset, all positions, or the last."""
  rows = []
  for length in kv_len:
    n_real = n_tok - n_pad
    if mode == "all":
      p = np.arange(length - n_real, length)
    elif mode == "last":
      p = np.array([length - 1])
    else:
      p = np.sort(rng.choice(length, size=n_real, replace=False))
      p[-1] = length - 1  # the prompt's last token is always a query
      p = np.unique(p)
      while len(p) < n_real:  # keep it sorted and duplicate-free
        p = np.unique(np.append(p, rng.integers(0, length)))
    rows.append(np.concatenate([p, -np.ones(n_pad, np.int64)]))
  return jnp.asarray(np.stack(rows), jnp.int32)


# ----------------------------------------------------------------------------
# GPU problems: random bf16 at moderate Llama-like shapes, page tables shuffled, kv lengths
# ragged; the references compute in f32 from the same bf16 inputs. Criterion: relative L2 error
# < 1e-2, no NaN anywhere.
# ----------------------------------------------------------------------------


GPU_CASES = [
    # (batch, n_heads, n_kv, head_dim, page_size, kv_len, frac)
    (2, 32, 8, 128, 16, (2048, 1337), 0.15),  # Llama-3-8B heads, ragged
    (1, 9, 3, 64, 16, (1500,), 0.3),  # SmolLM2 heads: group 3, dim 64
    (2, 8, 8, 64, 32, (700, 1024), 1.0),  # group 1, all positions
    (1, 32, 8, 128, 16, (8192,), 0.004),  # 32 queries over 8K keys: split over keys
]


def gpu_problem(seed, batch, n_heads, n_kv, head_dim, page_size, kv_len, frac,
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


def pool_past_32bit():
  """A bf16 pool [L, K, P, S, H] whose flat [L*K, P*S, H] view has over 2**31 elements (the
  engine's case: offsets into it need 64-bit arithmetic), read at its last layer (traced), whose
  last kv heads live past 2**31, by requests whose pages sit near the pool's end -> (q, q_pos,
  k_all, v_all, table, kv_len, layer)."""
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
  q_pos = jnp.asarray(np.stack([np.arange(n - 64, n) for n in kv_len]), jnp.int32)
  q = jnp.asarray(rng.standard_normal((2, 64, 32, head_dim)), jnp.bfloat16)
  return q, q_pos, k_all, v_all, table, kv, jnp.int32(n_layers - 1)


def random_pool(rng, shape, dtype):
  """Random K and V pools [L, K, P, S, H]."""
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))
