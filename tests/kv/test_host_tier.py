"""The host-memory tier (sparsex_jax/kv/host_tier.py) on the tiny random model: a segment evicted
to the host tier and copied back gives the logits of one that never left the pool, for every
reuse method and for thresholds at, above and below the tier's split layer (with the pages it
lands in poisoned first, so that a read of a layer the load did not write would show); only
layers [T, L) are moved when T is the split layer, and the bytes reported are those staged
otherwise; the split and stage arithmetic against numpy; and the 8-bit tier's error bounds."""

import dataclasses
import os

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax.kv import host_tier
from sparsex_jax.kv.host_tier import dequantize, quantize, run_pages, stored_pages
from sparsex_jax.kv.layout import page_bucket
from sparsex_jax.reuse import METHODS
from tests.engine.test_engine import CFG, _ids
from tests.engine.test_engine import _engine as _test_engine

PASSAGES = [_ids(9 + 2 * i, 800 + i) for i in range(3)]
HOST_BYTES = 1 << 22


# The tiny model's default threshold is its depth (3 = L), where the engine keeps host copies
# whole; the tests cut them at T = 1, the threshold most of them load with, as the engine cuts
# Llama-3-8B's at its default T = 4.
SPLIT = 1


def _engine(split_layer=SPLIT, **kw):
  kw.setdefault("num_pages", 64)  # one pool shape for the file: shared compiled programs
  eng = _test_engine(**kw)
  if eng.host_tier is not None:
    eng.host_tier.split_layer = split_layer  # before anything is put: every segment is cut here
  return eng


def _staged_from(t, split_layer, n_layers=CFG.n_layers):
  """The first layer a load for threshold t stages: the split layer when the copy is cut there
  and t is at or above it, else 0 (the reference for the bytes a load reports)."""
  return split_layer if 0 < split_layer < n_layers and t >= split_layer else 0


def _request(q=0):
  return sx.Request([sx.Segment(_ids(5, 900 + q)), sx.Segment(PASSAGES[0]),
                     sx.Segment(_ids(3, 910 + q), cache=False), sx.Segment(PASSAGES[1]),
                     sx.Segment(_ids(4, 920 + q), cache=False)])


def _method(mode):
  cls = METHODS[mode]
  fields = {f.name for f in dataclasses.fields(cls)}
  # T = 1 of the tiny model's 3 layers where the method takes one (its default caps at 3 = L:
  # every layer full, nothing read), so that a load moves layers [1, 3) only.
  if "layer_threshold" in fields and mode not in ("naive",):
    return sx.ReuseConfig(mode, layer_threshold=1)
  return sx.ReuseConfig(mode)


def _programs(eng) -> set[str]:
  return eng.kv.log.programs()


def _poison_free_pages(eng, seed):
  """Large random K/V in every free page: whatever a load does not write stays garbage."""
  free = np.asarray(eng.store.allocator._free, np.int64)
  rng = np.random.default_rng(seed)
  pool = eng.kv.arrays
  shape = (CFG.n_layers, CFG.n_kv_heads, free.size, eng.layout.page_size, CFG.head_dim)
  eng.kv.arrays = {name: pool[name].at[:, :, free].set(
      (100 * rng.standard_normal(shape)).astype(np.float32)) for name in ("k", "v")}


@pytest.mark.parametrize("mode", list(METHODS))
def test_evicted_to_host_and_back_gives_identical_logits(mode):
  reuse = _method(mode)
  in_pool = _engine()
  in_pool.cache_segments(PASSAGES)
  want = in_pool.prefill_logits(_request(), reuse)

  eng = _engine(host_cache_bytes=HOST_BYTES)
  eng.cache_segments(PASSAGES)
  n_segments = eng.store.segment_cache.num_entries
  eng.store.segment_cache.evict(10**6)  # every segment down to the host tier
  assert eng.store.segment_cache.num_entries == 0 and len(eng.host_tier) == n_segments
  _poison_free_pages(eng, 1)
  got = eng.prefill_logits(_request(), reuse)
  np.testing.assert_array_equal(got, want)
  eng.store.check_invariants()
  # A load of layers [T, L) with 0 < T < L is written between the prefill's two halves, so that
  # the copy runs behind the full layers; the pool-only engine ran the prefill whole.
  halves = {"prefill_full_layers", "prefill_rest"}
  policy = reuse.resolve(CFG)
  split = policy.reads_segment_cache and 0 < policy.layer_threshold < CFG.n_layers
  assert (halves <= _programs(eng)) == split and not halves & _programs(in_pool)
  assert eng.store.allocator.num_used == eng.store.num_cached_pages  # no page or pin left behind
  stats = eng.stats()["host_tier"]
  policy = reuse.resolve(CFG)
  if policy.reads_segment_cache:
    assert stats["hits"] == 2 and stats["loads"] == 2
    t, n_layers = policy.layer_threshold, CFG.n_layers
    moved_layers = n_layers - _staged_from(t, SPLIT)
    assert stats["bytes_moved"] * n_layers == stats["bytes_all_layers"] * moved_layers
    # every layer moved: the segments are back in the pool; a partial copy leaves them on the host
    assert len(eng.host_tier) == (n_segments - 2 if t == 0 else n_segments)
  else:
    assert stats["loads"] == 0


