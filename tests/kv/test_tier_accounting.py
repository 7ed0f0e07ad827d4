"""Tier accounting (kv/store.py + kv/host_tier.py + kv/persist.py), host side only: a property
test over random jobs on a tiny pool and host budget, with a numpy stand-in for the device pool.
After every job: every page is free or referenced by exactly its holders, every host segment is
pinned only by live leases, nothing is lost when tiers overflow (a segment ever cached is in the
pool, the host tier, on disk, or reported dropped; never in the pool and the host at once), a
copy from the host tier writes exactly the K/V that was evicted (layers [T, L)), and the disk
tier's files verify."""

import tempfile

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, event, given, settings

from models.config import get_config
from sparsex_jax.kv import KVStore, PoolExhausted, PoolLayout, persist
from sparsex_jax.kv.host_tier import HostTier, finish_loads
from sparsex_jax.kv.segment_cache import segment_key
from sparsex_jax.prompt import Prompt
from sparsex_jax.reuse import ReuseConfig

CFG = get_config("tiny")
S = 4
SEGMENTS = [np.random.default_rng(i).integers(3, 500, size=n).astype(np.int32)
            for i, n in enumerate((3, 5, 8, 4, 6))]


class NumpyPool:
  """The PageIO the engine's KVPool implements, over numpy arrays."""

  def __init__(self, num_pages):
    shape = (CFG.n_layers, CFG.n_kv_heads, num_pages, S, CFG.head_dim)
    self.k, self.v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)

  def read_pages(self, pages):
    return self.k[:, :, pages].copy(), self.v[:, :, pages].copy()

  def write_pages(self, pages, k, v):
    self.k[:, :, pages], self.v[:, :, pages] = k, v

  def stage_page_layers(self, k, v):
    return k, v

  def write_page_layers(self, pages, staged, first_layer, start_layer=None, end_layer=None):
    from sparsex_jax.kv.host_tier import dequantize
    k, v = staged
    end = CFG.n_layers if end_layer is None else end_layer
    extra = first_layer - k.start_layer  # staged layers below first_layer: not written
    assert extra >= 0 and k.end_layer >= end and start_layer in (None, k.start_layer)
    pages = np.asarray(pages)
    keep = np.flatnonzero(pages >= 0)  # -1: a block of a run the request does not continue
    n = end - first_layer
    self.k[first_layer:end, :, pages[keep]] = dequantize(k)[extra:extra + n, :, keep]
    self.v[first_layer:end, :, pages[keep]] = dequantize(v)[extra:extra + n, :, keep]


def _fingerprint():
  return {"model": "tiny", "dtype": "float32", "page_size": S, "config": "c", "weights": "w",
          "kv_shape": [CFG.n_layers, CFG.n_kv_heads, S, CFG.head_dim], "digest": "0" * 32}


def _values(i):
  """The K/V segment i is computed with (random, never zeros), [L, K, n_pages, S, H] each."""
  rng = np.random.default_rng(100 + i)
  shape = (CFG.n_layers, CFG.n_kv_heads, -(-SEGMENTS[i].size // S), S, CFG.head_dim)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


JOB = st.tuples(st.sampled_from(["compute", "pressure", "reuse", "reuse"]),
                st.lists(st.integers(0, len(SEGMENTS) - 1), min_size=1, max_size=2),
                st.sampled_from([0, 1, 2]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=st.lists(JOB, min_size=8, max_size=40), num_pages=st.integers(8, 14),
       host_pages=st.integers(0, 8), with_disk=st.booleans(),
       split_layer=st.integers(0, CFG.n_layers))
def test_tiers_lose_nothing_and_leak_nothing(jobs, num_pages, host_pages, with_disk, split_layer):
  bytes_per_page = 2 * CFG.n_layers * CFG.n_kv_heads * S * CFG.head_dim * 4
  layout = PoolLayout(num_pages, S, bytes_per_page)
  io = NumpyPool(num_pages)
  with tempfile.TemporaryDirectory() as tmp:
    disk = persist.SegmentDiskCache(tmp, _fingerprint()) if with_disk else None
    store = KVStore(layout)
    link = persist.DiskLink(disk, store, io) if disk is not None else None
    spill = (lambda seg: link.keep(seg.token_ids, seg.positions, *seg.restored(np.float32),
                                   seg.namespace)) if link is not None else None
    tier = HostTier(host_pages * bytes_per_page // 2, spill=spill, split_layer=split_layer)
    store = KVStore(layout, tier)
    store.page_io = io
    if link is not None:
      link.store = store
    full = ReuseConfig("full").resolve(CFG)
    ever = set()
    for kind, picks, t in jobs:
      if kind == "pressure":  # another request's allocation: the pool evicts (to the host tier)
        short = min(picks[0] + 1, store.allocator.num_reclaimable())
        store.allocator.decref(store.allocator.allocate(store.allocator.num_free + short))
      elif kind == "compute":  # a segment computed alone from position 0, handed to the cache
        i = picks[0]
        prompt = Prompt((SEGMENTS[i],), (True,))
        try:
          leases = store.acquire([prompt], full, 0)
        except (PoolExhausted, ValueError):
          continue
        with leases:
          k, v = _values(i)
          io.write_pages(leases[0].page_table[:k.shape[2]], k, v)
          if segment_key(SEGMENTS[i]) not in store.segment_cache:
            store.keep_alone(prompt, leases[0])
          ever.add(segment_key(SEGMENTS[i]))
      else:  # a request reusing segments: what it reads must be what was computed
        prompt = Prompt(tuple(SEGMENTS[i] for i in picks) + (np.array([7], np.int32),),
                        (True,) * len(picks) + (False,))
        if link is not None:
          persist.load_segments(disk, store, io, [segment_key(SEGMENTS[i]) for i in picks])
        policy = ReuseConfig("sparsex", layer_threshold=t).resolve(CFG)
        try:
          leases = store.acquire([prompt], policy, 1)
        except (PoolExhausted, ValueError):
          store.check_invariants()
          continue
        with leases:
          finish_loads(tier, leases[0].loads, io)
          from_host = {id(load.entry): load.first_layer for load in leases[0].loads}
          for span, entry in leases[0].hits.items():
            first = from_host.get(id(entry), 0)
            k, v = _values(picks[span])
            np.testing.assert_array_equal(io.k[first:, :, entry.pages], k[first:])
            np.testing.assert_array_equal(io.v[first:, :, entry.pages], v[first:])
          store.check_invariants()
      store.check_invariants()
      assert store.allocator.num_used == store.segment_cache.num_pages  # nothing live is left
      for key in ever:
        places = [key in store.segment_cache, key in tier,
                  disk is not None and key in disk, key in tier.dropped]
        assert any(places), f"segment {key[:8]} lost"
        assert not (places[0] and places[1])
    if disk is not None:
      assert disk.verify() == []
    for name, n in (("host loads", tier.loads), ("spilled to disk", tier.spilled),
                    ("dropped", len(tier.dropped)), ("received by host", tier.received)):
      event(f"{name}: {'some' if n else 'none'}")
