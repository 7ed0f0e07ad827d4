"""The segment cache on disk (sparsex_jax/kv/persist.py), on a tiny random model: loaded K/V gives
the logits of recomputing, a cache of another model or page size is refused naming the index, a
truncated or corrupted file is reported naming the file (and `cache info --verify/--repair`), a
cache bigger than the pool is loaded on demand, and `cache warm` / `cache info` in a subprocess.
The real-model round trip is in test_jobs_real.py."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax.entrypoints import cli
from sparsex_jax.kv import persist
from sparsex_jax.kv.segment_cache import segment_key
from tests.engine.test_engine import CFG, PARAMS, _ids
from tests.engine.test_engine import _engine as _test_engine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PASSAGES = [_ids(13 + 3 * i, 500 + i) for i in range(6)]


def _engine(**kw):
  # One pool shape for the whole file (41 pages of 4 tokens: 40 usable, the 6 passages fill 34),
  # so its engines share compiled programs.
  kw.setdefault("num_pages", 41)
  return _test_engine(**kw)


def _request(i, q=0):
  return sx.Request([sx.Segment(_ids(5, 600 + q)), sx.Segment(PASSAGES[i]),
                     sx.Segment(_ids(4, 700 + q), cache=False)])


def _warm(path, **kw):
  eng = _engine(**kw)
  eng.use_cache_dir(path)
  eng.cache_segments(PASSAGES)
  return eng


_CHILD = """
import sys
import numpy as np
import sparsex_jax as sx
from tests.kv.test_persist import _engine, _request
engine = _engine()
engine.use_cache_dir(sys.argv[1], save=False)
logits, plan = engine.prefill_logits(_request(2), sx.ReuseConfig("sparsex", layer_threshold=1),
                                     return_plan=True)
