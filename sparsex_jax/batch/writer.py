"""The output of a batch job: result lines written whole, crash-safe and resumable.

A result line is written in one call and flushed as soon as its request is done; a rerun with the
same output skips the ids already there. A torn last line (a crash mid-write) is cut off and its
request redone. SIGINT/SIGTERM wait while a line is being written (Critical).

One job per output: OutputLock holds an exclusive lock (flock on OUTPUT.lock) on the output and its
errors file for the whole job, so a second job on the same output stops at once, naming the
holder. The kernel drops the lock when its process dies, so a crashed job's lock file is stale and
ignored (its content only names who held it).

A write that fails (a full disk, an I/O error) cuts what it wrote back off and stops the job with
a JobError naming the file: no torn line stays behind, every line before it is kept.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
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


class OutputLock:
  """An exclusive lock on each of `paths` (the output and its errors file) for one job."""

  def __init__(self, paths: Sequence[str]):
    self._held: list[tuple[str, int]] = []  # (lock file, fd)
    try:
      for path in dict.fromkeys(os.path.abspath(p) for p in paths):
        self._acquire(path)
    except BaseException:
      self.release()
      raise

  def _acquire(self, path: str) -> None:
    import fcntl
    lock = path + ".lock"
    while True:
      try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise JobError(f"{lock}: cannot create the output's lock file ({e.strerror})") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
          raise JobError(f"{path}: in use by another job ({holder}; lock {lock}); wait for it "
                         f"to end or give another --output") from None
        raise JobError(f"{lock}: cannot lock ({e.strerror})") from None
      # The holder before us may have unlinked the file between our open and our flock: then we
      # hold a lock nobody else can see. Lock the file that is at the path now.
      try:
        same = os.stat(lock).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
    self._held.append((lock, fd))

  def release(self) -> None:
    while self._held:
      lock, fd = self._held.pop()
      with contextlib.suppress(OSError):
        os.unlink(lock)  # while still locked: no one can be holding a lock on the old inode
      os.close(fd)


def _append(fd: int, path: str, data: bytes) -> None:
  """Appends `data` whole or not at all: a failed write is cut back off (a full disk must not
  leave a torn line), then a JobError names the file."""
  size = os.fstat(fd).st_size
  view = memoryview(data)
  try:
    while view:
      n = os.write(fd, view)
      view = view[n:]
  except OSError as e:
    with contextlib.suppress(OSError):
      os.ftruncate(fd, size)
    raise JobError(f"{path}: cannot write ({e.strerror}); the job stopped, every line before "
                   f"this one is kept: fix it and rerun the same command") from None


class ErrorsFile:
  """The errors file of a run: one JSON line per failed input line, created at the first."""

  def __init__(self, path: str, critical: Critical):
    self.path, self.critical, self._fd = path, critical, None
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)  # it describes the latest run only

  def write(self, record: dict) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    with self.critical.section():
      if self._fd is None:
        try:
          self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
          raise JobError(f"{self.path}: cannot write the errors file ({e.strerror})") from None
      _append(self._fd, self.path, data)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class ResultWriter:
  """The output JSONL: reads the ids already done, cuts a torn last line, appends flushed lines."""

  def __init__(self, path: str, critical: Critical | None = None):
    self.path, self.critical = path, critical or Critical()
    self.done: set[str] = set()
    self.torn = False  # a torn last line was found and cut
    if os.path.isdir(path):
      raise JobError(f"{path}: is a directory; --output names a file")
    try:
      if os.path.exists(path):
        self._scan()
      self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
        except (ValueError, RecursionError):
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
      _append(self._fd, self.path, data)

  def close(self) -> None:
    with self.critical.section():
      if self._fd is None:
        return
      with contextlib.suppress(OSError):
        os.fsync(self._fd)
      os.close(self._fd)
      self._fd = None


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
           "n_continued": s.n_continued, "n_reused": s.n_reused, "n_new": s.n_new,
           "n_recomputed": s.n_recomputed,
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