def test_the_second_load_of_a_shape_compiles_nothing():
  """A host-tier copy is a committed device array; the pool is committed from the start, so the
  programs a load runs, and every program after them, are compiled once (an uncommitted first
  pool had each compiled again after the first load: 2.8 s of a 16 ms request in bench_tiers)."""
  from sparsex_jax.programs.copy import write_page_layers
  from sparsex_jax.programs.prefill import prefill_full_layers, prefill_rest
  eng = _engine(host_cache_bytes=HOST_BYTES)
  eng.cache_segments(PASSAGES)
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1)
  programs = (prefill_full_layers, prefill_rest, write_page_layers)
  sizes = []
  for q in range(3):
    eng.store.segment_cache.evict(10**6)
    eng.prefill_logits(_request(q), reuse)
    sizes.append([p._cache_size() for p in programs])
  assert eng.stats()["host_tier"]["loads"] == 6
  assert sizes[2] == sizes[1] == sizes[0] and min(sizes[0]) >= 1


def test_the_batch_crosses_to_the_device_before_the_copies(monkeypatch):
  """Host-to-device copies run in the order issued: the prefill's inputs go before the loads'
  segments (else the full layers wait for every copy instead of running beside them)."""
  from sparsex_jax import step_runner
  eng = _engine(host_cache_bytes=HOST_BYTES)
  eng.cache_segments(PASSAGES)
  eng.store.segment_cache.evict(10**6)
  events = []
  ahead = step_runner.inputs_ahead_of_loads
  monkeypatch.setattr(step_runner, "inputs_ahead_of_loads",
                      lambda batch: events.append("inputs") or ahead(batch))
  stage, run = eng.kv.stage_page_layers, eng.kv.run
  monkeypatch.setattr(eng.kv, "stage_page_layers",
                      lambda k, v: events.append("copy") or stage(k, v))

  def spy_run(program, *args, **static):
    if program.__name__ == "prefill_full_layers":
      leaves = jax.tree.leaves(args[1])
      events.append("full layers, batch on device" if all(isinstance(x, jax.Array) for x in leaves)
                    else "full layers, batch on the host")
    return run(program, *args, **static)

  monkeypatch.setattr(eng.kv, "run", spy_run)
  eng.prefill_logits(_request(), sx.ReuseConfig("sparsex", layer_threshold=1))
  assert events == ["inputs", "copy", "copy", "full layers, batch on device"]


@pytest.mark.parametrize("t", [0, 1])
def test_copy_time_is_split_into_hidden_and_exposed(t):
  """Each request's copies are timed from issue to ready: the part after the full layers were
  done is exposed, the rest hidden; with T = 0 there are no full layers to hide behind."""
  eng = _engine(host_cache_bytes=HOST_BYTES)
  eng.cache_segments(PASSAGES)
  for q in range(2):
    eng.store.segment_cache.evict(10**6)
    eng.prefill_logits(_request(q), sx.ReuseConfig("sparsex", layer_threshold=t))
  times = eng.host_tier.load_times(wait=True)
  assert times["loads_timed"] == 2 and eng.stats()["host_tier"]["loads_timed"] == 2
  assert times["load_copy_s"] > 0 and times["load_hidden_s"] >= 0 and times["load_exposed_s"] >= 0
  assert times["load_hidden_s"] + times["load_exposed_s"] == pytest.approx(
      times["load_copy_s"], abs=2e-6)
  if t == 0:
    assert times["load_hidden_s"] == 0 and times["load_exposed_s"] == times["load_copy_s"]


@pytest.mark.parametrize("split_layer,t", [(1, 1), (2, 2), (1, 2), (2, 1), (3, 1)],
                         ids=["T=split=1", "T=split=2", "T-above", "T-below", "whole"])
