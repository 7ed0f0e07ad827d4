"""The output of a batch job: result lines written whole, crash-safe and resumable.

A result line is written in one call and flushed as soon as its request is done; a rerun with the
same output skips the ids already there. A torn last line (a crash mid-write) is cut off and its
request redone. SIGINT/SIGTERM wait while a line is being written (Critical).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from typing import Callable, Sequence

from sparsex_jax.api import RequestOutput
from sparsex_jax.batch.formats import JobError, JobLine, id_key

class Critical:
  """Defers SIGINT/SIGTERM while a result line is written: a line is written whole or not."""

  def __init__(self):
    self.depth = 0
    self.pending: Callable[[], None] | None = None

  @contextlib.contextmanager
  def section(self):
    self.depth += 1
    try:
      yield
    finally:
      self.depth -= 1
      if self.depth == 0 and self.pending is not None:
        pending, self.pending = self.pending, None
        pending()


class ResultWriter:
  """The output JSONL: reads the ids already done, cuts a torn last line, appends flushed lines."""

  def __init__(self, path: str, critical: Critical | None = None):
    self.path, self.critical = path, critical or Critical()
    self.done: set[str] = set()
    self.torn = False  # a torn last line was found and cut
    if os.path.exists(path):
      self._scan()
    try:
      self._f = open(path, "ab")  # noqa: SIM115  (closed by close())
    except OSError as e:
      raise JobError(f"{path}: cannot write ({e.strerror})") from None

  def _scan(self) -> None:
    with open(self.path, "rb") as f:
      data = f.read()
    # Every line we write ends with "\n" and is written in one call: bytes after the last newline
    # are a write a crash cut short (even if they parse), so they are cut and that request redone.
    *complete, tail = data.split(b"\n")
    good = 0
    for n, part in enumerate(complete, start=1):
      if part.strip():
        try:
          rec = json.loads(part.decode("utf-8"))
          if not isinstance(rec, dict):
            raise ValueError
        except ValueError:
          raise JobError(f"{self.path}:{n}: not a JSON result line (edited by hand?); fix or "
                         f"remove it, then rerun") from None
        self.done.add(id_key(rec["custom_id"] if "custom_id" in rec else rec.get("id")))
      good += len(part) + 1
    if tail:
      self.torn = True
      with open(self.path, "r+b") as f:
        f.truncate(good)

  def write(self, record: dict) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with self.critical.section():
      self._f.write(data)
      self._f.flush()

  def close(self) -> None:
    with self.critical.section():
      with contextlib.suppress(OSError):
        os.fsync(self._f.fileno())
      self._f.close()


def errors_path_for(output: str) -> str:
  """The errors file beside an output: results.jsonl -> results.errors.jsonl."""
  base, ext = os.path.splitext(output)
  return f"{base}.errors{ext or '.jsonl'}"


def apply_stop_strings(text: str, tokens: list[int], stops: Sequence[str], decode
                       ) -> tuple[str, list[int], bool]:
  """Cuts `text` before the first stop string and `tokens` after the token that completed it."""
  cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
  if cut < 0:
    return text, tokens, False
  for n in range(1, len(tokens) + 1):
    if any(s in decode(tokens[:n]) for s in stops):
      tokens = tokens[:n]
      break
  return text[:cut], tokens, True


def result_record(job: JobLine, out: RequestOutput, reuse: dict, decode, model: str) -> dict:
  """The output line of a finished request, in the form of its input."""
  text, tokens, reason = out.text, list(out.token_ids), out.finish_reason
  if job.stop:
    text, tokens, stopped = apply_stop_strings(text, tokens, job.stop, decode)
    reason = "stop" if stopped else reason
  s = out.stats
  stats = {"ttft_s": round(s.ttft_s, 6), "n_prompt": s.n_prompt, "n_exact": s.n_exact,
           "n_reused": s.n_reused, "n_new": s.n_new, "n_recomputed": s.n_recomputed,
           "n_generated": s.n_generated}
  if job.form == "ours":
    return {"id": job.id, "text": text, "token_ids": tokens, "finish_reason": reason,
            "stats": stats, "reuse": reuse}
  created = int(time.time())
  if job.form == "chat.completion":
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "logprobs": None, "finish_reason": reason}
  else:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
  body = {"id": f"{'chatcmpl' if job.form == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
          "object": job.form, "created": created, "model": job.model or model,
          "choices": [choice],
          "usage": {"prompt_tokens": s.n_prompt, "completion_tokens": len(tokens),
                    "total_tokens": s.n_prompt + len(tokens)}}
  return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": job.id,
          "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body},
          "error": None, "sparsex": {"token_ids": tokens, "stats": stats, "reuse": reuse}}
