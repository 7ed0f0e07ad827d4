"""Running a batch job: parse the requests file, plan the job so shared segments are computed
once, run it in windows of batches, and write one result line per request, resumably.

A line that fails (bad input, too long, a failure while it ran) is reported with its line number
on stderr and in the errors file beside the output, and is not written to the output, so a rerun
after fixing it runs it. Ctrl-C or SIGTERM stops after the current batch (a second one stops at
once); no finished result is lost and no line is left half-written.

The CLI (`sparsex generate`) is a thin layer over `run_job`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import sys
import time

from sparsex_jax.api import RequestOutput
from sparsex_jax.batch.formats import Defaults, JobError, read_requests
from sparsex_jax.batch.plan import SHARED, plan_job
from sparsex_jax.batch.writer import (Critical, ErrorsFile, OutputLock, ResultWriter,
                                      errors_path_for, result_record)
from sparsex_jax.kv.segment_cache import segment_key
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
    if self.segments_loaded or self.segments_saved:
      lines.append(f"segment cache on disk: {self.segments_loaded} loaded, "
                   f"{self.segments_saved} saved")
    if self.torn_line_redone:
      lines.append("the output's last line was torn (an earlier crash): it was cut and redone")
    if self.errors_file:
      lines.append(f"errors: {self.errors_file}")
    return "\n".join(lines)


class _Signals:
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


def run_job(engine, input_path: str, output_path: str, *,
            reuse: ReuseMethod = ReuseConfig(), defaults: Defaults = Defaults(),
            batch_size: int = 16, shared: str = "alone", errors_path: str | None = None,
            progress: bool = True, model_name: str | None = None, log=None) -> Summary:
  """Runs a JSONL job with `engine`; see the module docstring. Returns the Summary (its
  `interrupted` and `failed` say how it ended); raises JobError when the files cannot be used."""
  if shared not in SHARED:
    raise ValueError(f"shared must be one of {SHARED}, got {shared!r}")
  if not is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if os.path.exists(input_path) and os.path.exists(output_path) and \
      os.path.samefile(input_path, output_path):
    raise JobError(f"{output_path}: the output is the input file; give another --output")
  start = time.perf_counter()
  cfg = engine.config
  policy = reuse.resolve(cfg)
  reuse_record = {"mode": reuse.mode, "recompute_ratio": reuse.ratio,
                  "layer_threshold": policy.layer_threshold}
  model_name = model_name or cfg.name
  tok = engine.tokenizer
  decode = tok.decode if tok is not None else (lambda ids: "")
  summary = Summary()
  critical = Critical()

  bar = None

  def say(msg: str) -> None:
    if log is not None:
      log(msg)
    elif bar is not None:
      bar.write(msg, file=sys.stderr)
    else:
      print(msg, file=sys.stderr, flush=True)

  disk = engine.disk_cache
  loaded0, saved0 = (disk.loaded, disk.saved) if disk is not None else (0, 0)
  lines, failed = read_requests(input_path, tok, defaults)
  summary.lines = len(lines) + len(failed)
  errors_path = errors_path or errors_path_for(output_path)
  lock = OutputLock([output_path, errors_path])  # one job per output, for the whole job
  writer = errors_file = None
  keep_off_disk0 = set(disk.keep_off_disk) if disk is not None else set()

  def fail(line: int, request_id, error: str) -> None:
    summary.failed += 1
    summary.errors_file = errors_path
    say(f"{input_path}:{line}: " + (f"id {request_id!r}: " if request_id is not None else "")
        + error)
    errors_file.write({"line": line, "id": request_id, "error": error})

  try:
    writer = ResultWriter(output_path, critical)
    summary.torn_line_redone = writer.torn
    errors_file = ErrorsFile(errors_path, critical)
    for f in failed:
      fail(f.line, f.id, f.error)
    summary.skipped = sum(1 for j in lines if j.key in writer.done)

    # Tokenize once, check lengths before any device work, and find the shared segments. Lines
    # already done count too: a segment a remaining request shares only with them is still
    # computed alone, so a resumed job gives the results an uninterrupted one would.
    runnable, keys, segments, count = [], [], {}, {}
    for job in lines:
      try:
        prompt = engine.tokenize(job.request,
                                 (job.request.sampling or SamplingParams()).max_new_tokens)
      except (ValueError, TypeError) as e:
        if job.key not in writer.done:
          fail(job.line, job.id, str(e))
        continue
      ks = []
      for ids, cacheable in zip(prompt.segments, prompt.cacheable):
        if cacheable:
          k = segment_key(ids, prompt.namespace)  # salted: namespaces never share a segment
          segments.setdefault(k, (ids, prompt.namespace))
          ks.append(k)
      for k in set(ks):
        count[k] = count.get(k, 0) + 1
      if job.key not in writer.done:
        runnable.append(job)
        keys.append(ks)
    if disk is not None:
      # A segment only one request of the job has is never saved by the job: else a resumed (or
      # rerun) request would find its own segment on disk and answer unlike an uninterrupted
      # run. One already on disk (from `cache warm` or another job) is still read.
      disk.keep_off_disk |= {k for k, c in count.items() if c == 1}
    def cached(k):
      return engine.store.contains_segment(*segments[k]) or (disk is not None and k in disk)

    plan = plan_job(keys, batch_size, shared, policy.reads_segment_cache, cached, count)

    L = cfg.n_layers
    bar = _progress(len(runnable), progress)
    with _Signals(critical, say) as signals:
      for step in plan.steps:
        if signals.stop:
          break
        window = batch_size * WINDOW_BATCHES
        for i in range(0, len(step), window):
          if signals.stop:
            break
          chunk = [runnable[j] for j in step[i:i + window]]
          # The window's shared segments, computed alone first (checked now, not when planning:
          # one evicted since is computed again, identically).
          warm = [segments[k] for k in dict.fromkeys(k for j in step[i:i + window]
                                                     for k in keys[j])
                  if k in plan.warm and not cached(k)]
          if warm:
            for namespace in dict.fromkeys(ns for _, ns in warm):
              engine.cache_segments([ids for ids, ns in warm if ns == namespace],
                                    batch_size=batch_size, namespace=namespace)
            n = int(sum(len(ids) for ids, _ in warm))
            summary.n_precomputed += n
            summary.token_layers += n * L

          def finished(index, out, chunk=chunk):  # written as each request finishes
            job = chunk[index]
            if out.error is not None:
              fail(job.line, job.id, _cause(out.error))
            else:
              writer.write(result_record(job, out, reuse_record, decode, model_name))
              _account(summary, out, L)
            if bar is not None:
              bar.update(1)
              el = time.perf_counter() - start
              bar.set_postfix_str(f"{summary.n_generated / el:.1f} tok/s, "
                                  f"hit {summary.hit_rate:.0%}", refresh=False)

          engine.generate([j.request for j in chunk], reuse=reuse, on_error="return",
                          on_output=finished)
      summary.interrupted = bool(signals.stop)
  except KeyboardInterrupt:
    summary.interrupted = True
  finally:
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
    if errors_file is not None:
      errors_file.close()
    lock.release()
    if disk is not None:
      disk.keep_off_disk = keep_off_disk0
      summary.segments_loaded, summary.segments_saved = disk.loaded - loaded0, disk.saved - saved0
    summary.seconds = time.perf_counter() - start
  return summary


def _account(summary: Summary, out: RequestOutput, n_layers: int) -> None:
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
