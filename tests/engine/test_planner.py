"""The planner: shape buckets, token labels from real cache lookups, the padded device batch and
its static spec, slot copies."""

import numpy as np
import pytest

from models.config import get_config
from sparsex_jax import planner
from sparsex_jax.kv import KVStore, PoolLayout, slot_of
from sparsex_jax.planner import EXACT, NEW, REUSED
from sparsex_jax.prompt import Prompt
from sparsex_jax.reuse import ReuseConfig

CFG = get_config("tiny")


def _prompt(*segments, cache=None):
  cache = cache or [True] * len(segments)
  return Prompt(tuple(np.asarray(s, np.int32) for s in segments), tuple(cache))


def _store(num_pages=64, page_size=4):
  return KVStore(PoolLayout.for_model(CFG, page_size=page_size, num_pages=num_pages))


def test_bucket_bounds_padding_and_is_monotone():
  sizes = np.arange(1, 20000, 7)
  b = np.array([planner.bucket(int(n)) for n in sizes])
  assert np.all(b >= sizes) and np.all(np.diff(b) >= 0)
  big = sizes > 256  # powers of two below, quarter-octave steps above: at most 25% padding
  assert np.all(b[big] <= 1.25 * sizes[big]) and np.all(b[~big] < 2 * np.maximum(sizes[~big], 16))
  assert len(set(b)) < 60  # a bounded set of compiled shapes
  assert planner.bucket(1, minimum=1) == 1 and planner.bucket(3, minimum=1) == 4


def test_labels_from_cache_hits_and_selection_counts():
  rng = np.random.default_rng(0)
  system, doc, other, question = (rng.integers(3, 500, n) for n in (10, 13, 7, 5))
  store = _store()
  layout = store.layout
  # The cache holds: the system prompt's 2 full blocks (exact), doc computed at positions 40..52.
  pages = store.allocator.allocate(3)
  store.prefix_cache.insert(system, pages)
  doc_pages = store.allocator.allocate(4)
  store.segment_cache.insert(doc, doc_pages, np.arange(40, 53))
  store.allocator.decref(np.concatenate([pages, doc_pages]))

  prompt = _prompt(system, other, doc, question, cache=[True, True, True, False])
  policy = ReuseConfig("sparsex", recompute_ratio=0.5, layer_threshold=1).resolve(CFG)
  with store.acquire([prompt], policy, max_new_tokens=3) as leases:
    plan = planner.plan_request(prompt, leases[0], policy, layout)
    n = plan.n
    assert n == 35 and plan.n_exact == 8 and leases[0].n_exact == 8
    want = np.array([EXACT] * 8 + [NEW] * 2 + [NEW] * 7 + [REUSED] * 13 + [NEW] * 5)
    np.testing.assert_array_equal(plan.labels, want)
    j = np.arange(13)
    np.testing.assert_array_equal(plan.src_slots[17:30], slot_of(doc_pages, j, 4))
    np.testing.assert_array_equal(plan.old_positions[17:30], 40 + j)
    np.testing.assert_array_equal(plan.segment_ids, np.repeat([0, 1, 2, 3], [10, 7, 13, 5]))
    assert plan.page_table.size == layout.pages_for(n + 3) and plan.page_table[0] == pages[0]
    assert plan.n_select == 7  # ceil(0.5 * 13)
    assert plan.sparse_q.sum() == 14 and plan.sparse_q[-1]  # the new tokens; the last is one

    batch, spec = planner.plan_batch([plan], policy, CFG, layout)
    m = n - 8
    assert batch.tokens.shape == (1, 32) and batch.page_table.shape == (1, 16)
    np.testing.assert_array_equal(batch.positions[0, :m], np.arange(8, n))
    assert np.all(batch.positions[0, m:] == -1) and np.all(batch.slots[0, m:] == layout.sentinel)
    np.testing.assert_array_equal(batch.slots[0, :m], slot_of(plan.page_table, np.arange(8, n), 4))
    np.testing.assert_array_equal(batch.delta[0, 9:22], np.arange(17, 30) - (40 + j))
    assert batch.reused[0].sum() == 13 and batch.last_index[0] == m - 1 and batch.kv_len[0] == n
    assert (spec.layer_threshold, spec.scorer, spec.assemble) == (1, policy.scorer, True)
    # The default reads the Sparse-Q rows' attention through the probe (their lse recomputed),
    # in the active set's bucket: one program per (tokens, active) pair, not per triple.
    want = max(planner.bucket(int(plan.sparse_q[8:].sum()) + 7),
               planner.bucket(int(plan.sparse_q.sum())))
    assert spec.n_active == spec.n_probe == want
    # CacheBlend reads the K/V deviation alone: no probe
    blend = ReuseConfig("cacheblend", recompute_ratio=0.5).resolve(CFG)
    plan.given_score, plan.forced = None, None
    _, spec2 = planner.plan_batch([plan], blend, CFG, layout)
    assert spec2.scorer == blend.scorer and spec2.n_probe == 0
  store.check_invariants()
  assert store.allocator.num_used == 2 + 4  # what the caches hold: 2 full blocks, 4 doc pages


def test_spec_without_reuse_runs_every_layer_and_probe_only_at_threshold_zero():
  store = _store()
  prompt = _prompt(np.arange(3, 20))
  for reuse, want_t in ((ReuseConfig("sparsex"), CFG.n_layers), (ReuseConfig("full"), 3)):
    policy = reuse.resolve(CFG)
    with store.acquire([prompt], policy, 0) as leases:
      plan = planner.plan_request(prompt, leases[0], policy, store.layout)
      _, spec = planner.plan_batch([plan], policy, CFG, store.layout)
    assert (spec.layer_threshold, spec.scorer, spec.n_active) == (want_t, None, 0)
  # a reused segment at T = 0: the Sparse-Q rows probe layer 0
  store.segment_cache.insert(np.arange(3, 20), store.allocator.allocate(5), np.arange(17))
  policy = ReuseConfig("sparsex", layer_threshold=0).resolve(CFG)
  prompt = _prompt(np.arange(30, 35), np.arange(3, 20), cache=[False, True])
  with store.acquire([prompt], policy, 0) as leases:
    plan = planner.plan_request(prompt, leases[0], policy, store.layout)
    _, spec = planner.plan_batch([plan], policy, CFG, store.layout)
  assert (spec.layer_threshold, spec.scorer, spec.n_probe) == (0, policy.scorer, 16)
  assert type(policy.scorer).__name__ == "AttentionMass"


def test_pad_copies_and_describe():
  layout = PoolLayout.for_model(CFG, page_size=4, num_pages=32)
  src, dst = planner.pad_copies([np.arange(5), np.arange(20, 40)], [np.arange(5) + 50,
                                                                    np.arange(60, 80)], layout)
  assert src.shape == dst.shape == (1, 32)  # 25 slots in one row, bucketed
  np.testing.assert_array_equal(src[0, :25], np.r_[np.arange(5), np.arange(20, 40)])
  np.testing.assert_array_equal(dst[0, :25], np.r_[np.arange(5) + 50, np.arange(60, 80)])
  assert np.all(dst[0, 25:] == layout.sentinel) and np.all(src[0, 25:] == 0)
  # the shape depends on the total alone: 3 copies of 7 and 1 of 21 share a program
  assert planner.pad_copies([np.arange(7)] * 3, [np.arange(7)] * 3, layout)[0].shape == \
      planner.pad_copies([np.arange(21)], [np.arange(21)], layout)[0].shape
  with pytest.raises(ValueError, match="source slots"):
    planner.pad_copies([np.arange(3)], [np.arange(4)], layout)

