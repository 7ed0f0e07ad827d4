"""Issue 26, the batch job side: one writer per output (a lock naming its holder, a stale one
ignored), resumed and rerun jobs that answer as an uninterrupted one (a crash injected between a
segment's save and its result line), a parser that one line cannot kill (deep nesting, a huge
line, a byte-order mark), exit 2 naming the path for an output that cannot be written (a full
disk), and a property test over random jobs with kills injected around saves and writes.
Tiny random model, in process (one subprocess holds a lock)."""

import errno
import json
import os
import subprocess
import sys

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from sparsex_jax import batch
from sparsex_jax.batch import formats, writer
from sparsex_jax.entrypoints import cli
from sparsex_jax.kv import persist
from tests.engine.test_engine import _engine, _ids
from tests.entrypoints.test_jobs import SAMPLING, _FakeTokenizer, _read, _write

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Crash(BaseException):
  """A kill injected at a chosen point (BaseException: nothing may catch it on the way up)."""


def _job(n_passages=2, n_questions=2, seed=0):
  """[passage p, question] lines; every question cacheable (as an OpenAI line's would be)."""
  passages = [_ids(9, 900 + 7 * seed + p) for p in range(n_passages)]
  return [{"id": f"p{p}q{q}", "segments": [{"tokens": passages[p]},
                                           {"tokens": _ids(5, 1000 + 31 * seed + 10 * q + p)}]}
          | SAMPLING for q in range(n_questions) for p in range(n_passages)]


def _answers(path):
  return {r["id"]: (r["token_ids"], r["stats"]["n_reused"], r["stats"]["n_new"])
          for r in _read(path)}


def _run(tmp, inp, out, cache, **kw):
  engine = _engine()
  engine.use_cache_dir(cache)
  return batch.run_job(engine, inp, out, progress=False, batch_size=2, **kw)


# ------------------------------------------------------------------------------------------------
# One writer per output
# ------------------------------------------------------------------------------------------------

def test_a_second_job_on_the_same_output_stops_naming_the_holder(tmp_path):
  lines = _job(1, 2)
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  held = writer.OutputLock([out])
  try:
    with pytest.raises(batch.JobError, match=rf"res\.jsonl: in use by another job \(pid "
                                             rf"{os.getpid()} on "):
      batch.run_job(_engine(), inp, out, progress=False)
    assert not os.path.exists(out)  # nothing written, nothing of the holder's touched
  finally:
    held.release()
  assert not os.path.exists(out + ".lock")  # released: the lock file goes with it
  # A stale lock (its process died: the kernel dropped the flock) is not obeyed.
  with open(out + ".lock", "w") as f:
    f.write("pid 999999 on elsewhere since 2020-01-01T00:00:00\n")
  s = batch.run_job(_engine(), inp, out, progress=False)
  assert s.done == 2 and len(_read(out)) == 2 and not os.path.exists(out + ".lock")


def test_the_lock_holds_across_processes(tmp_path):
  out = str(tmp_path / "res.jsonl")
  child = subprocess.Popen(
      [sys.executable, "-c", "import sys; from sparsex_jax.batch.writer import OutputLock; "
       f"lock = OutputLock([{out!r}]); print('held', flush=True); sys.stdin.read()"],
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), stdin=subprocess.PIPE,
      stdout=subprocess.PIPE, text=True)
  try:
    assert child.stdout.readline().strip() == "held"
    with pytest.raises(batch.JobError, match=f"pid {child.pid} on"):
      writer.OutputLock([out])
  finally:
    child.kill()  # a SIGKILL: no release ran
    child.wait()
  writer.OutputLock([out]).release()  # the kernel released it: stale, not obeyed


# ------------------------------------------------------------------------------------------------
# Resumed and rerun jobs answer as an uninterrupted one
# ------------------------------------------------------------------------------------------------