np.save(sys.argv[2], logits)
print(plan.reused_positions.size, engine.disk_cache.loaded)
"""


def test_saved_cache_in_a_fresh_process_gives_the_logits_of_recomputing(tmp_path):
  _warm(tmp_path)
  files = glob.glob(str(tmp_path / "segments" / "*.safetensors"))
  assert len(files) == len(PASSAGES)
  assert not glob.glob(str(tmp_path / "**" / ".tmp-*"), recursive=True)  # atomic writes
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), str(tmp_path / "l.npy")],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert child.returncode == 0, child.stderr
  assert child.stdout.split() == [str(len(PASSAGES[2])), "1"]  # reused it, read one file
  recompute = _engine()
  recompute.cache_segments(PASSAGES)  # the same batches as the warm-up: bit-identical K/V
  want = recompute.prefill_logits(_request(2), sx.ReuseConfig("sparsex", layer_threshold=1))
  np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), want)


def test_another_model_or_page_size_is_refused(tmp_path):
  _warm(tmp_path)
  index = str(tmp_path / "index.json")
  with pytest.raises(sx.CacheError, match=r"index\.json.*page size 4 \(this engine: 8\)"):
    _engine(page_size=8).use_cache_dir(tmp_path)
  other = sx.Engine(CFG, jax.tree.map(lambda w: w * 1.01, PARAMS), page_size=4, num_pages=64)
  with pytest.raises(sx.CacheError, match="model weights") as e:
    other.use_cache_dir(tmp_path)
  assert index in str(e.value)
  shallower = dict(PARAMS, layers=jax.tree.map(lambda w: w[:2], PARAMS["layers"]))
  with pytest.raises(sx.CacheError, match="model config"):
    sx.Engine(CFG.replace(n_layers=2), shallower, page_size=4, num_pages=64).use_cache_dir(
        tmp_path)


def test_truncated_or_corrupted_files_are_reported_naming_the_file(tmp_path, capsys):
  eng = _warm(tmp_path)
  files = sorted(glob.glob(str(tmp_path / "segments" / "*.safetensors")))
  with open(files[0], "r+b") as f:  # truncated: found when the cache is opened
    f.truncate(100)
  with pytest.raises(sx.CacheError, match="truncated") as e:
    _engine().use_cache_dir(tmp_path, strict=True)
  assert files[0] in str(e.value)
  assert cli.main(["cache", "info", str(tmp_path), "--verify"]) == 1
  assert files[0] in capsys.readouterr().err
  assert cli.main(["cache", "info", str(tmp_path), "--repair"]) == 0
  assert f"{files[0]}: dropped" in capsys.readouterr().err
  assert cli.main(["cache", "info", str(tmp_path), "--verify"]) == 0
  fresh = _engine()
  fresh.use_cache_dir(tmp_path, strict=True)
  assert len(fresh.disk_cache) == len(PASSAGES) - 1
  # Corrupted in place (same size): found when the segment is read; nothing reaches the pool.
  key = os.path.basename(files[1]).split(".")[0]
  with open(files[1], "r+b") as f:
    f.seek(-8, os.SEEK_END)
    f.write(b"\xff" * 8)
  with pytest.raises(sx.CacheError, match="corrupted") as e:
    fresh.disk_cache.read(key)
  assert files[1] in str(e.value)
  passage = next(p for p in PASSAGES if segment_key(p) == key)
  with pytest.raises(sx.CacheError, match="corrupted"):
    fresh.generate([sx.Request([sx.Segment(passage)])])
  assert fresh.stats()["segment_cache"]["entries"] == 0
  with open(tmp_path / "index.json", "w") as f:
    f.write('{"format": "sparsex-segment-cache", "vers')
  with pytest.raises(sx.CacheError, match=r"index\.json: not valid JSON"):
    _engine().use_cache_dir(tmp_path)
  del eng


def test_a_cache_bigger_than_the_pool_is_loaded_on_demand(tmp_path):
  _warm(tmp_path)
  sp = sx.SamplingParams(max_new_tokens=1)
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1)
  requests = [_request(i, q) for q in range(2) for i in range(len(PASSAGES))]
  # A batch of 2 leases 18 of the 40 pages; the passages alone fill 34.
  small = _engine(max_batch_size=2)
  small.use_cache_dir(tmp_path, save=False)
  outs = small.generate(requests, sp, reuse)
  assert all(o.error is None for o in outs)
  assert all(o.stats.n_reused >= len(PASSAGES[i % 6]) for i, o in enumerate(outs))
  assert small.stats()["segment_cache"]["evictions"] > 0
  assert small.disk_cache.loaded > len(PASSAGES)  # evicted ones were read again when needed
  small.store.check_invariants()


def test_bfloat16_pages_round_trip(tmp_path):
  import ml_dtypes
  fp = persist.fingerprint(CFG.replace(dtype="bfloat16"), PARAMS, 4)
  disk = persist.SegmentDiskCache(tmp_path, fp)
  shape = (CFG.n_layers, CFG.n_kv_heads, 4, 4, CFG.head_dim)
  k = np.random.default_rng(0).normal(size=shape).astype(ml_dtypes.bfloat16)
  tokens = np.arange(3, 16, dtype=np.int32)
  assert disk.save([(tokens, np.arange(13) + 7, k, -k)]) == 1
  seg = persist.SegmentDiskCache(tmp_path, fp).read(segment_key(tokens))
  assert seg.k.dtype == k.dtype
  np.testing.assert_array_equal(seg.k.view(np.uint16), k.view(np.uint16))
  np.testing.assert_array_equal(seg.positions, np.arange(13) + 7)
  assert disk.entries[seg.key]["computed"] == "in_context"


def test_cache_warm_and_info(tmp_path, monkeypatch, capsys):
  corpus = tmp_path / "corpus.jsonl"
  with open(corpus, "w") as f:
    for p in PASSAGES[:3]:
      f.write(json.dumps({"id": "x", "title": "ignored", "tokens": p}) + "\n")
    f.write("{oops\n")
  monkeypatch.setattr(cli, "_build_engine", lambda args: _engine(page_size=args.page_size))
  args = ["cache", "warm", "--model", "random:tiny", "--corpus", str(corpus), "--cache-dir",
          str(tmp_path / "c"), "--page-size", "4", "--no-progress"]
  assert cli.main(args) == 1  # one bad corpus line
  err = capsys.readouterr().err
  assert f"{corpus}:4: not valid JSON" in err and "3 passages computed and saved" in err
  assert cli.main(args) == 1
  assert "0 passages computed and saved, 3 already cached" in capsys.readouterr().err
  assert cli.main(args + ["--as-message", "user"]) == 2  # token passages, no chat template
  assert "--as-message needs text passages" in capsys.readouterr().err
  # `cache info` needs no model: a plain subprocess.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  info = subprocess.run([sys.executable, "-m", "sparsex_jax.entrypoints.cli", "cache", "info",
                         str(tmp_path / "c"), "--json"], env=env, capture_output=True, text=True,
                        timeout=60)
  doc = json.loads(info.stdout)
  assert doc["segments"] == 3 and doc["tokens"] == sum(len(p) for p in PASSAGES[:3])
  assert doc["fingerprint"]["model"] == "tiny" and doc["fingerprint"]["page_size"] == 4


def test_two_writers_keep_each_others_segments(tmp_path):
  fp = persist.fingerprint(CFG, PARAMS, 4)
  a, b = persist.SegmentDiskCache(tmp_path, fp), persist.SegmentDiskCache(tmp_path, fp)
  shape = (CFG.n_layers, CFG.n_kv_heads, 1, 4, CFG.head_dim)
  ones, twos = np.ones(shape, np.float32), np.full(shape, 2.0, np.float32)
  assert a.save([(np.array([5, 6]), np.array([0, 1]), ones, ones)]) == 1
  # b opened before a saved: it still sees a's segment under the lock and does not rewrite it
  # (its version was computed elsewhere), and a's entry survives b's index update.
  assert b.save([(np.array([5, 6]), np.array([9, 10]), twos, twos),
                 (np.array([7]), np.array([0]), twos, twos)]) == 1
  fresh = persist.SegmentDiskCache(tmp_path, fp)
  assert len(fresh) == 2
  np.testing.assert_array_equal(fresh.read(segment_key([5, 6])).k, ones)
  assert fresh.verify() == []


def test_a_failed_save_warns_and_never_fails_the_requests(tmp_path, monkeypatch):
  eng = _engine()
  eng.use_cache_dir(tmp_path)

  def full_disk(segments):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(eng.disk_cache, "save", full_disk)
  with pytest.warns(UserWarning, match="segment cache not saved.*No space left"):
    out = eng.generate([_request(0)], sx.SamplingParams(max_new_tokens=1))[0]
  assert out.error is None and len(out.token_ids) == 1