def test_loads_move_layers_from_t_or_honestly_more(split_layer, t):
  """The bytes the host tier reports for a request of threshold t: exactly layers [t, L) of K and
  V of the two segments' pages when t is the split layer; layers [split, L) when t is above it;
  every layer when it is below it or the copies are whole (split = L). In every case the logits
  are those of segments that never left the pool, with the pages the loads land in poisoned."""
  reuse = sx.ReuseConfig("sparsex", layer_threshold=t)
  in_pool = _engine()
  in_pool.cache_segments(PASSAGES)
  want = in_pool.prefill_logits(_request(), reuse)

  eng = _engine(host_cache_bytes=HOST_BYTES, split_layer=split_layer)
  eng.cache_segments(PASSAGES)
  eng.store.segment_cache.evict(10**6)
  n_arrays = 2 if split_layer < CFG.n_layers else 1
  assert all(len(eng.host_tier.get(key).k.values) == n_arrays for key in eng.host_tier.keys())
  _poison_free_pages(eng, 4)
  np.testing.assert_array_equal(eng.prefill_logits(_request(), reuse), want)
  itemsize = np.dtype(CFG.jnp_dtype).itemsize
  tokens = sum(eng.layout.pages_for(len(p)) for p in PASSAGES[:2]) * eng.layout.page_size
  per_layer = 2 * CFG.n_kv_heads * tokens * CFG.head_dim * itemsize
  stats = eng.stats()["host_tier"]
  assert stats["loads"] == 2 and stats["split_layer"] == split_layer
  if t == split_layer:
    assert stats["bytes_moved"] == (CFG.n_layers - t) * per_layer
  assert stats["bytes_moved"] == (CFG.n_layers - _staged_from(t, split_layer)) * per_layer
  assert stats["bytes_all_layers"] == CFG.n_layers * per_layer
  eng.store.check_invariants()


def test_the_engine_cuts_host_copies_at_its_default_threshold():
  from models import llama
  deep = dataclasses.replace(CFG, n_layers=6)  # the default T = 4 is then inside the model
  eng = sx.Engine(deep, llama.init_params(deep, 0), page_size=4, num_pages=16,
                  host_cache_bytes=HOST_BYTES)
  assert eng.host_tier.split_layer == sx.ReuseConfig().resolve(deep).layer_threshold == 4
  # the tiny model's default is every layer (T = 3 = L): its copies are kept whole
  assert _test_engine(host_cache_bytes=HOST_BYTES).host_tier.split_layer == CFG.n_layers


def test_host_budget_overflow_spills_to_disk_or_drops(tmp_path):
  eng = _engine(host_cache_bytes=1)  # nothing fits: straight down a tier
  eng.cache_segments(PASSAGES)
  eng.store.segment_cache.evict(10**6)
  assert len(eng.host_tier) == 0 and eng.stats()["host_tier"]["dropped"] == 3
  disk = _engine(host_cache_bytes=1)
  disk.use_cache_dir(tmp_path, save=False)  # a cache dir that this engine does not autosave to
  disk.cache_segments(PASSAGES)
  disk.store.segment_cache.evict(10**6)
  disk.disk_link.autosave_enabled = True  # the spill writes (the write path of a saving engine)
  disk.store.segment_cache.evict(10**6)
  assert disk.disk_cache.verify() == []


def test_pinned_host_copies_of_padded_segments_give_identical_logits():
  """The GPU layout, run on the CPU's own pinned_host memory: K and V each as two jax arrays in
  pinned host memory, layers [0, split) and [split, L), pages padded to the tier's bucket (a
  9-page passage is kept as 10). The load gives the logits of a pool that never evicted; the
  disk tier gets the unpadded pages back."""
  long_passages = [_ids(4 * 9 - 1, 830), _ids(4 * 6, 831)]  # 9 and 6 pages of 4 tokens
  request = sx.Request([sx.Segment(_ids(5, 930)), sx.Segment(long_passages[0]),
                        sx.Segment(_ids(3, 931), cache=False), sx.Segment(long_passages[1])])
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1)
  in_pool = _engine()
  in_pool.cache_segments(long_passages)
  want = in_pool.prefill_logits(request, reuse)

  eng = _engine(host_cache_bytes=HOST_BYTES)
  eng.host_tier.memory = jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                                           memory_kind="pinned_host")
  eng.cache_segments(long_passages)
  entries = {e.key: e for e in eng.store.segment_cache._entries.values()}
  before = {key: eng.kv.read_pages(e.pages) for key, e in entries.items()}
  eng.store.segment_cache.evict(10**6)
  for key, (k, v) in before.items():
    seg = eng.host_tier.get(key)
    assert [x.shape[0] for x in seg.k.values] == [SPLIT, CFG.n_layers - SPLIT]
    for x in seg.k.values + seg.v.values:
      assert x.sharding.memory_kind == "pinned_host"
      assert x.shape[2] == stored_pages(k.shape[2]) >= k.shape[2]
    got_k, got_v = seg.restored(np.float32)
    np.testing.assert_array_equal(got_k, k)
    np.testing.assert_array_equal(got_v, v)
  assert stored_pages(9) == 10
  _poison_free_pages(eng, 3)
  np.testing.assert_array_equal(eng.prefill_logits(request, reuse), want)
  assert eng.stats()["host_tier"]["memory"] == "pinned_host"
  eng.store.check_invariants()