def test_a_crash_between_save_and_write_does_not_change_the_resumed_answers(tmp_path,
                                                                          monkeypatch):
  lines = _job(2, 2)
  inp = _write(tmp_path / "req.jsonl", lines)
  ref_out = str(tmp_path / "ref.jsonl")
  _run(tmp_path, inp, ref_out, tmp_path / "ref-cache")
  reference = _answers(ref_out)
  # Rerun into a new output with the same cache dir: no crash, same answers.
  _run(tmp_path, inp, str(tmp_path / "again.jsonl"), tmp_path / "ref-cache")
  assert _answers(tmp_path / "again.jsonl") == reference

  out, cache = str(tmp_path / "res.jsonl"), tmp_path / "cache"
  real_write, n = writer.ResultWriter.write, [0]

  def crash_on_second(self, record):  # the request's segments are on disk by now
    n[0] += 1
    if n[0] == 2:
      raise Crash
    real_write(self, record)

  monkeypatch.setattr(writer.ResultWriter, "write", crash_on_second)
  with pytest.raises(Crash):
    _run(tmp_path, inp, out, cache)
  monkeypatch.setattr(writer.ResultWriter, "write", real_write)
  assert len(_read(out)) == 1
  s = _run(tmp_path, inp, out, cache)
  assert s.skipped == 1 and s.done == 3
  assert _answers(out) == reference  # n_new included: no request reused its own question
  assert persist.check_files(cache) == []


def test_the_final_message_of_an_openai_chat_line_is_not_cached_by_default():
  line = json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": {"messages": [
      {"role": "system", "content": "ab"}, {"role": "user", "content": "cd"}]}})
  job = batch.parse_line(line, 1, _FakeTokenizer(), batch.Defaults())
  assert [s.cache for s in job.request.segments] == [True, False, False]
  job = batch.parse_line(line, 1, _FakeTokenizer(), batch.Defaults(cache_final_message=True))
  assert [s.cache for s in job.request.segments] == [True, True, False]


# ------------------------------------------------------------------------------------------------
# The parser: one line is never the job's end
# ------------------------------------------------------------------------------------------------

