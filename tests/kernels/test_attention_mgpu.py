"""The Mosaic GPU sparse-query kernel (pallas_kernels/attention_mgpu.py).

On CPU: its row-tile arithmetic against a numpy count; its schedule (row order, per-tile block
ranges, key splits, masks, merge) emulated in float64 against plain attention (hypothesis); and
the kernel lowered for CUDA through jax.export (Mosaic GPU's lowering runs in Python, so shape,
layout and barrier mistakes fail here; Mosaic GPU's interpret mode in jax 0.10 has no wgmma, so
the numbers are checked on the GPU).
On a Hopper GPU: bf16 outputs and lse against the f32 jnp reference (relative L2 < 1e-2), padding
rows zero with lse -inf, key splits, both query layouts (token-major and grouped rows), the layer
of a whole pool read inside a scan.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import attention_mgpu, ops
from pallas_kernels._paged import group_rows, ungroup_rows
from pallas_kernels.attention import paged_attention_reference
from pallas_kernels.attention_mgpu import (merge_key_splits, paged_attention_mgpu, parse_configs,
                                           row_tiles, split_steps, token_major_positions)
from tests.kernels.problems import assert_matches_reference, gpu_problem, rel_err

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
  q, q_pos, k_pages, v_pages, table, kv = gpu_problem(0, *case)
  scale = 1.0 / math.sqrt(q.shape[-1])
  out, lse = paged_attention_mgpu(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale, **kw)
  assert_matches_reference(out, lse, q, q_pos, k_pages, v_pages, table, kv, scale)


@pytest.mark.gpu
@on_hopper
def test_layer_of_whole_pool_gpu():
  """layer= over the whole pool [L, K, P, S, H], traced inside a scan as in the engine."""
  q, q_pos, k_all, v_all, table, kv = gpu_problem(4, *GPU_CASES[0][0], n_layers=3)
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
  q, q_pos, k_pages, v_pages, table, kv = gpu_problem(6, *GPU_CASES[0][0])
  scale = 1.0 / math.sqrt(q.shape[-1])
  got = {b: ops.attention(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale, backend=b)
         for b in ("pallas", "pallas_triton")}
  mine = paged_attention_mgpu(q, q_pos, k_pages, v_pages, table, kv, sm_scale=scale)
  np.testing.assert_array_equal(np.asarray(got["pallas"][0], np.float32),
                                np.asarray(mine[0], np.float32))
  assert rel_err(got["pallas"][0], got["pallas_triton"][0]) < 1e-2


# ------------------------------------------------------------------------------------------------
# The kernel's schedule, emulated in float64 on CPU: the same row order, row_tiles, split_steps
# and merge_key_splits as the kernel, blocks of keys processed as its warpgroups process them
# (unmasked below full_end, masked up to last, nothing past it), against plain attention.
# ------------------------------------------------------------------------------------------------

def _attention64(q, q_pos, k, v, kv_len, scale):
  """Plain attention: q [B, T, N, H], k, v [B, K, L, H] (float64) -> out [B, T, N, H], lse."""
  batch, n_tok, n_heads, _ = q.shape
  group = n_heads // k.shape[1]
  out, lse = np.zeros(q.shape), np.full(q.shape[:3], -np.inf)
  for b in range(batch):
    for t in range(n_tok):
      p = q_pos[b, t]
      if p < 0:
        continue
      seen = min(p + 1, kv_len[b])
      for n in range(n_heads):
        s = k[b, n // group, :seen] @ q[b, t, n] * scale
        top = s.max()
        w = np.exp(s - top)
        out[b, t, n] = w @ v[b, n // group, :seen] / w.sum()
        lse[b, t, n] = top + np.log(w.sum())
  return out, lse


def _emulate(q, q_pos, k, v, kv_len, scale, block_kv, key_splits, token_major, block_q=64):
  """The kernel's arithmetic on the host: -> out [B, T, N, H], lse [B, T, N] (float64)."""
  batch, n_tok, n_heads, head_dim = q.shape
  n_kv, n_keys = k.shape[1], k.shape[2]
  group = n_heads // n_kv
  eff = np.where(q_pos >= 0, np.minimum(q_pos, kv_len[:, None] - 1), -1)
  per_prog = 2 * block_q // group if token_major else None
  if token_major:  # row r of tile i: head g = (r % 64) // tpt, token i * tpt + r % tpt
    t_pad = -(-n_tok // per_prog) * per_prog
    eff = np.pad(eff, ((0, 0), (0, t_pad - n_tok)), constant_values=-1)
    pos = np.asarray(token_major_positions(jnp.asarray(eff), group, block_q))
    tpt = block_q // group
    r = np.arange(pos.shape[1])
    token = (r // block_q) * tpt + r % tpt
    head_of = (r % block_q) // tpt
    qpad = np.pad(q, ((0, 0), (0, t_pad - n_tok), (0, 0), (0, 0)))
    rows = np.stack([qpad[:, token, h * group + head_of] for h in range(n_kv)], axis=1)
  else:
    qr, pos = group_rows(jnp.asarray(q), jnp.asarray(eff, jnp.int32), n_kv,
                                   2 * block_q)
    rows, pos = np.asarray(qr, np.float64), np.asarray(pos)
  tiles = np.asarray(row_tiles(jnp.asarray(pos, jnp.int32), block_q, block_kv))
  n_blocks = -(-n_keys // block_kv)
  split_blocks = -(-n_blocks // key_splits)
  kpad = np.pad(k, ((0, 0), (0, 0), (0, n_blocks * block_kv - n_keys), (0, 0)))
  vpad = np.pad(v, ((0, 0), (0, 0), (0, n_blocks * block_kv - n_keys), (0, 0)))
  n_rows = pos.shape[1]
  out_s = np.zeros((batch, n_kv, key_splits, n_rows, head_dim))
  lse_s = np.full((batch, n_kv, key_splits, n_rows), -np.inf)
  for b in range(batch):
    for h in range(n_kv):
      for tile in range(n_rows // block_q):
        sl = slice(tile * block_q, (tile + 1) * block_q)
        qt, pt = rows[b, h, sl], pos[b, sl]
        for split in range(key_splits):
          first = split * split_blocks
          full_end, last = (int(x) for x in split_steps(*tiles[b, tile], first, split_blocks))
          m, l_sum, acc = np.full(block_q, -1e30), np.zeros(block_q), np.zeros((block_q, head_dim))
          for j in range(first, last):
            keys = slice(j * block_kv, (j + 1) * block_kv)
            s = qt @ kpad[b, h, keys].T * scale
            if j >= full_end:  # the masked blocks; the unmasked ones must not need it
              s = np.where(np.arange(j * block_kv, (j + 1) * block_kv)[None] <= pt[:, None],
                           s, -np.inf)
            m_new = np.maximum(m, s.max(axis=1))
            p = np.exp(s - m_new[:, None])
            alpha = np.exp(m - m_new)
            l_sum = l_sum * alpha + p.sum(axis=1)
            acc, m = acc * alpha[:, None] + p @ vpad[b, h, keys], m_new
          ok = (pt >= 0) & (l_sum > 0)
          out_s[b, h, split, sl] = np.where(ok[:, None], acc / np.where(ok, l_sum, 1)[:, None], 0)
          lse_s[b, h, split, sl] = np.where(ok, m + np.log(np.where(ok, l_sum, 1)), -np.inf)
  out, lse = (np.asarray(x) for x in merge_key_splits(jnp.asarray(out_s), jnp.asarray(lse_s)))
  if token_major:
    out_t = np.zeros((batch, t_pad, n_heads, head_dim))
    lse_t = np.full((batch, t_pad, n_heads), -np.inf)
    for h in range(n_kv):
      out_t[:, token, h * group + head_of] = out[:, h]
      lse_t[:, token, h * group + head_of] = lse[:, h]
    return out_t[:, :n_tok], lse_t[:, :n_tok]
  return (np.asarray(ungroup_rows(jnp.asarray(out), n_tok, group)),
          np.asarray(ungroup_rows(jnp.asarray(lse), n_tok, group)))


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_schedule_emulation_matches_attention(data):
  """Row order, per-tile block ranges, key splits, masks and the merge, as the kernel runs them,
  give plain attention (float64), for random sorted positions with padding, ragged lengths."""
  group, token_major = data.draw(st.sampled_from([(1, True), (4, True), (8, True), (4, False),
                                                  (3, False)]))
  n_kv, head_dim = data.draw(st.integers(1, 2)), 4
  batch = data.draw(st.integers(1, 2))
  kv_len = np.array([data.draw(st.integers(1, 400)) for _ in range(batch)])
  block_kv = data.draw(st.sampled_from([64, 128]))
  key_splits = data.draw(st.integers(1, 5))
  n_tok = data.draw(st.integers(1, 70))
  seed = data.draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  q_pos = np.full((batch, n_tok), -1)
  for b in range(batch):
    n = min(n_tok - data.draw(st.integers(0, min(5, n_tok - 1))), kv_len[b])
    q_pos[b, :n] = np.sort(rng.choice(kv_len[b], size=n, replace=False))
  n_keys = int(kv_len.max()) + data.draw(st.integers(0, 40))  # keys past kv_len hold junk
  q = rng.standard_normal((batch, n_tok, n_kv * group, head_dim))
  k = rng.standard_normal((batch, n_kv, n_keys, head_dim))
  v = rng.standard_normal((batch, n_kv, n_keys, head_dim))
  with jax.enable_x64():  # the jnp helpers (row grouping, tiles, merge) in float64 too
    got_out, got_lse = _emulate(q, q_pos, k, v, kv_len, 0.5, block_kv, key_splits, token_major)
  want_out, want_lse = _attention64(q, q_pos, k, v, kv_len, 0.5)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-10, atol=1e-10)
  real = np.isfinite(want_lse)
  assert np.array_equal(np.isfinite(got_lse), real)
  np.testing.assert_allclose(got_lse[real], want_lse[real], rtol=1e-10)


def test_parse_configs():
  """The kernel options scripts/bench_kernels.py --mgpu-configs times, and a bad entry named in
  the error."""
  assert parse_configs("128:2:auto:auto, 64:3:4:0") == ((128, 2, None, None), (64, 3, 4, False))
  with pytest.raises(ValueError, match="'128:2:x:auto'"):
    parse_configs("128:2:auto:auto,128:2:x:auto")
  with pytest.raises(ValueError, match="'128:2:4'"):
    parse_configs("128:2:4")