def test_page_buckets_waste_at_most_a_quarter_on_the_host_tier_and_are_bounded():
  sizes = [stored_pages(n) for n in range(1, 4097)]
  for n, m in enumerate(sizes, start=1):
    assert n <= m <= 1.25 * n
    assert stored_pages(m) == m  # a bucket is its own bucket
  # at most 4 compiled shapes per octave beyond the first few
  for k in range(3, 12):
    assert len({stored_pages(n) for n in range(2**k + 1, 2**(k + 1) + 1)}) <= 4
  # the pool's own copies (kv/persist.py) pad to the next power of two
  want = [2 ** int(np.ceil(np.log2(n))) for n in range(1, 4097)]
  assert [page_bucket(n) for n in range(1, 4097)] == want


# ---- 8-bit storage -------------------------------------------------------------------------------

def test_int8_round_trip_within_half_a_scale():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((3, 2, 5, 4, 16)) * rng.uniform(0.01, 10, (3, 2, 5, 4, 1))
       ).astype(np.float32)
  x[0, 0, 0, 0] = 0  # a row of zeros
  stored = quantize(x, "int8", split_layer=1)
  ref = x.astype(np.float64)
  scale = np.max(np.abs(ref), axis=-1, keepdims=True) / 127
  err = np.abs(dequantize(stored, np.float64) - ref)
  assert np.all(err <= scale / 2 * (1 + 1e-5) + 1e-12)
  assert [v.shape for v in stored.values] == [(1,) + x.shape[1:], (2,) + x.shape[1:]]
  assert stored.values[0].dtype == np.int8
  rows = x.shape[1:-1] + (1,)  # a scale per token row and kv head
  assert [s.shape for s in stored.scale] == [(1,) + rows, (2,) + rows]
  assert stored.nbytes < x.nbytes / 2


def test_fp8_round_trip_within_its_precision():
  rng = np.random.default_rng(1)
  x = (rng.standard_normal((2, 2, 3, 4, 16)) * 5).astype(np.float32)
  stored = quantize(x, "fp8")
  ref = x.astype(np.float64)
  scale = np.max(np.abs(ref), axis=-1, keepdims=True) / 448
  # e4m3: 3 mantissa bits (half an ulp is 2^-4 of the value), subnormals spaced 2^-9 (times scale)
  err = np.abs(dequantize(stored, np.float64) - ref)
  assert np.all(err <= np.abs(ref) * 2.0**-4 + scale * 2.0**-10 + 1e-12)


@pytest.mark.parametrize("host_dtype", ["int8", "fp8"])
def test_8bit_tier_logits_close_to_16bit(host_dtype):
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1)
  logits = {}
  for dtype in ("native", host_dtype):
    eng = _engine(host_cache_bytes=HOST_BYTES, host_cache_dtype=dtype)
    eng.cache_segments(PASSAGES)
    eng.store.segment_cache.evict(10**6)
    logits[dtype] = eng.prefill_logits(_request(), reuse)
    stats = eng.stats()["host_tier"]
    assert stats["loads"] == 2
    eng.store.check_invariants()
  p = jax.nn.log_softmax(logits["native"])
  q = jax.nn.log_softmax(logits[host_dtype])
  kl = float(np.sum(np.exp(p) * (p - q)))
  assert kl < (1e-3 if host_dtype == "int8" else 1e-2), kl


