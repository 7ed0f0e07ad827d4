"""The batch job runner (sparsex_jax/batch/) and `sparsex generate`, on a tiny random model:
bad lines reported by number while every other line runs, resuming (skipped ids, a torn last
line), the job plan (shared segments computed once), the OpenAI batch form, stop strings, and a
SIGINT mid-job in a subprocess. Real-model end-to-end tests are in test_jobs_real.py."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax import batch
from sparsex_jax.entrypoints import cli
from tests.engine.test_engine import CFG, _engine, _ids
from tests.research.scripts import CHEAP_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLING = {"max_new_tokens": 3, "ignore_eos": True}


def _write(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def _read(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _shared_job(n_passages=2, n_questions=3):
  """Requests [system, passage p, question q]: each passage shared by n_questions requests."""
  system, passages = _ids(6, 100), [_ids(21, 200 + p) for p in range(n_passages)]
  lines = []
  for q in range(n_questions):
    for p in range(n_passages):
      lines.append({"id": f"p{p}q{q}", "segments": [
          {"tokens": system}, {"tokens": passages[p]},
          {"tokens": _ids(5, 300 + 10 * q + p), "cache": False}]} | SAMPLING)
  return lines, system, passages


def test_bad_lines_are_reported_by_number_and_every_other_line_runs(tmp_path, capsys):
  good, _, _ = _shared_job(1, 2)
  lines = [good[0],
           '{"id": "broken", "segments": [',  # line 2: malformed
           {"segments": [{"tokens": [5, 6]}]},  # 3: no id
           good[0],  # 4: duplicate id
           {"id": "empty", "segments": [{"tokens": []}]},  # 5: empty segment
           {"id": "odd", "segments": [{"tokens": [5]}], "colour": "red"},  # 6: unknown field
           {"id": "long", "segments": [{"tokens": _ids(CFG.max_seq_len, 1)}]},  # 7: too long
           {"id": "vocab", "segments": [{"tokens": [CFG.vocab_size]}]},  # 8: not in vocabulary
           good[1]]
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  summary = batch.run_job(_engine(), inp, out, progress=False)
  assert summary.failed == 7 and summary.done == 2
  assert [r["id"] for r in _read(out)] == ["p0q0", "p0q1"]
  errors = _read(tmp_path / "res.errors.jsonl")
  assert [e["line"] for e in errors] == [2, 3, 4, 5, 6, 7, 8]
  text = " | ".join(e["error"] for e in errors)
  for word in ("not valid JSON", "missing \"id\"", "duplicate id", "empty", "colour",
               "context", "vocabulary"):
    assert word in text
  err = capsys.readouterr().err
  assert f"{inp}:7: id 'long':" in err and f"{inp}:2: " in err


def test_cli_exit_status_and_summary(tmp_path, capsys, monkeypatch):
  # The engine the flags describe, with the test model's weights (random:tiny would initialise
  # new ones, seconds each time; the SIGINT test below runs the real flag path).
  monkeypatch.setattr(cli, "_build_engine", lambda args: _engine(page_size=args.page_size))
  lines, _, _ = _shared_job(1, 2)
  inp = _write(tmp_path / "req.jsonl", lines[:1] + ["not json"] + lines[1:])
  out = str(tmp_path / "res.jsonl")
  args = ["generate", "--model", "random:tiny", "--input", inp, "--output", out, "--page-size",
          "4", "--pool-gib", "0.002", "--no-progress", "--summary-json", str(tmp_path / "s.json")]
  assert cli.main(args) == 1  # a line failed
  err = capsys.readouterr().err
  assert f"{inp}:2: not valid JSON" in err and "requests: 2 done, 1 failed" in err
  assert json.load(open(tmp_path / "s.json"))["done"] == 2
  _write(tmp_path / "req.jsonl", lines)  # fixed: the rerun has nothing left and no errors
  assert cli.main(args) == 0
  assert not os.path.exists(tmp_path / "res.errors.jsonl")
  assert cli.main(args[:6] + [inp] + args[7:]) == 2  # the output would overwrite the input
  assert "the output is the input file" in capsys.readouterr().err
  assert cli.main(["generate", "--model", "random:tiny", "--input", str(tmp_path / "nope"),
                   "--output", out, "--pool-gib", "0.002"]) == 2


def test_resume_skips_done_ids_and_redoes_a_torn_last_line(tmp_path):
  lines, _, _ = _shared_job(2, 2)
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  first = batch.run_job(_engine(), inp, out, progress=False, batch_size=2)
  assert first.done == 4
  want = {r["id"]: r["token_ids"] for r in _read(out)}
  with open(out, "rb") as f:
    data = f.read()
  with open(out, "wb") as f:  # a crash mid-write: the last line lost its tail
    f.write(data[:-25])
  again = batch.run_job(_engine(), inp, out, progress=False, batch_size=2)
  assert again.torn_line_redone and again.skipped == 3 and again.done == 1
  got = _read(out)
  assert sorted(r["id"] for r in got) == sorted(want)
  # The redone request reuses its passage computed alone, as the first run did (shared counts
  # include finished lines), so its tokens are the same.
  assert {r["id"]: r["token_ids"] for r in got} == want
  with open(out, "a") as f:
    f.write("garbage\n")  # a bad complete line is not ours to cut: a clear error, nothing run
  with pytest.raises(batch.JobError, match=r"res.jsonl:5: not a JSON result line"):
    batch.run_job(_engine(), inp, out, progress=False)


def test_shared_segments_are_computed_once_and_reported(tmp_path):
  lines, system, passages = _shared_job(2, 3)
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  reuse = sx.ReuseConfig("sparsex", layer_threshold=1)  # T = 1 of the tiny model's 3 layers
  s = batch.run_job(_engine(), inp, out, progress=False, batch_size=4, reuse=reuse)
  # The system prompt and both passages, computed alone once each, before their requests.
  assert s.n_precomputed == len(system) + sum(len(p) for p in passages)
  assert s.n_reused == 6 * (len(system) + 21)  # every request reuses both of its segments
  assert s.n_new == 6 * 5
  assert 0 < s.token_layers < s.token_layers_no_reuse and s.hit_rate > 0.8
  assert "without reuse" in s.text()


def test_plan_groups_requests_that_share_segments():
  keys = [["s", "a", "x"], ["s", "b"], ["s", "a", "y"], ["c"], ["s", "b", "y"], ["s", "a"]]

  def plan(shared, batch_size=2):
    return batch.plan_job(keys, batch_size, shared, True, lambda k: False)

  # 0, 1, 2, 4, 5 are linked (s, a, b, y): one component; inside it, grouped by the most specific
  # shared segment (the one in the fewest requests; ties: the earlier), not by the system prompt
  # s they all have: a (0, 5), b (1, 4), y (2, which shares it with 4, right before it).
  alone = plan("alone")
  assert alone.steps == [[0, 5, 1, 4, 2, 3]] and alone.warm == {"s", "a", "b", "y"}
  # In context, in that order: leaders compute each shared segment once, in rounds: 0 (s, a);
  # 1 (b) after 0, whose s it reads; 4 (y) after 1, whose b it reads; then 5, 2 and 3, which only
  # read what the leaders computed (or nothing shared).
  assert plan("context", 8).steps == [[0], [1], [4], [5, 2, 3]]
  assert plan("off").steps == [[0, 1, 2, 3, 4, 5]]


def test_openai_completion_form_gives_the_tokens_of_ours(tmp_path):
  prompt = _ids(17, 7)
  lines = [{"id": "ours", "segments": [{"tokens": prompt}], "max_new_tokens": 4},
           {"custom_id": "theirs", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": prompt, "max_tokens": 4, "temperature": 0,
                     "n": 1, "stream": False}},
           {"custom_id": "many", "url": "/v1/completions", "body": {"prompt": prompt, "n": 2}},
           {"custom_id": "where", "url": "/v1/embeddings", "body": {"input": "x"}}]
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  s = batch.run_job(_engine(), inp, out, progress=False, reuse=sx.ReuseConfig("full"))
  ours, theirs = _read(out)
  assert theirs["custom_id"] == "theirs" and theirs["error"] is None
  body = theirs["response"]["body"]
  assert body["object"] == "text_completion" and body["model"] == "m"
  assert theirs["sparsex"]["token_ids"] == ours["token_ids"]
  assert body["usage"]["prompt_tokens"] == 17 and body["usage"]["completion_tokens"] == 4
  errors = _read(tmp_path / "res.errors.jsonl")
  assert s.failed == 2 and "body.n=2 is not supported" in errors[0]["error"]
  assert "url must be one of" in errors[1]["error"]


def test_per_line_sampling_and_stop_strings():
  tok = _FakeTokenizer()
  job = batch.parse_line(json.dumps({"id": 3, "messages": [{"role": "user", "content": "hi"}],
                                     "temperature": 0.5, "seed": 9, "stop": "c"}),
                         1, tok, batch.Defaults(max_new_tokens=7))
  assert job.request.sampling == sx.SamplingParams(max_new_tokens=7, temperature=0.5, seed=9)
  assert [s.content for s in job.request.segments] == ["<u>hi</u>", "<a>"]
  # No seed given: one derived from the job seed and the id, the same on every run.
  a = batch.parse_line('{"id": "x", "segments": ["a"]}', 1, tok, batch.Defaults(seed=1))
  b = batch.parse_line('{"id": "x", "segments": ["a"]}', 9, tok, batch.Defaults(seed=1))
  c = batch.parse_line('{"id": "y", "segments": ["a"]}', 1, tok, batch.Defaults(seed=1))
  assert a.request.sampling.seed == b.request.sampling.seed != c.request.sampling.seed
  text, tokens, stopped = batch.apply_stop_strings("abcd", [1, 2, 3, 4], ["c"], tok.decode)
  assert (text, tokens, stopped) == ("ab", [1, 2, 3], True)
  with pytest.raises(batch.LineError, match="temperature"):
    batch.parse_line('{"id": 1, "segments": ["a"], "temperature": -1}', 1, tok, batch.Defaults())


class _FakeTokenizer:
  """A chat template of <role>content</role> turns, and ids 1..4 for the letters a..d."""

  def apply_chat_template(self, messages, add_generation_prompt=True):
    text = "".join(f"<{m['role'][0]}>{m['content']}</{m['role'][0]}>" for m in messages)
    return text + ("<a>" if add_generation_prompt else "")

  def decode(self, ids):
    return "".join("abcd"[i - 1] for i in ids)


def test_sigint_mid_job_loses_nothing_and_a_rerun_finishes_every_id_once(tmp_path):
  lines = [{"id": f"r{i}", "segments": [{"tokens": _ids(8 + i % 5, i)}],
            "max_new_tokens": 16, "ignore_eos": True} for i in range(80)]
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  cmd = [sys.executable, "-m", "sparsex_jax.entrypoints.cli", "generate", "--model", "random:tiny",
         "--input", inp, "--output", out, "--batch-size", "1", "--page-size", "4",
         "--pool-gib", "0.002",
         "--no-progress", "--reuse", "full"]
  # The rerun compiles nothing: both processes share a persistent compilation cache.
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=CHEAP_XLA_FLAGS,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(out) and os.path.getsize(out) > 0:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read()
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130, err
  assert "interrupted" in err and "SIGINT" in err
  with open(out, "rb") as f:
    data = f.read()
  assert data.endswith(b"\n")  # never a half-written line
  done = [json.loads(line)["id"] for line in data.splitlines()]
  assert 0 < len(done) < len(lines)
  rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert rerun.returncode == 0, rerun.stderr
  ids = [r["id"] for r in _read(out)]
  assert sorted(ids) == sorted(line["id"] for line in lines)  # every id exactly once
  assert f"{len(done)} already in the output" in rerun.stderr


def test_chat_segments_fall_back_to_one_segment_for_a_template_that_rewrites_history():
  class Rewriting(_FakeTokenizer):
    def apply_chat_template(self, messages, add_generation_prompt=True):
      # Like templates that drop earlier turns' reasoning: a longer history is no extension.
      return super().apply_chat_template(messages[-1:], add_generation_prompt)

  msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
  segs = sx.chat_segments(Rewriting(), msgs)
  assert [s.content for s in segs] == ["<a>b</a><a>"]
  assert [s.content for s in sx.chat_segments(_FakeTokenizer(), msgs)] == \
      ["<u>a</u>", "<a>b</a>", "<a>"]
  with pytest.raises(ValueError, match="no chat template|tokenizer"):
    sx.chat_segments(None, msgs)


def test_demo_kl_from_full():
  from sparsex_jax.entrypoints.demo import kl_from_full
  x = np.array([2.0, 0.5, -1.0])
  assert kl_from_full(x, x + 3.0) == pytest.approx(0.0, abs=1e-12)  # a shift changes nothing
  assert kl_from_full(x, x[::-1]) > 0.5


def test_cli_replicas_flags_reach_the_replicated_job_and_ray_is_needed(tmp_path, capsys,
                                                                       monkeypatch):
  """--replicas N hands the job to batch/replicas.py (run on Ray in tests/batch/); here only the
  wiring: the flags it passes, the engine each replica builds from them, and the error without
  Ray. The Ray runs themselves are in tests/batch/test_replicas.py."""
  import pickle

  from sparsex_jax.batch import replicas
  lines, _, _ = _shared_job(1, 2)
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  base = ["generate", "--model", "random:tiny", "--input", inp, "--output", out, "--page-size",
          "4", "--pool-gib", "0.002", "--no-progress"]
  args = base + ["--replicas", "3", "--routing", "round_robin", "--gpus-per-replica", "0.5",
                 "--ray-address", "auto"]
  calls = {}

  def fake(make_engine, input_path, output_path, **kw):
    calls.update(kw, make_engine=make_engine, paths=(input_path, output_path))
    return batch.Summary(lines=2, done=2, routing=kw["routing"])

  monkeypatch.setattr(replicas, "import_ray", lambda: None)
  monkeypatch.setattr(replicas, "run_replicated_job", fake)
  assert cli.main(args) == 0
  assert calls["paths"] == (inp, out) and calls["replicas"] == 3
  assert calls["routing"] == "round_robin" and calls["gpus_per_replica"] == 0.5
  assert calls["ray_address"] == "auto" and calls["tp"] == 1 and calls["batch_size"] == 16
  assert "routing round_robin" in capsys.readouterr().err
  # Each replica builds its engine from the flags, in its own process: the factory pickles.
  make_engine = pickle.loads(pickle.dumps(calls["make_engine"]))
  monkeypatch.setattr(cli, "_build_engine", lambda a: _engine(page_size=a.page_size))
  assert make_engine().layout.page_size == 4
  monkeypatch.setattr(replicas, "import_ray", lambda: (_ for _ in ()).throw(
      ImportError('engine replicas run on Ray: pip install -e ".[ray]"')))
  assert cli.main(args) == 2
  assert 'pip install -e ".[ray]"' in capsys.readouterr().err
  assert cli.main(base + ["--replicas", "0"]) == 2
  assert "--replicas must be >= 1" in capsys.readouterr().err


def test_without_ray_the_replicas_say_how_to_install_it(monkeypatch):
  from sparsex_jax.batch import replicas
  monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
  with pytest.raises(ImportError, match=r'pip install -e "\.\[ray\]"'):
    replicas.import_ray()
