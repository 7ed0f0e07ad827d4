"""A batch job over engine replicas on a local Ray (sparsex_jax/batch/replicas.py), on the CPU:
two replicas answer as one engine does, line for line (the tiny model and SmolLM2, greedy and
seeded sampling); affinity routing computes a shared segment on one replica where round-robin
computes it on each; a replica killed mid-job has its requests rerun by the other, each id
written once; and a job cut off at random points and rerun ends as an uninterrupted one.

One Ray for the module (2 CPUs); this process and the replicas share a jax compilation cache on
disk, so that a replica reads the programs the one-engine run here compiled."""

import functools
import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import sparsex_jax as sx
from models.config import get_config
from sparsex_jax import batch
from sparsex_jax.batch import replicas, writer

CFG = get_config("tiny", dtype="float32")
# Replicas build the same random weights from the seed; page and pool sizes as the engine tests'.
TINY = functools.partial(sx.Engine.random, CFG, seed=0, page_size=4, num_pages=256,
                         max_batch_size=4)
BATCH = 4


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """jax's compilation cache on disk for this module, written and read by this process and by
  every replica: a replica reads what the one-engine run here compiled first. The settings of
  the process are put back at the end."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache as cc
  path = str(tmp_path_factory.mktemp("xla"))
  settings = {"jax_enable_compilation_cache": True, "jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": -1}  # -1: every entry (0: jax picks)
  old = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  cc.reset_cache()
  yield path
  for name, value in old.items():
    jax.config.update(name, value)
  cc.reset_cache()


@pytest.fixture(scope="module")
def ray_cluster(compile_cache):
  ray = replicas.import_ray()
  assert not ray.is_initialized()
  ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
           runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu",
                                     "JAX_COMPILATION_CACHE_DIR": compile_cache,
                                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}})
  yield ray
  ray.shutdown()


@pytest.fixture(scope="module")
def tiny_engine(compile_cache):
  """The one-engine reference, built here first: the replicas read its compiled programs."""
  return TINY()


def _pool(make, n=2):
  # Half a CPU each: two pools fit the module's Ray at once (the shared one and a test's own).
  return replicas.ReplicaPool(make, n, cpus_per_replica=0.5)


@pytest.fixture(scope="module")
def tiny_pool(ray_cluster, tiny_engine):
  with _pool(TINY) as pool:
    yield pool


def _ids(n, seed):
  return [int(i) for i in np.random.default_rng(seed).integers(3, CFG.vocab_size, size=n)]


def _job(path, n_passages=4, n_questions=3, max_new_tokens=4):
  """[system, passage p, question q] lines, each passage shared by n_questions requests; the
  last question of each passage sampled with its seed, the others greedy."""
  system, passages = _ids(6, 100), [_ids(21, 200 + p) for p in range(n_passages)]
  with open(path, "w", encoding="utf-8") as f:
    for q in range(n_questions):
      for p in range(n_passages):
        sampled = {"temperature": 0.8} if q == n_questions - 1 else {}
        f.write(json.dumps({"id": f"p{p}q{q}", "max_new_tokens": max_new_tokens,
                            "ignore_eos": True, "segments": [
                                {"tokens": system}, {"tokens": passages[p]},
                                {"tokens": _ids(5, 300 + 10 * q + p), "cache": False}]}
                           | sampled) + "\n")
  return str(path)


# Where each prompt token's K/V came from: it depends on what the replica computed before (an
# earlier test's job of the same prompts continues as a whole earlier prompt, a killed replica's
# requests are computed afresh elsewhere), not on the job machinery these tests are about.
PROVENANCE = ("n_exact", "n_continued", "n_reused", "n_new", "n_recomputed")


def _results(path):
  """id -> the result line without its timing and without where its K/V came from (the tokens,
  text and finish reason must be the same whatever the replica's caches held)."""
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      rec["stats"].pop("ttft_s")
      for name in PROVENANCE:
        rec["stats"].pop(name)
      assert rec["id"] not in out, f"{rec['id']} written twice"
      out[rec["id"]] = rec
  return out


def test_two_replicas_answer_as_one_engine_line_for_line(tmp_path, tiny_engine, tiny_pool):
  tiny_pool.clear_caches()
  inp = _job(tmp_path / "req.jsonl")
  one = batch.run_job(tiny_engine, inp, str(tmp_path / "one.jsonl"), progress=False,
                      batch_size=BATCH)
  two = tiny_pool.run_job(inp, str(tmp_path / "two.jsonl"), progress=False, batch_size=BATCH)
  assert one.done == two.done == 12 and two.failed == 0
  assert _results(tmp_path / "two.jsonl") == _results(tmp_path / "one.jsonl")
  # Both replicas worked, each passage on one of them (only the system prompt is on both).
  assert [r["requests"] for r in two.replicas] == [6, 6]
  assert two.segments_duplicated == 1 and two.tokens_duplicated == 6
  assert two.n_precomputed == one.n_precomputed + 6
  assert "replica 1 (" in two.text() and "routing affinity" in two.text()


def test_affinity_computes_fewer_tokens_than_round_robin(tmp_path, tiny_pool):
  inp = _job(tmp_path / "req.jsonl", n_passages=6, n_questions=2, max_new_tokens=2)
  runs = {}
  for routing in ("affinity", "round_robin"):
    tiny_pool.clear_caches()  # each starts cold
    out = str(tmp_path / f"{routing}.jsonl")
    runs[routing] = (tiny_pool.run_job(inp, out, progress=False, batch_size=BATCH,
                                       routing=routing), _results(out))
  (aff, aff_lines), (rr, rr_lines) = runs["affinity"], runs["round_robin"]
  assert aff_lines == rr_lines  # the same answers either way
  # Dealt out request by request, both questions of a passage land on different replicas, which
  # both compute it; by affinity each passage is computed once (the system prompt twice).
  assert aff.n_precomputed == 2 * 6 + 6 * 21 and aff.tokens_duplicated == 6
  assert rr.n_precomputed == 2 * 6 + 2 * 6 * 21 and rr.tokens_duplicated == 6 + 6 * 21
  assert aff.token_layers < rr.token_layers


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, tiny_pool):
  """A 40-request job in windows of 8 (batch size 2), and its uninterrupted results."""
  path = tmp_path_factory.mktemp("long")
  inp = _job(path / "req.jsonl", n_passages=8, n_questions=5, max_new_tokens=6)
  tiny_pool.run_job(inp, str(path / "want.jsonl"), progress=False, batch_size=2)
  return inp, _results(path / "want.jsonl")