@pytest.mark.parametrize("host_dtype", ["native", "int8"])
@pytest.mark.parametrize("split_layer", [0, 1, 2, 3, 4])
def test_split_and_stage_arithmetic_matches_numpy(host_dtype, split_layer):
  """For every split layer and layer range [T, E) of a 4-layer segment: the arrays the tier
  keeps, the part a load stages (its first and last layer and bytes), and the write program's
  pool (layers [T, E) of the pages written, dequantised on the device; every other layer and
  page as it was, whatever was staged outside them; a padding page dropped), each against a
  numpy reference."""
  from sparsex_jax.programs.copy import write_page_layers
  n_layers, n_pages, n_pool = 4, 3, 6
  rng = np.random.default_rng(10 + split_layer)
  k, v = (rng.standard_normal((n_layers, 2, n_pages, 4, 8)).astype(np.float32) for _ in "kv")
  stored_k, stored_v = quantize(k, host_dtype, split_layer), quantize(v, host_dtype, split_layer)
  cut = 0 < split_layer < n_layers
  want_shapes = [split_layer, n_layers - split_layer] if cut else [n_layers]
  assert [x.shape[0] for x in stored_k.values] == want_shapes
  restored_k, restored_v = dequantize(stored_k), dequantize(stored_v)
  if host_dtype == "native":
    np.testing.assert_array_equal(restored_k, k)
  pool0 = {name: rng.standard_normal((n_layers, 2, n_pool, 4, 8)).astype(np.float32)
           for name in ("k", "v")}  # random, never zeros: an unwanted write shows
  pages = np.array([4, 1, n_pool], np.int32)  # the last stored page is padding: dropped
  bounds = [0, split_layer, n_layers] if cut else [0, n_layers]  # where the arrays begin and end
  for t in range(n_layers):
    part_k, part_v = stored_k.covering(t), stored_v.covering(t)
    start = split_layer if cut and t >= split_layer else 0
    assert part_k.start_layer == start and part_k.end_layer == n_layers
    per_layer = stored_k.nbytes // n_layers
    assert part_k.nbytes == (n_layers - start) * per_layer
    np.testing.assert_array_equal(dequantize(part_k), restored_k[start:])
    for end in range(t + 1, n_layers + 1):  # layers [t, end): a run's part of a continuation
      part_k, part_v = stored_k.covering(t, end), stored_v.covering(t, end)
      stop = min(b for b in bounds if b >= end)
      assert (part_k.start_layer, part_k.end_layer) == (start, stop)
      assert part_k.nbytes == (stop - start) * per_layer
      pool, _ = write_page_layers({name: jax.numpy.asarray(x) for name, x in pool0.items()},
                                  pages, part_k.values, part_v.values, part_k.scale,
                                  part_v.scale, first_layer=t, start_layer=start, end_layer=end)
      for name, restored in (("k", restored_k), ("v", restored_v)):
        want = pool0[name].copy()
        want[t:end, :, pages[:2]] = restored[t:end, :, :2]
        np.testing.assert_allclose(np.asarray(pool[name]), want, rtol=1e-6, atol=0)


def test_cache_warm_fills_the_host_tier(tmp_path, monkeypatch, capsys):
  import json

  from sparsex_jax.entrypoints import cli
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"tokens": p}) + "\n" for p in PASSAGES))
  built = []

  def build(args):
    assert args.host_cache_bytes == 2**20 and args.host_cache_dtype == "int8"
    built.append(_engine(page_size=args.page_size, host_cache_bytes=args.host_cache_bytes,
                         host_cache_dtype=args.host_cache_dtype))
    return built[-1]

  monkeypatch.setattr(cli, "_build_engine", build)
  args = ["cache", "warm", "--model", "random:tiny", "--corpus", str(corpus), "--cache-dir",
          str(tmp_path / "c"), "--page-size", "4", "--no-progress", "--host-cache-bytes", "1M",
          "--host-cache-dtype", "int8"]
  assert cli.main(args) == 0
  assert cli.main(args + ["--fill-host-tier"]) == 0  # a fresh engine: pool empty, cache on disk
  assert "host tier: 3 segments" in capsys.readouterr().err
  assert len(built[-1].host_tier) == 3 and built[-1].stats()["host_tier"]["dtype"] == "int8"
  built[-1].store.check_invariants()


def test_host_memory_is_pinned_only_on_a_gpu_that_has_it():
  from sparsex_jax.kv.host_tier import host_memory

  class Memory:
    def __init__(self, kind):
      self.kind = kind

  class Device:
    def __init__(self, platform, kinds):
      self.platform, self._kinds = platform, kinds

    def addressable_memories(self):
      return [Memory(k) for k in self._kinds]

  assert host_memory(jax.devices()[0]) is None  # the CPU: no bus to cross, numpy it is
  assert host_memory(Device("gpu", ["device", "unpinned_host"])) is None
  assert host_memory(None) is None


