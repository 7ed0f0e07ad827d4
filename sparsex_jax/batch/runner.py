"""Running a batch job: parse the requests file, plan the job so shared segments are computed
once, run it in windows of batches, and write one result line per request, resumably.

A line that fails (bad input, too long, a failure while it ran) is reported with its line number
on stderr and in the errors file beside the output, and is not written to the output, so a rerun
after fixing it runs it. Ctrl-C or SIGTERM stops after the current batch (a second one stops at
once); no finished result is lost and no line is left half-written.

`Job` is the driver's side of a job (the files, the tokenized requests, one result line written
per finished request, the summary), shared by `run_job` (one engine in this process) and
batch/replicas.py (engine replicas on Ray). The CLI (`sparsex generate`) is a thin layer over both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import sys
import time
from typing import Iterable

import numpy as np

from sparsex_jax.api import RequestOutput
from sparsex_jax.batch.formats import Defaults, JobError, JobLine, read_requests
from sparsex_jax.batch.plan import SHARED, plan_job
from sparsex_jax.batch.writer import (Critical, ErrorsFile, OutputLock, ResultWriter,
                                      errors_path_for, result_record)
from sparsex_jax.kv.segment_cache import segment_key
from sparsex_jax.prompt import tokenize
from sparsex_jax.reuse import ReuseConfig, ReuseMethod
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.validation import is_int

# A job hands the engine this many batches of requests at a time: within a window the running
# batch refills as requests finish (continuous batching), and each result is written as its
# request finishes. A graceful stop (SIGINT/SIGTERM) waits for the current window.
WINDOW_BATCHES = 4


@dataclasses.dataclass
class Summary:
  """What a job did (also printed by the CLI)."""

  lines: int = 0  # requests in the input (valid or not)
  skipped: int = 0  # already in the output
  done: int = 0  # written this run
  failed: int = 0  # reported in the errors file
  interrupted: bool = False
  torn_line_redone: bool = False
  seconds: float = 0.0
  n_prompt: int = 0
  n_exact: int = 0
  n_reused: int = 0
  n_new: int = 0
  n_recomputed: int = 0
  n_generated: int = 0
  n_precomputed: int = 0  # tokens of shared segments computed alone before their requests
  token_layers: int = 0  # prefill work done: tokens x layers they were computed through
  token_layers_no_reuse: int = 0  # the same job with full prefill: n_prompt x layers
  segments_loaded: int = 0  # from the disk cache
  segments_saved: int = 0  # to the disk cache
  errors_file: str | None = None
  # A job over engine replicas (batch/replicas.py): the routing policy, one dict per replica
  # (replicas.ReplicaStats.as_dict), and the shared segments computed alone on more than one
  # replica (a segment computed on k replicas counts k - 1) with their tokens.
  routing: str | None = None
  replicas: list[dict] = dataclasses.field(default_factory=list)
  segments_duplicated: int = 0
  tokens_duplicated: int = 0

  @property
  def hit_rate(self) -> float:
    """Prompt tokens whose KV came from a cache (exact prefix or segment)."""
    return (self.n_exact + self.n_reused) / self.n_prompt if self.n_prompt else 0.0

  @property
  def compute_fraction(self) -> float:
    return self.token_layers / self.token_layers_no_reuse if self.token_layers_no_reuse else 0.0

  def as_dict(self) -> dict:
    return dataclasses.asdict(self) | {"hit_rate": round(self.hit_rate, 4),
                                       "compute_fraction": round(self.compute_fraction, 4)}

  def text(self) -> str:
    rate = self.done / self.seconds if self.seconds else 0.0
    tok = self.n_generated / self.seconds if self.seconds else 0.0
    stopped = " - interrupted: rerun the same command to resume" if self.interrupted else ""
    lines = [
        f"requests: {self.done} done, {self.failed} failed, {self.skipped} already in the output "
        f"(of {self.lines}){stopped}",
        f"time: {self.seconds:.1f} s, {rate:.2f} requests/s, {tok:.1f} generated tokens/s",
        f"prompt tokens: {self.n_prompt}: exact prefix hits {self.n_exact}, reused {self.n_reused} "
        f"(recomputed {self.n_recomputed}), computed new {self.n_new}; cache hit rate "
        f"{self.hit_rate:.1%}",
        f"prefill work: {self.token_layers} token-layers (shared segments computed alone: "
        f"{self.n_precomputed} tokens) vs {self.token_layers_no_reuse} without reuse = "
        f"{self.compute_fraction:.1%}"]
    for r in self.replicas:
      rate_r = r["requests"] / r["busy_s"] if r["busy_s"] else 0.0
      died = f"; died: {r['died']}" if r["died"] else ""
      lines.append(
          f"replica {r['index']} ({r['where']}): {r['requests']} requests, {r['failed']} failed, "
          f"{r['tokens_computed']} prompt tokens computed, hit rate {r['hit_rate']:.1%}, busy "
          f"{r['busy_s']:.1f} s ({rate_r:.2f} requests/s), {r.get('new_programs', 0)} new "
          f"programs{died}")
    if self.routing is not None:
      lines.append(f"routing {self.routing}: shared segments computed on more than one replica: "
                   f"{self.segments_duplicated} ({self.tokens_duplicated} tokens)")
    if self.segments_loaded or self.segments_saved:
      lines.append(f"segment cache on disk: {self.segments_loaded} loaded, "
                   f"{self.segments_saved} saved")
    if self.torn_line_redone:
      lines.append("the output's last line was torn (an earlier crash): it was cut and redone")
    if self.errors_file:
      lines.append(f"errors: {self.errors_file}")
    return "\n".join(lines)


class Signals:
  """First SIGINT/SIGTERM: stop after the current batch. Second: stop now (after the line being
  written, if any). Installed only in the main thread."""

  def __init__(self, critical: Critical, log):
    self.critical, self.log = critical, log
    self.stop = 0  # the signal number that asked to stop
    self._old = {}

  def __enter__(self):
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def _handle(self, signum, frame):
    if self.stop:
      def abort():
        raise KeyboardInterrupt
      if self.critical.depth:
        self.critical.pending = abort
        return
      abort()
    self.stop = signum
    self.log(f"{signal.Signals(signum).name}: finishing the current batch, then stopping "
             f"(again to stop now; finished results are kept either way)")


def _cause(error: str) -> str:
  """A RequestOutput's error without the engine's "request i (id ...): " (the runner names the
  line instead)."""
  return re.sub(r"^request \d+( \(id .*?\))?: ", "", error or "", count=1)


def check_job(input_path: str, output_path: str, shared: str, batch_size: int) -> None:
  """The checks every job makes before it reads anything."""
  if shared not in SHARED:
    raise ValueError(f"shared must be one of {SHARED}, got {shared!r}")
  if not is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if os.path.exists(input_path) and os.path.exists(output_path) and \
      os.path.samefile(input_path, output_path):
    raise JobError(f"{output_path}: the output is the input file; give another --output")


class Job:
  """The driver's side of a job, whatever runs its requests (run_job: one engine in this
  process; batch/replicas.py: engine replicas on Ray): the input read and tokenized, the output
  and its errors file locked and open, each result written as it arrives and counted.

      job = Job(...)            # reads the input, locks the output (JobError: it cannot)
      with job:                 # opens the files, tokenizes; closes and unlocks at exit
        ... job.runnable, job.keys, job.segments, job.count ...
        job.finish(job.runnable[i], output)   # as each request finishes
  """

  def __init__(self, input_path: str, output_path: str, *, config, tokenizer, namespace: str = "",
               reuse: ReuseMethod = ReuseConfig(), defaults: Defaults = Defaults(),
               errors_path: str | None = None, progress: bool = True,
               model_name: str | None = None, log=None):
    self.start = time.perf_counter()
    self.config, self.tokenizer, self.namespace = config, tokenizer, namespace
    self.reuse, self.policy = reuse, reuse.resolve(config)
    self.reuse_record = {"mode": reuse.mode, "recompute_ratio": reuse.ratio,
                         "layer_threshold": self.policy.layer_threshold}
    self.model_name = model_name or config.name
    self.decode = tokenizer.decode if tokenizer is not None else (lambda ids: "")
    self.input_path, self.progress, self.log = input_path, progress, log
    self.summary = Summary()
    self.critical = Critical()
    self.bar = None
    self.lines, self.failed = read_requests(input_path, tokenizer, defaults)
    self.summary.lines = len(self.lines) + len(self.failed)
    self.errors_path = errors_path or errors_path_for(output_path)
    self.output_path = output_path
    self.writer: ResultWriter | None = None
    self.errors_file: ErrorsFile | None = None
    self._lock = OutputLock([output_path, self.errors_path])  # one job per output, for the job
    # Filled by __enter__: the requests to run (not in the output yet), the cacheable segment keys
    # of each, every segment (key -> (ids, namespace)), in how many requests of the whole file
    # each key appears, and each runnable request's prompt and max_new_tokens.
    self.runnable: list[JobLine] = []
    self.keys: list[list[str]] = []
    self.segments: dict[str, tuple[np.ndarray, str]] = {}
    self.count: dict[str, int] = {}
    self.n_prompt: list[int] = []
    self.max_new_tokens: list[int] = []

  def __enter__(self) -> "Job":
    try:
      self.writer = ResultWriter(self.output_path, self.critical)
      self.summary.torn_line_redone = self.writer.torn
      self.errors_file = ErrorsFile(self.errors_path, self.critical)
      for f in self.failed:
        self.fail(f.line, f.id, f.error)
      self.summary.skipped = sum(1 for j in self.lines if j.key in self.writer.done)
      self._tokenize()
      self.bar = _progress(len(self.runnable), self.progress)
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _tokenize(self) -> None:
    # Tokenize once, check lengths before any device work, and find the shared segments. Lines
    # already done count too: a segment a remaining request shares only with them is still
    # computed alone, so a resumed job gives the results an uninterrupted one would.
    for job in self.lines:
      max_new_tokens = (job.request.sampling or SamplingParams()).max_new_tokens
      try:
        prompt = tokenize(job.request, self.tokenizer, self.config, max_new_tokens,
                          self.namespace)
      except (ValueError, TypeError) as e:
        if job.key not in self.writer.done:
          self.fail(job.line, job.id, str(e))
        continue
      ks = []
      for ids, cacheable in zip(prompt.segments, prompt.cacheable):
        if cacheable:
          k = segment_key(ids, prompt.namespace)  # salted: namespaces never share a segment
          self.segments.setdefault(k, (ids, prompt.namespace))
          ks.append(k)
      for k in set(ks):
        self.count[k] = self.count.get(k, 0) + 1
      if job.key not in self.writer.done:
        self.runnable.append(job)
        self.keys.append(ks)
        self.n_prompt.append(int(sum(len(ids) for ids in prompt.segments)))
        self.max_new_tokens.append(int(max_new_tokens))

  @property
  def singletons(self) -> set[str]:
    """Segments only one request of the job has. The job never saves them to a cache dir: else a
    resumed (or rerun) request would find its own segment on disk and answer unlike an
    uninterrupted run. One already on disk (from `cache warm` or another job) is still read."""
    return {k for k, c in self.count.items() if c == 1}

  def say(self, msg: str) -> None:
    if self.log is not None:
      self.log(msg)
    elif self.bar is not None:
      self.bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr, flush=True)

  def fail(self, line: int, request_id, error: str) -> None:
    """Reports a line that cannot run (stderr and the errors file); it is not written."""
    self.summary.failed += 1
    self.summary.errors_file = self.errors_path
    self.say(f"{self.input_path}:{line}: "
             + (f"id {request_id!r}: " if request_id is not None else "") + error)
    self.errors_file.write({"line": line, "id": request_id, "error": error})

  def finish(self, job: JobLine, out: RequestOutput) -> None:
    """A request is done: its result line written (or its failure reported) and counted."""
    if out.error is not None:
      self.fail(job.line, job.id, _cause(out.error))
    else:
      self.writer.write(result_record(job, out, self.reuse_record, self.decode,
                                      self.model_name))
      account(self.summary, out, self.config.n_layers)
    if self.bar is not None:
      self.bar.update(1)
      el = time.perf_counter() - self.start
      self.bar.set_postfix_str(f"{self.summary.n_generated / el:.1f} tok/s, "
                               f"hit {self.summary.hit_rate:.0%}", refresh=False)

  def precomputed(self, n_tokens: int) -> None:
    """Shared segments of `n_tokens` tokens were computed alone (through every layer)."""
    self.summary.n_precomputed += n_tokens
    self.summary.token_layers += n_tokens * self.config.n_layers

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None
    if self.writer is not None:
      self.writer.close()
    if self.errors_file is not None:
      self.errors_file.close()
    self._lock.release()
    self.summary.seconds = time.perf_counter() - self.start


def compute_shared(engine, segments: Iterable[tuple[np.ndarray, str]], batch_size: int
                   ) -> list[tuple[np.ndarray, str]]:
  """Computes alone, at position 0, the segments (ids, namespace) that are neither in the
  engine's segment cache nor in its cache dir; returns those it computed. Checked just before the
  batch that reads them, not when planning: one evicted since is computed again, identically."""
  disk = engine.disk_cache
  todo = [(ids, ns) for ids, ns in segments
          if not (engine.store.contains_segment(ids, ns)
                  or (disk is not None and segment_key(ids, ns) in disk))]
  for namespace in dict.fromkeys(ns for _, ns in todo):
    engine.cache_segments([ids for ids, ns in todo if ns == namespace], batch_size=batch_size,
                          namespace=namespace)
  return todo


def run_job(engine, input_path: str, output_path: str, *,
            reuse: ReuseMethod = ReuseConfig(), defaults: Defaults = Defaults(),
            batch_size: int = 16, shared: str = "alone", errors_path: str | None = None,
            progress: bool = True, model_name: str | None = None, log=None) -> Summary:
  """Runs a JSONL job with `engine`; see the module docstring. Returns the Summary (its
  `interrupted` and `failed` say how it ended); raises JobError when the files cannot be used."""
  check_job(input_path, output_path, shared, batch_size)
  disk = engine.disk_cache
  loaded0, saved0 = (disk.loaded, disk.saved) if disk is not None else (0, 0)
  keep_off_disk0 = set(disk.keep_off_disk) if disk is not None else set()
  job = Job(input_path, output_path, config=engine.config, tokenizer=engine.tokenizer,
            namespace=engine.namespace, reuse=reuse, defaults=defaults, errors_path=errors_path,
            progress=progress, model_name=model_name, log=log)
  try:
    with job:
      if disk is not None:
        disk.keep_off_disk |= job.singletons

      def cached(k):
        return engine.store.contains_segment(*job.segments[k]) or (
            disk is not None and k in disk)

      plan = plan_job(job.keys, batch_size, shared, job.policy.reads_segment_cache, cached,
                      job.count)
      window = batch_size * WINDOW_BATCHES
      with Signals(job.critical, job.say) as signals:
        for step in plan.steps:
          for i in range(0, len(step), window):
            if signals.stop:
              break
            indices = step[i:i + window]
            # The window's shared segments, computed alone first.
            warm = compute_shared(engine, [job.segments[k] for k in dict.fromkeys(
                k for j in indices for k in job.keys[j]) if k in plan.warm], batch_size)
            job.precomputed(int(sum(len(ids) for ids, _ in warm)))
            results = engine.stream([job.runnable[j].request for j in indices], reuse=reuse,
                                    on_error="return")
            with contextlib.closing(results):  # an error here releases what the window holds
              for index, out in results:
                job.finish(job.runnable[indices[index]], out)  # written as each one finishes
      job.summary.interrupted = bool(signals.stop)
  except KeyboardInterrupt:
    job.summary.interrupted = True
  finally:
    if disk is not None:
      disk.keep_off_disk = keep_off_disk0
      job.summary.segments_loaded = disk.loaded - loaded0
      job.summary.segments_saved = disk.saved - saved0
  return job.summary


def account(summary: Summary, out: RequestOutput, n_layers: int) -> None:
  """Counts a finished request's prompt and prefill work in `summary`."""
  s = out.stats
  summary.done += 1
  summary.n_prompt += s.n_prompt
  summary.n_exact += s.n_exact
  summary.n_reused += s.n_reused
  summary.n_new += s.n_new
  summary.n_recomputed += s.n_recomputed
  summary.n_generated += s.n_generated
  summary.token_layers_no_reuse += s.n_prompt * n_layers
  if s.n_reused == 0:
    summary.token_layers += s.n_new * n_layers
  else:  # full layers [0, T) for every non-exact token, then only the active ones
    t = min(out.prefill.layer_threshold if out.prefill is not None else n_layers, n_layers)
    summary.token_layers += (s.n_new + s.n_reused) * t + (s.n_new + s.n_recomputed) * (n_layers - t)


def _progress(total: int, enabled: bool):
  if not enabled or total == 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