def test_a_replica_killed_mid_job_has_its_requests_rerun_on_the_other(ray_cluster, tmp_path,
                                                                      long_job):
  inp, want = long_job
  out = str(tmp_path / "res.jsonl")
  with _pool(TINY) as pool:
    done = {}
    job = threading.Thread(target=lambda: done.setdefault("summary", pool.run_job(
        inp, out, progress=False, batch_size=2)))
    job.start()
    deadline = time.time() + 120
    while time.time() < deadline and job.is_alive():
      if os.path.exists(out) and sum(1 for _ in open(out, encoding="utf-8")) >= 2:
        break
      time.sleep(0.05)
    ray_cluster.kill(pool.actors[1])
    job.join(timeout=300)
    summary = done["summary"]
    assert pool.alive == [True, False]
  assert summary.done == 40 and summary.failed == 0
  first, second = summary.replicas
  # Replica 1 had about half the job when it died; replica 0 ran the rest.
  assert second["died"] and not first["died"] and first["requests"] > 20
  assert first["requests"] + second["requests"] == 40
  assert _results(out) == want  # every id once, answered as an uninterrupted run


def test_the_first_sigint_lets_every_replica_finish_its_windows(tmp_path, tiny_pool, long_job,
                                                                monkeypatch):
  inp, want = long_job
  out = str(tmp_path / "res.jsonl")
  real_write = writer.ResultWriter.write

  def interrupt_at_first_line(self, record):  # Ctrl-C as the first result comes in
    real_write(self, record)
    monkeypatch.setattr(writer.ResultWriter, "write", real_write)
    os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(writer.ResultWriter, "write", interrupt_at_first_line)
  s = tiny_pool.run_job(inp, out, progress=False, batch_size=2)
  # Each replica has 20 requests, in windows of 8, 8 and 4, and two windows in flight: both are
  # finished and written, the third is never sent.
  assert s.interrupted and [r["requests"] for r in s.replicas] == [16, 16]
  assert len(_results(out)) == 32
  again = tiny_pool.run_job(inp, out, progress=False, batch_size=2)
  assert not again.interrupted and again.skipped == 32 and again.done == 8
  assert _results(out) == want


