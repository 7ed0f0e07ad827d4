"""CPU tests of pallas_kernels: Pallas kernels in interpret mode vs the jnp references
vs an independent float64 numpy implementation of the attention maths.

Inputs are random (never zeros), page tables are shuffled, kv lengths ragged.
Unaliased Pallas outputs start as NaN in interpret mode, which is the poison:
every test asserts that no NaN survives, i.e. every element was written.
Shapes are small so the whole file runs in well under two minutes.
"""

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ops
from pallas_kernels.attention import (choose_key_splits, paged_attention,
                                      paged_attention_reference)
from pallas_kernels.decode import (paged_decode_attention,
                                   paged_decode_attention_reference)
from pallas_kernels.importance import (sparse_q_importance,
                                       sparse_q_importance_reference)

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


def np_importance(q, q_pos, q_is_sparse, k_pages, page_table, kv_len, lse,
                  scale, head_reduce):
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
  if head_reduce == "per_kv_head":
    return per_head.reshape(batch, k_pages.shape[0], group, n_keys).sum(2)
  return per_head.sum(1) if head_reduce == "sum" else per_head.max(1)


def np_decode(q, k_pages, v_pages, page_table, kv_len, scale):
  q_pos = (np.asarray(kv_len) - 1)[:, None]
  out, _ = np_attention(np.asarray(q)[:, None], q_pos, k_pages, v_pages,
                        page_table, kv_len, scale)
  return out[:, 0]


# ----------------------------------------------------------------------------
# Random problems
# ----------------------------------------------------------------------------


def rel_err(x, ref):
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


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


@pytest.mark.parametrize("key_splits", [1, 3])
@pytest.mark.parametrize("case", ATTN_CASES)
def test_paged_attention_matches_references(case, key_splits):
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

  out, lse = paged_attention(q, q_pos, k_pages, v_pages, table, kv,
                             sm_scale=scale, block_k=block_k, key_splits=key_splits,
                             interpret=True)
  ref_out, ref_lse = paged_attention_reference(q, q_pos, k_pages, v_pages,
                                               table, kv, sm_scale=scale)
  np_out, np_lse = np_attention(q, np.asarray(q_pos), k_pages, v_pages,
                                np.asarray(table), kv_len, scale)

  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
  assert not np.isnan(np.asarray(out)).any()
  assert not np.isnan(np.asarray(lse)).any()
  assert rel_err(out, np_out) < 1e-5
  assert rel_err(ref_out, np_out) < 1e-5
  pad = np.asarray(q_pos) < 0
  assert np.all(np.asarray(out)[pad] == 0) and np.all(np.isneginf(np.asarray(lse)[pad]))
  assert np.all(np.isneginf(np.asarray(ref_lse)[pad]))
  real = ~pad
  np.testing.assert_allclose(np.asarray(lse)[real], np_lse[real], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(ref_lse)[real], np_lse[real], rtol=1e-5,
                             atol=1e-5)


def test_key_splits_only_where_rows_are_too_few():
  # naive reuse at 8K: 32 tokens x 4 heads = 2 row blocks per (request, kv head), 8 kv heads
  assert choose_key_splits(1, 8, 2, 8192, 64) == 32  # 16 programs -> 512
  assert choose_key_splits(1, 8, 80, 8192, 64) == 1  # 640 programs: the rows fill the GPU
  assert choose_key_splits(1, 8, 2, 512, 64) == 2  # at least 4 key blocks per split
  assert choose_key_splits(1, 8, 2, 128, 64) == 1


def test_paged_attention_bf16_and_block_m():
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


def test_empty_request_gives_zero_and_neg_inf():
  """kv_len = 0: every row sees nothing -> out 0, lse -inf, never NaN."""
  rng = np.random.default_rng(3)
  k_pages, v_pages = make_pool(rng, 1, 4, 16, 64, jnp.float32)
  table = make_table(rng, 1, 2, 4)
  q = jnp.asarray(rng.standard_normal((1, 4, 2, 64)), jnp.float32)
  q_pos = jnp.asarray([[0, 1, 2, 3]], jnp.int32)
  kv = jnp.zeros((1,), jnp.int32)
  for fn, kw in ((paged_attention, dict(interpret=True)),
                 (paged_attention_reference, {})):
    out, lse = fn(q, q_pos, k_pages, v_pages, table, kv, sm_scale=0.1, **kw)
    assert np.all(np.asarray(out) == 0)
    assert np.all(np.isneginf(np.asarray(lse)))