@pytest.mark.parametrize("host_dtype", ["native", "int8"])
def test_a_failed_host_copy_drops_the_segment_counted_and_frees_its_pages(monkeypatch,
                                                                          host_dtype):
  """Pinned host memory runs out while evicted pages are copied there: read straight into it
  (the pool's dtype) or staged after quantising on the host (8-bit)."""
  from sparsex_jax.kv import host_tier

  def fail(*args, **kw):
    raise MemoryError("pinned host memory exhausted")

  eng = _engine(host_cache_bytes=HOST_BYTES, host_cache_dtype=host_dtype)
  eng.host_tier.memory = jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                                           memory_kind="pinned_host")
  monkeypatch.setattr(host_tier.StoredKV, "staged", fail)
  monkeypatch.setattr(eng.kv, "read_pages_into", fail)
  eng.cache_segments(PASSAGES)
  with pytest.warns(UserWarning, match="not (kept in|read to) the host tier"):
    eng.store.segment_cache.evict(10**6)
  assert len(eng.host_tier) == 0 and eng.stats()["host_tier"]["dropped"] == 3
  assert eng.store.allocator.num_used == eng.store.num_cached_pages
  eng.store.check_invariants()
  np.testing.assert_array_equal(eng.prefill_logits(_request(), _method("sparsex")),
                                _engine().prefill_logits(_request(), _method("sparsex")))


@pytest.mark.parametrize("pool_lost", [False, True], ids=["host-error", "pool-lost"])
def test_a_failed_write_between_the_prefill_halves_loses_nothing(monkeypatch, pool_lost):
  """The load's pool write fails after the full layers ran (T = 1): as a host-side error before
  it is dispatched (the pool intact), or as a device failure that takes the donated pool with it.
  The request raises; no page, pin or host block is left behind; the host tier keeps its copies
  (nothing computed is lost); the retry loads them again and gives the logits of an engine whose
  segments never left the pool."""
  from sparsex_jax import programs
  from sparsex_jax.programs.copy import write_page_layers
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1)
  in_pool = _engine()
  in_pool.cache_segments(PASSAGES)
  want = in_pool.prefill_logits(_request(), reuse)

  eng = _engine(host_cache_bytes=HOST_BYTES)
  eng.cache_segments(PASSAGES)
  eng.store.segment_cache.evict(10**6)
  n_host = len(eng.host_tier)
  call, ran = programs.KVPool._call, []

  def failing_call(self, program, args, static):
    ran.append(program.__name__)
    if program is write_page_layers and ran.count(program.__name__) == 1:
      if pool_lost:
        for a in self.arrays.values():
          a.delete()
      raise RuntimeError("injected: device copy failed")
    return call(self, program, args, static)

  monkeypatch.setattr(programs.KVPool, "_call", failing_call)
  with pytest.raises(RuntimeError, match="injected"):
    eng.prefill_logits(_request(), reuse)
  assert ran[:2] == ["prefill_full_layers", "write_page_layers"]  # failed between the halves
  assert eng.kv.times_lost == int(pool_lost) and eng.kv.is_valid()
  eng.store.check_invariants()
  eng.host_tier.check_invariants()
  assert len(eng.host_tier) == n_host and not any(s.pin_count for s in eng.host_tier._entries.values())
  assert eng.store.allocator.num_used == eng.store.num_cached_pages
  _poison_free_pages(eng, 2)
  np.testing.assert_array_equal(eng.prefill_logits(_request(), reuse), want)
  eng.store.check_invariants()
  stats = eng.stats()["host_tier"]
  assert stats["failed_loads"] == 2 and stats["loads"] == 2  # the retry's


# ---- continuations (a chat's history as its reuse method computed it) through the host tier ----

SYSTEM = _ids(12, 930)


def _first_turn():
  return sx.Request([sx.Segment(SYSTEM), sx.Segment(PASSAGES[0]),
                     sx.Segment(_ids(5, 931), cache=False), sx.Segment(PASSAGES[1]),
                     sx.Segment(_ids(6, 932), cache=False)])


def _chat_engine(**kw):
  """Passages cached alone, the system prompt exact, one turn answered with reuse."""
  eng = _engine(**kw)
  eng.cache_segments(PASSAGES)
  eng.prefill_logits(sx.Request([sx.Segment(SYSTEM, cache=False), sx.Segment(_ids(3, 933))]),
                     reuse=sx.ReuseConfig("prefix"))
  return eng


CHAT_REUSE = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3)


def _answered_chat(host: bool, *after_answer, memory=None):
  """A chat engine (with a host tier, in `memory` if given, or none) whose first turn was
  answered with CHAT_REUSE; returns (engine, answer, the next turn: the first turn, the answer
  but its last token, then the segments after_answer)."""
  eng = _chat_engine(host_cache_bytes=HOST_BYTES if host else None)
  if host and memory:
    eng.host_tier.memory = jax.sharding.SingleDeviceSharding(jax.devices()[0],
                                                             memory_kind=memory)
  answer = eng.generate([_first_turn()], sx.SamplingParams(max_new_tokens=6, ignore_eos=True),
                        reuse=CHAT_REUSE)[0]
  turn = sx.Request(_first_turn().segments + (sx.Segment(answer.token_ids[:-1], cache=False),)
                    + after_answer)
  return eng, answer, turn