def test_a_job_cut_off_at_random_points_and_rerun_ends_as_an_uninterrupted_one(tmp_path,
                                                                               tiny_pool):
  inp = _job(tmp_path / "req.jsonl")
  whole = str(tmp_path / "whole.jsonl")
  tiny_pool.run_job(inp, whole, progress=False, batch_size=BATCH)
  with open(whole, "rb") as f:
    data = f.read()
  rng = np.random.default_rng(29)
  for cut in rng.integers(1, len(data), size=3):  # a crash leaves a prefix, maybe a torn line
    out = str(tmp_path / f"cut{cut}.jsonl")
    with open(out, "wb") as f:
      f.write(data[:cut])
    kept = data[:cut].count(b"\n")
    s = tiny_pool.run_job(inp, out, progress=False, batch_size=BATCH)
    assert s.skipped == kept and s.done == 12 - kept
    assert s.torn_line_redone == (not data[:cut].endswith(b"\n"))
    assert _results(out) == _results(whole)


def test_two_smollm2_replicas_answer_as_one_engine(ray_cluster, real_model, tmp_path):
  kw = dict(page_size=16, kv_pool_bytes=32 << 20, max_batch_size=4)
  passages = ["The Orvane Bridge crosses the river Tessel at Marlow. It was designed by the "
              "engineer Hedda Lindqvist and opened in 1911.",
              "Saltmere is a coastal town known for its lighthouse and its herring festival, "
              "held every May since 1870."]
  inp = tmp_path / "req.jsonl"
  with open(inp, "w", encoding="utf-8") as f:
    for q, question in enumerate(["Who or what is it about?", "When did it start?"]):
      for p, passage in enumerate(passages):
        f.write(json.dumps({"id": f"p{p}q{q}", "max_new_tokens": 4, "messages": [
            {"role": "system", "content": "Answer in a few words."},
            {"role": "user", "content": passage},
            {"role": "user", "content": question, "cache": False}]}
            | ({"temperature": 0.7} if q else {})) + "\n")
  one = sx.Engine(real_model.config, real_model.params, real_model.tokenizer, **kw)
  batch.run_job(one, str(inp), str(tmp_path / "one.jsonl"), progress=False, batch_size=4)
  make = functools.partial(sx.Engine.from_pretrained, "smollm2-135m", dtype="float32", **kw)
  with _pool(make) as pool:
    two = pool.run_job(str(inp), str(tmp_path / "two.jsonl"), progress=False, batch_size=4)
  assert two.done == 4 and [r["requests"] for r in two.replicas] == [2, 2]
  assert _results(tmp_path / "two.jsonl") == _results(tmp_path / "one.jsonl")


def test_replicas_take_a_gpu_each_or_share_one_with_a_memory_limit():
  class Cluster:  # what _actor_options asks of ray
    def __init__(self, resources):
      self.resources = resources

    def cluster_resources(self):
      return self.resources

  gpus, cpus = Cluster({"CPU": 16, "GPU": 2}), Cluster({"CPU": 2})
  each = replicas._actor_options(gpus, 2, None, 1, 1, None)
  assert each == {"num_cpus": 1, "num_gpus": 1.0, "max_restarts": 0, "max_task_retries": 0}
  assert replicas._actor_options(gpus, 1, None, 1, 2, None)["num_gpus"] == 2.0  # --tp 2
  half = replicas._actor_options(gpus, 4, 0.5, 1, 1, {"A": "b"})
  assert half["num_gpus"] == 0.5
  assert half["runtime_env"]["env_vars"] == {"A": "b", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"}
  assert replicas._actor_options(cpus, 2, None, 1, 1, None)["num_gpus"] == 0.0  # no GPU: CPUs
  with pytest.raises(ValueError, match="3 replicas x 1 GPU need 3 GPU; the Ray cluster has"):
    replicas._actor_options(gpus, 3, None, 1, 1, None)
  with pytest.raises(ValueError, match="tp=2"):
    replicas._actor_options(gpus, 1, 0.5, 1, 2, None)
  with pytest.raises(ValueError, match="replicas must be"):
    replicas.ReplicaPool(TINY, 0)


def test_a_replica_error_is_told_in_one_line():
  died = ("The actor died because of an error raised in its creation task, \x1b[36mray::"
          "Replica.__init__()\x1b[39m (pid=1, ip=10.0.0.1)\n  File \"/x/loaders.py\", line "
          "255, in open_gguf\n    raise FileNotFoundError(f\"GGUF file not found: {path}\")\n"
          "FileNotFoundError: GGUF file not found: /nowhere/m.gguf")
  assert replicas._cause(Exception(died)) == \
      "FileNotFoundError: GGUF file not found: /nowhere/m.gguf"
  killed = "The actor is dead because it was killed by `ray.kill`.\n  (more)"
  assert replicas._cause(Exception(killed)) == \
      "The actor is dead because it was killed by `ray.kill`."