# (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok,
#  head_reduce, block_k)
IMP_CASES = [
    (2, 2, 2, 64, 16, 5, (75, 40), 14, "sum", 32),
    (2, 6, 2, 64, 8, 7, (50, 33), 12, "max", 16),
    (1, 8, 2, 128, 16, 4, (64,), 20, "sum", 32),
    (1, 8, 2, 128, 16, 4, (57,), 20, "max", 64),
    (2, 6, 3, 64, 8, 6, (45, 30), 12, "per_kv_head", 16),
]


@pytest.mark.parametrize("case", IMP_CASES)
def test_sparse_q_importance_matches_references(case):
  (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, n_tok,
   head_reduce, block_k) = case
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

  imp = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv, lse,
                            sm_scale=scale, head_reduce=head_reduce,
                            block_m=16, block_k=block_k, interpret=True)
  ref = sparse_q_importance_reference(q, q_pos, is_sparse, k_pages, table, kv,
                                      lse, sm_scale=scale,
                                      head_reduce=head_reduce)
  want = np_importance(q, np.asarray(q_pos), np.asarray(is_sparse), k_pages,
                       np.asarray(table), kv_len, lse, scale, head_reduce)
  per_kv = head_reduce == "per_kv_head"
  assert imp.shape == ((batch, n_kv) if per_kv else (batch,)) + (max_pages * page_size,)
  assert imp.dtype == jnp.float32
  assert not np.isnan(np.asarray(imp)).any()
  assert rel_err(imp, want) < 1e-5
  assert rel_err(ref, want) < 1e-5
  # Keys at or beyond kv_len get no mass.
  for b, length in enumerate(kv_len):
    assert np.all(np.asarray(imp)[b, ..., length:] == 0)
  # Deterministic: a second run is bit-identical.
  imp2 = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv, lse,
                             sm_scale=scale, head_reduce=head_reduce,
                             block_m=16, block_k=block_k, interpret=True)
  np.testing.assert_array_equal(np.asarray(imp), np.asarray(imp2))


# (batch, n_heads, n_kv, head_dim, page_size, max_pages, kv_len, num_splits)
DECODE_CASES = [
    (3, 2, 2, 64, 16, 6, (90, 1, 57), None),
    (2, 6, 2, 64, 8, 9, (72, 30), 4),  # splits past kv_len are empty
    (2, 8, 2, 128, 16, 5, (80, 17), 1),
]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_paged_decode_matches_references(case):
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
  out = paged_decode_attention(q, k_pages, v_pages, table, kv, sm_scale=scale,
                               block_k=16, num_splits=num_splits,
                               interpret=True)
  ref = paged_decode_attention_reference(q, k_pages, v_pages, table, kv,
                                         sm_scale=scale)
  want = np_decode(q, k_pages, v_pages, np.asarray(table), kv_len, scale)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert not np.isnan(np.asarray(out)).any()
  assert rel_err(out, want) < 1e-5
  assert rel_err(ref, want) < 1e-5


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


def test_sparse_q_importance_bf16():
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
  for head_reduce in ("sum", "max"):
    imp = sparse_q_importance(q, q_pos, is_sparse, k_pages, table, kv, lse,
                              sm_scale=0.125, head_reduce=head_reduce,
                              block_m=32, block_k=32, interpret=True)
    ref = sparse_q_importance_reference(q, q_pos, is_sparse, k_pages, table,
                                        kv, lse, sm_scale=0.125,
                                        head_reduce=head_reduce)
    assert not np.isnan(np.asarray(imp)).any()
    assert rel_err(imp, ref) < 1e-3


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


# ----------------------------------------------------------------------------------------------
# Assembly (gather + re-rotate + write, one pass)
# ----------------------------------------------------------------------------------------------


def _random_pool(rng, shape, dtype):
  """Random K and V pools [L, K, P, S, H]."""
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(2))


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_assemble_kv_kernel_matches_reference(dtype):
  from pallas_kernels.assemble import assemble_kv, assemble_kv_reference
  rng = np.random.default_rng(3)
  n_layers, n_kv, n_pages, page, head_dim = 2, 2, 12, 4, 16
  k, v = _random_pool(rng, (n_layers, n_kv, n_pages, page, head_dim), dtype)
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


# ----------------------------------------------------------------------------------------------
# K/V write of one layer (in place)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_write_kv_kernel_matches_reference(dtype):
  from pallas_kernels.write import write_kv, write_kv_reference
  rng = np.random.default_rng(8)
  n_layers, n_kv, n_pages, page, head_dim = 3, 2, 12, 4, 16
  k_pool, v_pool = _random_pool(rng, (n_layers, n_kv, n_pages, page, head_dim), dtype)
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