def _runs(eng) -> list:
  """The continuation runs in the engine's host tier."""
  return [eng.host_tier.get(key) for key in eng.host_tier.keys() if key.startswith("run:")]


def test_a_long_history_goes_down_in_pieces_and_comes_back_whole(monkeypatch):
  """A history is kept in pieces of at most RUN_BLOCKS blocks, each padded to a power of two (the
  copy programs then come in a few sizes): with pieces of 3 blocks, the next turn continues the
  whole history from the host tier across every piece, with the logits of the pool, bit for bit."""
  from sparsex_jax.kv import store as store_module
  monkeypatch.setattr(store_module, "RUN_BLOCKS", 3)
  logits = []
  for host in (False, True):
    eng, _, turn = _answered_chat(host, sx.Segment(_ids(4, 935), cache=False))
    if host:
      n_blocks = len(eng.store.continuation_cache)
      eng.store.continuation_cache.evict(10**6)
      eng.store.prefix_cache.evict(10**6)  # the system prompt's exact blocks go along
      runs = _runs(eng)
      n_system = len(SYSTEM) // eng.layout.page_size
      assert sum(run.n_pages for run in runs) == n_blocks + n_system
      assert len(runs) == -(-(n_blocks + n_system) // 3)
      assert all(run.n_pages <= 3 and x.shape[2] == run_pages(run.n_pages)
                 for run in runs for x in run.k.values + run.v.values)
      _poison_free_pages(eng, 6)
    got, plan = eng.prefill_logits(turn, CHAT_REUSE, return_plan=True)
    logits.append(got)
    if host:
      assert eng.stats()["host_tier"]["continuation_loads"] == len(runs)
      assert int(np.sum(plan.labels == 0)) == (n_blocks + n_system) * eng.layout.page_size
      eng.store.check_invariants()
  np.testing.assert_array_equal(logits[1], logits[0])


@pytest.mark.parametrize("exact_blocks_evicted,memory", [(False, None), (True, None),
                                                         (True, "pinned_host")])
def test_a_history_continued_from_the_host_tier_gives_the_logits_of_the_pool(
    exact_blocks_evicted, memory):
  """The next turn of a chat whose history the pool evicted to the host tier continues it from
  there: every layer of the history's blocks is copied into fresh pages (poisoned first) before
  the prefill, and its logits are those of the turn continued from the pool, bit for bit. When
  the exact blocks the history continued leave the pool too (the prefix cache is evicted first),
  the run took them along and the whole history is continued from the host. With the tier in
  pinned host memory (the GPU's layout, on the CPU's own), evicted pages are read straight into
  it, without a round trip through numpy."""
  results = []
  for host in (False, True):
    eng, answer, turn = _answered_chat(host, sx.Segment(_ids(4, 934), cache=False),
                                       memory=memory)
    assert answer.stats.n_reused > 0
    if host:
      n_blocks = len(eng.store.continuation_cache)
      eng.store.continuation_cache.evict(10**6)  # the history goes down to the host tier
      assert len(eng.store.continuation_cache) == 0
      if exact_blocks_evicted:  # its anchor released, the exact system prompt can go too
        eng.store.prefix_cache.evict(10**6)
        assert len(eng.store.prefix_cache) == 0
      stats = eng.stats()["host_tier"]
      assert stats["continuation_blocks"] == n_blocks + len(SYSTEM) // eng.layout.page_size
      runs = _runs(eng)
      assert all((x.sharding.memory_kind if memory else type(x)) == (memory or np.ndarray)
                 for run in runs for x in run.k.values + run.v.values)
      _poison_free_pages(eng, 5)
    cache, tier = eng.store.continuation_cache, eng.host_tier
    before = (cache.hits, tier.run_hits if tier is not None else 0)
    logits, plan = eng.prefill_logits(turn, CHAT_REUSE, return_plan=True)
    continued = (cache.hits - before[0], (tier.run_hits if tier is not None else 0) - before[1])
    results.append((logits, plan, continued, eng))
  (want, pool_plan, (pool_blocks, none), _), (got, host_plan, (in_pool, from_host), eng) = results
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(host_plan.labels, pool_plan.labels)
  n_system = len(SYSTEM) // eng.layout.page_size
  assert pool_blocks > 0 and none == 0 and in_pool == 0
  assert from_host == pool_blocks + (n_system if exact_blocks_evicted else 0)
  stats = eng.stats()["host_tier"]
  # The turn reuses nothing (its history is continued, its own tokens new): its prefill runs
  # whole, and the run is copied whole before it.
  runs = _runs(eng)
  assert stats["continuation_hits"] == from_host and stats["continuation_loads"] == 1
  assert stats["continuation_blocks_loaded"] == from_host
  assert stats["continuation_bytes_moved"] == sum(run.nbytes for run in runs)
  # The continued blocks are in the pool again and stay in the host tier (their K/V never
  # changes): evicted again, only the turn's own blocks are read off the device.
  n_pool = len(eng.store.continuation_cache)
  received = stats["continuation_blocks_received"]
  eng.store.continuation_cache.evict(10**6)
  assert eng.stats()["host_tier"]["continuation_blocks_received"] - received == n_pool - from_host
  eng.store.check_invariants()
  assert eng.store.allocator.num_used == eng.store.num_cached_pages  # no page or pin left behind


def test_a_history_from_the_host_tier_is_copied_in_two_parts_around_the_full_layers():
  """A turn that continues its history and reuses a passage too (RAG within a chat) runs its
  prefill in halves at T = 1: the history's layers [0, 1), which the full layer reads, are
  copied before it, its layers [1, 3) between the halves with the passage's, every byte once;
  with the pages poisoned first, the logits are those of an engine that kept everything in the
  pool."""
  results = []
  for host in (False, True):
    eng, _, turn = _answered_chat(host, sx.Segment(PASSAGES[2]),
                                  sx.Segment(_ids(4, 935), cache=False))
    if host:
      eng.store.continuation_cache.evict(10**6)
      eng.store.segment_cache.evict(10**6)  # the new passage too
      _poison_free_pages(eng, 6)
    results.append((eng.prefill_logits(turn, CHAT_REUSE), eng))
  (want, _), (got, eng) = results
  np.testing.assert_array_equal(got, want)
  stats = eng.stats()["host_tier"]
  runs = _runs(eng)
  assert stats["continuation_loads"] == 2 and stats["loads"] == 1
  assert stats["continuation_blocks_loaded"] == stats["continuation_hits"] > 0
  assert stats["continuation_bytes_moved"] == sum(run.nbytes for run in runs)
  assert {"prefill_full_layers", "prefill_rest"} <= _programs(eng)
  eng.store.check_invariants()
  assert eng.store.allocator.num_used == eng.store.num_cached_pages


# ---- the pinned host pool the tier lives in on a GPU ------------------------------------------


def test_a_tier_must_fit_the_pinned_host_memory_xla_allows(monkeypatch):
  """XLA caps pinned host memory ($XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB GiB, default 64) and stages
  every host-to-device copy in it too: a tier may take at most 3/4 of it, and one that does not
  fit is refused with the setting that would make it fit."""
  env = host_tier.PINNED_LIMIT_ENV
  monkeypatch.delenv(env, raising=False)
  assert host_tier.pinned_limit_bytes() == 64 << 30
  host_tier.check_pinned_budget(48 << 30)
  with pytest.raises(ValueError, match=rf"{env}=86 .*or lower host_cache_bytes to 48.0 GiB"):
    host_tier.check_pinned_budget(64 << 30)  # round 22's load run: 64 GiB in a 64 GiB pool
  monkeypatch.setenv(env, "128")
  host_tier.check_pinned_budget(96 << 30)
  with pytest.raises(ValueError, match=rf"128 GiB \({env}=128\)"):
    host_tier.check_pinned_budget(97 << 30)
  monkeypatch.setenv(env, "64GB")
  with pytest.raises(ValueError, match=rf"{env}='64GB'"):
    host_tier.pinned_limit_bytes()


def test_the_cli_raises_the_pinned_pool_before_jax_starts_and_only_then(monkeypatch):
  from jax._src import xla_bridge
  env = host_tier.PINNED_LIMIT_ENV
  monkeypatch.delenv(env, raising=False)
  ram = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (128 << 30) // 4096}
  monkeypatch.setattr(host_tier.os, "sysconf", lambda name: ram[name])
  # jax's backends are running in this process: too late to change the pool.
  assert xla_bridge.backends_are_initialized() or jax.devices()
  assert not host_tier.reserve_pinned_memory(64 << 30) and env not in os.environ
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  assert not host_tier.reserve_pinned_memory(48 << 30)  # fits the default pool as it is
  assert host_tier.reserve_pinned_memory(64 << 30) and os.environ[env] == "86"
  host_tier.check_pinned_budget(64 << 30)
  assert not host_tier.reserve_pinned_memory(80 << 30)  # set (by us or the user): kept
  assert os.environ[env] == "86"
  monkeypatch.delenv(env)
  assert not host_tier.reserve_pinned_memory(120 << 30)  # 160 GiB of 128 GiB of RAM: refused
  assert env not in os.environ