def test_a_deep_a_huge_and_a_bom_line_are_bad_lines_among_good_ones(tmp_path, monkeypatch):
  monkeypatch.setattr(formats, "MAX_LINE_BYTES", 4000)
  good = _job(1, 3)
  deep = '{"id": "deep", "segments": ' + "[" * 1500 + "]" * 1500 + "}"
  nested = {"id": "nested", "segments": [{"tokens": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]}
  huge = {"id": "huge", "segments": [{"tokens": [5] * 2000}]}
  inp = tmp_path / "req.jsonl"
  with open(inp, "wb") as f:
    f.write(b"\xef\xbb\xbf" + json.dumps(good[0]).encode() + b"\n")  # a byte-order mark
    for line in (deep, json.dumps(nested), json.dumps(huge), json.dumps(good[1])):
      f.write(line.encode() + b"\n")
    f.write(b'{"id": "bytes", "segments": ["\xff\xfe"]}\n' + json.dumps(good[2]).encode() + b"\n")
  out = str(tmp_path / "res.jsonl")
  s = batch.run_job(_engine(), str(inp), out, progress=False)
  assert (s.done, s.failed) == (3, 4)
  errors = {e["line"]: e for e in _read(tmp_path / "res.errors.jsonl")}
  assert "nested deeper than the limit of 32" in errors[2]["error"]
  assert "nested deeper than the limit of 32" in errors[3]["error"]
  assert errors[3]["id"] is None or errors[3]["id"] == "nested"
  assert "over the limit of 4000" in errors[4]["error"]
  assert "not UTF-8" in errors[6]["error"]
  assert sorted(_answers(out)) == sorted(g["id"] for g in good)


# ------------------------------------------------------------------------------------------------
# Exit codes: an unusable output stops the job with 2 and one line naming the path
# ------------------------------------------------------------------------------------------------

def test_a_full_disk_under_the_output_exits_2_and_leaves_no_torn_line(tmp_path, monkeypatch,
                                                                      capsys):
  lines = _job(1, 4)
  inp, out = _write(tmp_path / "req.jsonl", lines), str(tmp_path / "res.jsonl")
  real_write, n = os.write, [0]

  def enospc_on_third(fd, data):
    n[0] += bytes(data[:6]) == b'{"id":'  # result lines only
    if n[0] == 3:  # half the line reaches the disk, then it is full
      real_write(fd, bytes(data)[:len(data) // 2])
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(fd, data)

  monkeypatch.setattr(writer.os, "write", enospc_on_third)
  args = ["generate", "--model", "random:tiny", "--page-size", "4", "--input", inp, "--output",
          out, "--no-progress", "--max-new-tokens", "3"]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert f"sparsex: error: {out}: cannot write (No space left on device)" in err
  assert "Traceback" not in err
  assert len(_read(out)) == 2  # whole lines only: the torn one was cut back off
  monkeypatch.setattr(writer.os, "write", real_write)
  assert cli.main(args) == 0
  assert sorted(_answers(out)) == sorted(line["id"] for line in lines)


def test_an_output_that_is_a_directory_exits_2(tmp_path, capsys):
  inp = _write(tmp_path / "req.jsonl", _job(1, 1))
  os.mkdir(tmp_path / "out")
  assert cli.main(["generate", "--model", "random:tiny", "--input", inp, "--output",
                   str(tmp_path / "out"), "--no-progress"]) == 2
  assert f"{tmp_path / 'out'}: is a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Property: random jobs, kills injected around saves and writes, resumed to the end
# ------------------------------------------------------------------------------------------------

KILL_POINTS = ("before_save", "during_save", "after_save", "during_write", "after_write")


def _inject(monkeypatch, point: str, when: int):
  """Raises Crash at the `when`-th occurrence of `point`."""
  count = [0]

  def due():
    count[0] += 1
    return count[0] == when

  save, atomic, write = (persist.SegmentDiskCache.save, persist._atomic_write,
                         writer.ResultWriter.write)
  if point in ("before_save", "after_save"):
    def patched_save(self, segments):
      if point == "before_save" and due():
        raise Crash
      n = save(self, segments)
      if point == "after_save" and due():
        raise Crash
      return n
    monkeypatch.setattr(persist.SegmentDiskCache, "save", patched_save)
  elif point == "during_save":  # a segment file written (or half written), its index not yet
    def patched_atomic(path, data):
      if path.endswith(".safetensors") and due():
        with open(os.path.join(os.path.dirname(path), ".tmp-killed" + os.path.basename(path)),
                  "wb") as f:
          f.write(data[:len(data) // 2])
        raise Crash
      atomic(path, data)
    monkeypatch.setattr(persist, "_atomic_write", patched_atomic)
  else:
    def patched_write(self, record):
      if point == "during_write" and due():
        data = (json.dumps(record) + "\n").encode()
        os.write(self._fd, data[:len(data) // 2])  # a torn line
        raise Crash
      write(self, record)
      if point == "after_write" and due():
        raise Crash
    monkeypatch.setattr(writer.ResultWriter, "write", patched_write)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 3), n_passages=st.integers(1, 2), n_questions=st.integers(1, 3),
       kills=st.lists(st.tuples(st.sampled_from(KILL_POINTS), st.integers(1, 3)), max_size=3))
def test_random_jobs_killed_anywhere_answer_as_uninterrupted_ones(tmp_path_factory, seed,
                                                                  n_passages, n_questions, kills):
  tmp = tmp_path_factory.mktemp("kills")
  lines = _job(n_passages, n_questions, seed)
  inp = _write(tmp / "req.jsonl", lines)
  _run(tmp, inp, str(tmp / "ref.jsonl"), tmp / "ref-cache")
  reference = _answers(tmp / "ref.jsonl")
  out, cache = str(tmp / "res.jsonl"), tmp / "cache"
  for point, when in kills:
    with pytest.MonkeyPatch.context() as mp:
      _inject(mp, point, when)
      try:
        _run(tmp, inp, out, cache)
      except Crash:
        pass
  _run(tmp, inp, out, cache)
  ids = [r["id"] for r in _read(out)]
  assert sorted(ids) == sorted(set(ids)) == sorted(line["id"] for line in lines)
  assert _answers(out) == reference
  assert persist.check_files(cache) == []
