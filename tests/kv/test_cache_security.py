"""Issue 26, the segment cache on disk: an index cannot name a file outside the cache dir
(traversal keys, absolute paths, symlinks), an HMAC key authenticates the index and through its
sha256s every file, temp files of a killed save are reported and cleaned, a corrupted file is
dropped with a warning and recomputed (or stops the job with --strict), --repair survives a
garbage index, and an unusable cache exits 2 naming the path. Tiny random model, in process."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax.entrypoints import cli
from sparsex_jax.kv import persist
from sparsex_jax.kv.segment_cache import segment_key
from tests.engine.test_engine import _ids
from tests.kv.test_persist import PASSAGES, _engine, _request, _warm

REUSE = sx.ReuseConfig("sparsex", layer_threshold=1)


def _index(path):
  with open(os.path.join(path, "index.json")) as f:
    return json.load(f)


def _write_index(path, doc):
  with open(os.path.join(path, "index.json"), "w") as f:
    json.dump(doc, f)


def test_index_keys_cannot_reach_outside_the_cache_dir(tmp_path, capsys):
  cache = tmp_path / "cache"
  _warm(cache)
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "model.safetensors").write_bytes(b"precious")
  outside = tmp_path / "outside.safetensors"
  outside.write_bytes(b"also precious")
  doc = _index(cache)
  good_key, rec = next(iter(doc["segments"].items()))
  doc["segments"]["../../victim/model"] = dict(rec)
  doc["segments"][str(tmp_path / "outside")] = dict(rec)
  _write_index(cache, doc)
  with pytest.raises(sx.CacheError, match=r"segment key '\.\./\.\./victim/model' is not a "
                                          r"segment-cache key"):
    _engine().use_cache_dir(cache)
  assert cli.main(["cache", "info", str(cache), "--verify"]) == 2
  err = capsys.readouterr().err
  assert "index.json" in err and "Traceback" not in err
  assert cli.main(["cache", "info", str(cache), "--repair"]) == 0
  assert "victim/model' is not a segment-cache key" in capsys.readouterr().err
  assert (victim / "model.safetensors").read_bytes() == b"precious"
  assert outside.read_bytes() == b"also precious"
  assert set(_index(cache)["segments"]) == set(doc["segments"]) - {
      "../../victim/model", str(tmp_path / "outside")}
  # A symlink where a segment file should be: refused, and --repair deletes the entry, not the
  # file the link points to.
  file = cache / "segments" / f"{good_key}.safetensors"
  os.replace(file, tmp_path / "target.safetensors")
  os.symlink(tmp_path / "target.safetensors", file)
  assert any("a symlink" in p for p in persist.check_files(cache))
  persist.repair(cache)
  assert (tmp_path / "target.safetensors").exists()
  assert good_key not in _index(cache)["segments"]


def test_an_hmac_key_refuses_a_cache_changed_without_it(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  eng = _engine()
  eng.use_cache_dir(cache, key="s3cret")
  eng.cache_segments(PASSAGES[:2])
  want = _engine().prefill_logits(_request(0), REUSE)
  # An attacker who can write the dir changes a page file's K/V and its size and sha256 in the
  # index: every checksum passes, only the HMAC can tell.
  doc = _index(cache)
  key = segment_key(PASSAGES[0])
  file = cache / "segments" / f"{key}.safetensors"
  from safetensors.numpy import load, save
  tensors = load(file.read_bytes())
  tensors["k"] = tensors["k"] * 0
  data = save(tensors, metadata=persist._metadata(file.read_bytes()))
  file.write_bytes(data)
  doc["segments"][key] |= {"bytes": len(data), "sha256": persist._sha256(data)}
  _write_index(cache, doc)
  with pytest.raises(sx.CacheError, match="HMAC mismatch"):
    _engine().use_cache_dir(cache, key="s3cret")
  monkeypatch.setenv("SPARSEX_CACHE_KEY", "s3cret")  # the env var is the default key
  with pytest.raises(sx.CacheError, match="HMAC mismatch"):
    _engine().use_cache_dir(cache)
  with pytest.raises(sx.CacheError, match="HMAC mismatch"):
    persist.check_files(cache)
  monkeypatch.delenv("SPARSEX_CACHE_KEY")
  # Without a key nothing can tell (the threat model in docs/SECURITY.md): garbage answers.
  bad = _engine()
  bad.use_cache_dir(cache)
  assert not np.allclose(bad.prefill_logits(_request(0), REUSE), want, atol=1e-3)
  # A cache made without a key is refused when a key is asked for.
  plain = tmp_path / "plain"
  _warm(plain)
  with pytest.raises(sx.CacheError, match="not authenticated"):
    _engine().use_cache_dir(plain, key="s3cret")


def test_temp_files_of_a_killed_save_are_reported_then_cleaned(tmp_path):
  cache = tmp_path / "cache"
  _warm(cache)
  left = [cache / "segments" / ".tmp-abcabc.safetensors", cache / ".tmp-xyzindex.json"]
  for t in left:
    t.write_bytes(b"half a file")
  problems = persist.check_files(cache)
  assert [p.split(":")[0] for p in problems] == sorted(map(str, left), key=lambda p: (
      os.path.dirname(p) != str(cache), p))
  _engine().use_cache_dir(cache)  # the next open cleans them
  assert persist.check_files(cache) == []
  assert not any(t.exists() for t in left)


def test_a_corrupted_segment_is_recomputed_with_a_warning_unless_strict(tmp_path, capsys):
  cache = tmp_path / "cache"
  _warm(cache)
  want = _engine().prefill_logits(_request(2), REUSE)
  key = segment_key(PASSAGES[2])
  with open(cache / "segments" / f"{key}.safetensors", "r+b") as f:
    f.seek(-8, os.SEEK_END)
    f.write(b"\xff" * 8)
  eng = _engine()
  eng.use_cache_dir(cache)
  with pytest.warns(UserWarning, match="corrupted.*computing that segment afresh"):
    got, plan = eng.prefill_logits(_request(2), REUSE, return_plan=True)
  np.testing.assert_allclose(got, want, atol=1e-5)  # computed as with no cache
  assert plan.reused_positions.size == 0
  assert persist.check_files(cache) != []  # left for --repair; not overwritten
  strict = _engine()
  strict.use_cache_dir(cache, strict=True)
  with pytest.raises(sx.CacheError, match="corrupted"):
    strict.prefill_logits(_request(2), REUSE)
  # A truncated file: dropped when opened (strict: refused at once).
  other = segment_key(PASSAGES[3])
  with open(cache / "segments" / f"{other}.safetensors", "r+b") as f:
    f.truncate(50)
  with pytest.warns(UserWarning, match="truncated"):
    assert other not in _engine().use_cache_dir(cache)
  with pytest.raises(sx.CacheError, match="truncated"):
    _engine().use_cache_dir(cache, strict=True)


def test_repair_survives_a_garbage_index_and_a_bad_record_exits_2(tmp_path, capsys):
  cache = tmp_path / "cache"
  _warm(cache)
  doc = _index(cache)
  key = next(iter(doc["segments"]))
  del doc["segments"][key]["bytes"]  # a record missing a field: an error naming the index
  _write_index(cache, doc)
  assert cli.main(["cache", "info", str(cache), "--verify"]) == 2
  err = capsys.readouterr().err
  assert f"index.json: the record of segment {key} has no valid 'bytes'" in err
  assert "Traceback" not in err and "KeyError" not in err
  with pytest.raises(sx.CacheError, match="has no valid 'bytes'"):  # generate: exit 2 with it
    _engine().use_cache_dir(cache)
  (cache / "index.json").write_bytes(b"\x89\xff garbage \x00")
  assert cli.main(["cache", "info", str(cache), "--repair"]) == 0
  err = capsys.readouterr().err
  assert "not valid JSON" in err and "moved aside" in err
  assert glob.glob(str(cache / "segments" / "*.safetensors")) == []
  eng = _engine()
  assert len(eng.use_cache_dir(cache)) == 0  # starts empty


def test_a_cache_dir_that_cannot_be_created_exits_2_naming_it(tmp_path, monkeypatch, capsys):
  def read_only(path, *a, **k):
    raise OSError(30, "Read-only file system", path)

  monkeypatch.setattr(persist.os, "makedirs", read_only)
  inp = tmp_path / "req.jsonl"
  inp.write_text(json.dumps({"id": 1, "segments": [{"tokens": _ids(5, 1)}]}) + "\n")
  cache = tmp_path / "ro" / "cache"
  assert cli.main(["generate", "--model", "random:tiny", "--input", str(inp), "--output",
                   str(tmp_path / "o.jsonl"), "--cache-dir", str(cache), "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert f"{cache}/segments: cannot create or write the cache dir (Read-only file system)" in err
  assert "Traceback" not in err


def test_namespaces_neither_reuse_nor_see_each_others_segments(tmp_path):
  eng = _engine()
  eng.use_cache_dir(tmp_path / "cache")
  eng.cache_segments(PASSAGES[:1], namespace="alice")
  files = glob.glob(str(tmp_path / "cache" / "segments" / "*.safetensors"))
  assert [os.path.basename(f) for f in files] == [
      f"{segment_key(PASSAGES[0], 'alice')}.safetensors"]  # salted: not the plain token hash
  assert segment_key(PASSAGES[0], "alice") != segment_key(PASSAGES[0])
  request = sx.Request([sx.Segment(PASSAGES[0]), sx.Segment(_ids(4, 77), cache=False)],
                       namespace="bob")
  [out] = eng.generate([request], sx.SamplingParams(max_new_tokens=1), reuse=REUSE)
  assert out.stats.n_reused == 0  # bob does not hit alice's passage
  assert eng.stats(namespace="alice")["segment_cache"]["entries"] == 1
  assert eng.stats(namespace="carol")["segment_cache"]["entries"] == 0
  alice = dataclasses.replace(request, namespace="alice")
  [out] = eng.generate([alice], sx.SamplingParams(max_new_tokens=1), reuse=REUSE)
  assert out.stats.n_reused == len(PASSAGES[0])
  # A fresh engine of namespace alice loads it from disk; one of the default namespace does not.
  fresh = _engine(namespace="alice")
  fresh.use_cache_dir(tmp_path / "cache")
  plain = sx.Request(request.segments)
  _, plan = fresh.prefill_logits(plain, REUSE, return_plan=True)
  assert plan.reused_positions.size == len(PASSAGES[0])
  other = _engine()
  other.use_cache_dir(tmp_path / "cache")
  _, plan = other.prefill_logits(plain, REUSE, return_plan=True)
  assert plan.reused_positions.size == 0


def test_namespaces_keep_exact_prefix_hits_to_themselves():
  """The prefix cache is salted like the segment cache: a system prompt prefilled under one
  namespace is an exact hit for that namespace's next request, and a miss for any other."""
  eng = _engine()
  system = _ids(16, 91)  # 4 full pages of 4 tokens
  full = sx.ReuseConfig("prefix")

  def n_exact(namespace, tail_seed):
    req = sx.Request([sx.Segment(system), sx.Segment(_ids(3, tail_seed), cache=False)],
                     namespace=namespace)
    _, plan = eng.prefill_logits(req, full, return_plan=True)
    return int(np.sum(plan.labels == 0))

  assert n_exact("alice", 1) == 0  # fills alice's blocks
  assert n_exact("alice", 2) == 16  # alice hits them
  assert n_exact("bob", 3) == 0 and n_exact("", 4) == 0  # nobody else does
  assert n_exact("bob", 5) == 16 and n_exact("", 6) == 16  # each namespace its own chain
  eng.store.check_invariants()
