"""Batch throughput on a GPU: static vs continuous batching on one job, and the decode step
against its byte floor. Random weights at real shapes (speed does not depend on their values).

1. The job: `--requests` requests, each a shared system prompt, `--passages-per-request` passages
   drawn from a corpus of `--passages` (precomputed alone with engine.cache_segments, as a RAG
   corpus would be, so every request reuses them), and a new question; output lengths uniform in
   [--min-new, --max-new] (seeded), no stop tokens. Run by static batching and by continuous
   batching on the same engine (static batching: sparsex_jax/research/baselines.py; caches
   cleared and the corpus recomputed before each, so both start alike), after a short warm-up job of the same shapes in each mode (compilations). Per
   mode: output tokens/s, job time, mean and p90 time to first token per request (from the job's
   start: queueing included), peak pool pages, programs compiled during the timed job.
2. The decode step: decode_loop (the engine's program) at batch x context (--micro-batches x
   --micro-contexts), device time per step against its byte floor (weights + K/V read once, at
   the HBM bandwidth measured in this run with a large device copy); the HLO's weight-sized
   buffers (a count > 0 means the layer loop copies weights out of the stacked params); and the
   engine's time per token (host visits included) at steps_per_visit 1 (a host visit per token, as
   before the device loop) and the default, against the device step.

  python scripts/bench_throughput.py --out $OUT/throughput.json          (GPU)
  python scripts/bench_throughput.py --smoke --out /tmp/t.json           (CPU, tiny shapes)
  python scripts/bench_throughput.py --report throughput.json --md docs/throughput.md
      (replaces what follows the results marker of docs/throughput.md; writes docs/throughput.png)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

import sparsex_jax as sx
from models.config import get_config
from sparsex_jax import scheduler
from sparsex_jax.entrypoints import compile_cache
from sparsex_jax.batching import RunningBatch
from sparsex_jax.programs.decode import decode_loop
# static batching and the other layer loops: comparison only
from sparsex_jax.research import baselines, profiling
from sparsex_jax.research.ttft import random_ids as _ids  # as the TTFT benchmark draws them


_OUT: list = []  # the --out path, for _save


def _save(results: dict) -> None:
  """Writes what was measured so far (a run cut short by a time limit keeps it)."""
  if _OUT:
    with open(_OUT[0], "w") as f:
      json.dump(results, f, indent=1)


def _sync(x):
  jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


# ------------------------------------------------------------------------------------------------
# 1. the job
# ------------------------------------------------------------------------------------------------

LENGTHS = ("uniform", "loguniform")


def output_length(rng, lo: int, hi: int, dist: str) -> int:
  """One request's output length in [lo, hi]: uniform, or log-uniform (each doubling of the
  length equally likely: most outputs short, a long tail, as chat and summary outputs are)."""
  if dist == "uniform":
    return int(rng.integers(lo, hi + 1))
  if dist == "loguniform":
    return int(min(hi, np.floor(np.exp(rng.uniform(np.log(lo), np.log(hi + 1))))))
  raise ValueError(f"--lengths must be one of {LENGTHS}, got {dist!r}")


def make_job(args, vocab: int, n: int, seed: int):
  rng = np.random.default_rng(seed)
  corpus_rng = np.random.default_rng(1)  # the same corpus for every job of the run
  system = _ids(corpus_rng, args.system_len, vocab)
  passages = [_ids(corpus_rng, args.passage_len, vocab) for _ in range(args.passages)]
  requests = []
  for i in range(n):
    picks = rng.choice(args.passages, size=args.passages_per_request, replace=False)
    n_new = output_length(rng, args.min_new, args.max_new, args.lengths)
    requests.append(sx.Request(
        [sx.Segment(system)] + [sx.Segment(passages[p]) for p in picks]
        + [sx.Segment(_ids(rng, args.question_len, vocab), cache=False)], id=i,
        sampling=sx.SamplingParams(max_new_tokens=n_new, ignore_eos=True, seed=i)))
  return requests, passages


class PhaseTimes:
  """Where a job's wall time goes: the prefills (admission: prefill and first token,
  `StepRunner.start`, which static batching runs too) and the device decode loops
  (`decoding.visit`, and `baselines.visit` for static batching), timed around the calls (each
  ends with a device-to-host copy, so the time includes the device work). The rest is host
  scheduling, leasing and output assembly."""

  def __init__(self, engine):
    from sparsex_jax import decoding, step_runner
    self.engine, self.modules, self.runner = engine, (decoding, baselines), step_runner.StepRunner
    self.totals = {"prefill": [0.0, 0, 0], "decode": [0.0, 0, 0]}  # seconds, calls, requests
    self.steps = self.tokens = self.row_steps = 0  # decode steps run, tokens they made, rows x steps

  def _visit(self, fn):
    """A visit (decoding.visit or baselines.visit), timed, with the steps it ran (the most tokens
    any row got in it: a running row gets one per step) and the tokens it made: the batch's
    occupancy step by step."""
    timed = self._wrap(fn, "decode", lambda pool, params, cfg, batch, **k: batch.n_running)

    def visit(pool, params, cfg, batch, **kw):
      before = batch.n_generated.copy()
      made = timed(pool, params, cfg, batch, **kw)
      steps = int((batch.n_generated - before).max(initial=0))
      self.steps += steps
      self.tokens += made
      self.row_steps += steps * batch.n_rows
      return made
    return visit

  def _wrap(self, fn, phase, count):
    def timed(*args, **kw):
      t0 = time.perf_counter()
      try:
        return fn(*args, **kw)
      finally:
        row = self.totals[phase]
        row[0] += time.perf_counter() - t0
        row[1] += 1
        row[2] += count(*args, **kw)
    return timed

  def __enter__(self):
    self.saved = [m.visit for m in self.modules] + [self.runner.start]
    self.runner.start = self._wrap(self.runner.start, "prefill",
                                   lambda runner, requests, *a, **k: len(requests))
    for m in self.modules:
      m.visit = self._visit(m.visit)
    return self

  def __exit__(self, *exc):
    *visits, self.runner.start = self.saved
    for m, visit in zip(self.modules, visits):
      m.visit = visit

  def report(self, job_s: float) -> dict:
    out = {}
    for phase, (sec, calls, reqs) in self.totals.items():
      out[f"{phase}_s"], out[f"{phase}_calls"] = sec, calls
      out[f"{phase}_rows_per_call"] = reqs / calls if calls else None
    out["host_other_s"] = job_s - sum(v[0] for v in self.totals.values())
    out["decode_steps"], out["decode_tokens"] = self.steps, self.tokens
    # rows busy at an average step / rows: the decode loops' true occupancy (rows that finish
    # inside a loop idle until it ends; the rows at a loop's start overstate it)
    out["occupancy"] = self.tokens / self.row_steps if self.row_steps else None
    return out


BATCHING = ("static", "continuous")


def generate(engine, requests, batching: str, **kw):
  """The engine's generate (continuous batching), or static batching (sparsex_jax/research/baselines.py)."""
  if batching not in BATCHING:
    raise ValueError(f"--batching must be among {BATCHING}, got {batching!r}")
  if batching == "static":
    return baselines.generate_static(engine, requests, **kw)
  return engine.generate(requests, **kw)


def run_job(engine, requests, passages, batching: str, reuse) -> dict:
  engine.clear_caches()
  engine.cache_segments(passages, batch_size=4)
  engine.store.allocator.reset_peak()
  compiled = engine.num_compilations
  # Host seconds spent tracing, lowering and compiling during the job: what a longer job, or a
  # second one, does not pay again.
  compile_time = compile_cache.stats()
  with PhaseTimes(engine) as phases:
    t0 = time.perf_counter()
    outs = generate(engine, requests, batching, reuse=reuse, on_error="return")
    seconds = time.perf_counter() - t0
  errors = [o.error for o in outs if o.error is not None]
  ttft = np.array([o.stats.first_token_s for o in outs if o.error is None])
  n_out = sum(len(o.token_ids) for o in outs)
  return {"batching": batching, "requests": len(requests), "errors": len(errors),
          "first_error": errors[0] if errors else None, "job_s": seconds,
          "output_tokens": n_out, "output_tokens_per_s": n_out / seconds,
          "prompt_tokens": int(sum(o.stats.n_prompt for o in outs)),
          "reused_tokens": int(sum(o.stats.n_reused for o in outs)),
          "ttft_mean_s": float(ttft.mean()) if ttft.size else None,
          "ttft_p90_s": float(np.percentile(ttft, 90)) if ttft.size else None,
          "peak_pages": engine.store.allocator.peak_used,
          "pool_pages": engine.store.allocator.capacity,
          "compilations_during_job": engine.num_compilations - compiled,
          "compile_s": compile_time.trace_s + compile_time.compile_s,
          "compiled_programs": compile_time.compiled,  # (name, backend compile s) in order
          "phases": phases.report(seconds)}


def bench_job(results: dict, args, cfg):
  params = _params(cfg, args.seed)
  engine = sx.Engine(cfg, params, page_size=args.page_size, num_pages=args.pool_pages,
                     kv_pool_bytes=int(args.pool_gib * 2**30), max_batch_size=args.rows,
                     steps_per_visit=args.steps_per_visit)
  reuse = sx.ReuseConfig(args.reuse)
  requests, passages = make_job(args, cfg.vocab_size, args.requests, seed=args.seed)
  # --warmup-requests 0: the warm-up is the timed job itself, so the timed run meets only shapes
  # already compiled (the scheduler's groups depend on token counts, not on time): steady state.
  warm = requests if args.warmup_requests == 0 else make_job(
      args, cfg.vocab_size, args.warmup_requests, seed=99)[0]
  results["job"] = {"preset": cfg.name, "dtype": cfg.dtype, "reuse": args.reuse,
                    "rows": args.rows, "steps_per_visit": args.steps_per_visit,
                    "refill_fraction": scheduler.REFILL_FRACTION,
                    "requests": args.requests, "new_tokens": [args.min_new, args.max_new],
                    "lengths": args.lengths,
                    "passages": args.passages, "passage_len": args.passage_len,
                    "passages_per_request": args.passages_per_request,
                    "system_len": args.system_len, "question_len": args.question_len,
                    "page_size": args.page_size, "pool_pages": engine.layout.num_pages,
                    "runs": []}
  runs = [(b, None) for b in args.batching]
  if args.refill_fractions and "continuous" in args.batching:
    runs = [r for r in runs if r[0] != "continuous"] + [
        ("continuous", float(f)) for f in args.refill_fractions.split(",")]
  default_refill = scheduler.REFILL_FRACTION
  for batching, refill in runs:
    scheduler.REFILL_FRACTION = default_refill if refill is None else refill
    t0 = time.perf_counter()
    first = run_job(engine, warm, passages, batching, reuse)
    warm_s = time.perf_counter() - t0
    row = run_job(engine, requests, passages, batching, reuse) | {
        "warmup_s": warm_s, "refill_fraction": scheduler.REFILL_FRACTION,
        "warmup": {k: first[k] for k in ("requests", "job_s", "output_tokens_per_s",
                                         "compilations_during_job", "compile_s",
                                         "compiled_programs")}}
    results["job"]["runs"].append(row)
    _save(results)
    print(f"job {batching:10s} (refill {scheduler.REFILL_FRACTION:.2f}): "
          f"{row['output_tokens_per_s']:8.1f} tok/s, {row['job_s']:6.1f} s, "
          f"ttft mean {row['ttft_mean_s']:.2f} s p90 {row['ttft_p90_s']:.2f} s, peak pages "
          f"{row['peak_pages']}/{row['pool_pages']}, compiled {row['compilations_during_job']} "
          f"({row['compile_s']:.1f} s; warm-up {warm_s:.0f} s), errors {row['errors']}",
          flush=True)
    ph = row["phases"]
    print(f"  phases: prefill {ph['prefill_s']:.1f} s in {ph['prefill_calls']} calls "
          f"({ph['prefill_rows_per_call'] or 0:.1f} requests each), decode {ph['decode_s']:.1f} s "
          f"in {ph['decode_calls']} calls ({ph['decode_steps']} steps, "
          f"{100 * (ph['occupancy'] or 0):.0f}% of rows busy), "
          f"other {ph['host_other_s']:.1f} s", flush=True)
  scheduler.REFILL_FRACTION = default_refill
  add_bounds(results["job"])
  _save(results)
  if args.profile_prefill:
    profile_prefill_group(results, args, cfg, engine, requests, passages, reuse)
  del engine


def measure_matmul_flops(dtype, n: int = 8192, repeats: int = 5) -> float:
  """Dense matmul rate (FLOP/s) of an n x n x n product in `dtype`."""
  return 2 * n ** 3 / best_time(jax.jit(lambda x: x @ x), jnp.ones((n, n), dtype), repeats)


def prefill_flops(cfg, outs, reading_layer: int) -> float:
  """The matmul FLOPs a prefill of these requests cannot avoid: every computed token (new or
  reused) through the layers below `reading_layer` (the full layers), and the new and selected
  tokens through the rest; projections and MLP only (attention over ~1K keys adds a few %)."""
  d, h = cfg.d_model, cfg.head_dim
  # ffn_params(active=True): a mixture of experts multiplies each token by its k experts only
  per_token_layer = 2 * (2 * d * cfg.n_heads * h + 2 * d * cfg.n_kv_heads * h
                         + cfg.ffn_params(active=True))
  total = 0.0
  for o in outs:
    st = o.stats
    full = st.n_new + st.n_reused  # exact (prefix-cache) tokens are not computed
    total += per_token_layer * (full * reading_layer
                                + (st.n_new + st.n_recomputed) * (cfg.n_layers - reading_layer))
    total += 2 * d * cfg.vocab_size  # the first token's logits
  return total


def profile_prefill_group(results: dict, args, cfg, engine, requests, passages, reuse) -> None:
  """One admission group of the job (`--profile-prefill` requests, prefill and first token):
  its time against the FLOP floor at the matmul rate measured here, and the GPU kernels that
  take its time (jax.profiler; scripts/profile_prefill.py reads the trace)."""
  n = args.profile_prefill
  group = [sx.Request(r.segments, id=r.id, sampling=sx.SamplingParams(
      max_new_tokens=1, ignore_eos=True, seed=i)) for i, r in enumerate(requests[:n])]
  engine.clear_caches()
  engine.cache_segments(passages, batch_size=4)
  run = lambda: baselines.generate_static(engine, group, reuse=reuse)  # noqa: E731
  run()  # compile
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    outs = run()
    times.append(time.perf_counter() - t0)
  wall_s = float(np.median(times))
  policy = reuse.resolve(cfg)
  flops = prefill_flops(cfg, outs, policy.layer_threshold)
  rate = measure_matmul_flops(cfg.jnp_dtype)
  trace_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "prefill_trace")
  with jax.profiler.trace(trace_dir):
    run()
  totals, example = profiling.kernel_times(trace_dir)
  kernel_ms = sum(totals.values()) / 1e3
  top = sorted(totals.items(), key=lambda kv: -kv[1])[:args.profile_top]
  results["prefill_profile"] = {
      "requests": n, "wall_ms": 1e3 * wall_s, "gpu_kernel_ms": kernel_ms,
      "flops": flops, "matmul_tflops": rate / 1e12, "floor_ms": 1e3 * flops / rate,
      "stats": [dataclasses.asdict(o.stats) for o in outs[:2]],
      "top_ms": [(name, us / 1e3, example[name].get("count")) for name, us in top]}
  _save(results)
  print(f"prefill of {n} job requests: {1e3 * wall_s:.1f} ms wall, {kernel_ms:.1f} ms of GPU "
        f"kernels, FLOP floor {1e3 * flops / rate:.1f} ms ({flops / 1e12:.1f} TFLOP at "
        f"{rate / 1e12:.0f} TFLOP/s measured)", flush=True)
  for name, us in top:
    print(f"  {us / 1e3:8.2f} ms {100 * us / 1e3 / kernel_ms:5.1f}%  {name[:100]}", flush=True)


def add_bounds(job: dict) -> None:
  """For each continuous run: its speedup over the static run, and two upper bounds on that
  speedup for any scheduler that, like these two, runs prefills and decode steps one after the
  other, from the phase times measured in this run:
  - every_row_busy: continuous decode with no row ever idle (its decode time scaled by its
    occupancy, the busy rows of an average step over all rows; a decode step costs about the same
    with a few rows idle, being dominated by the weight reads), and prefill as cheap as
    static's (large groups);
  - prefill_free: the same decode, and prefill hidden entirely (as mixed prefill-and-decode steps
    would try to)."""
  static = next((r for r in job["runs"] if r["batching"] == "static"), None)
  if static is None:
    return
  sp = static["phases"]
  static_s = sp["prefill_s"] + sp["decode_s"]
  for r in job["runs"]:
    if r["batching"] != "continuous":
      continue
    cp = r["phases"]
    decode_all_busy = cp["decode_s"] * (cp["occupancy"] or 0)
    r["speedup"] = r["output_tokens_per_s"] / static["output_tokens_per_s"]
    r["bound_every_row_busy"] = static_s / (sp["prefill_s"] + decode_all_busy)
    r["bound_prefill_free"] = static_s / decode_all_busy if decode_all_busy else None
    print(f"continuous (refill {r['refill_fraction']:.2f}): {r['speedup']:.2f}x static; bounds "
          f"{r['bound_every_row_busy']:.2f}x (every row busy), {r['bound_prefill_free'] or 0:.2f}x "
          f"(prefill free)", flush=True)


_PARAMS: dict = {}


def _params(cfg, seed):
  """Random weights, made once per run (both parts share them)."""
  from models import llama
  if cfg not in _PARAMS:
    _PARAMS[cfg] = llama.init_params(cfg, seed)
  return _PARAMS[cfg]


# ------------------------------------------------------------------------------------------------
# 2. the decode step
# ------------------------------------------------------------------------------------------------

def measure_bandwidth(n_bytes: int, repeats: int = 5) -> float:
  """HBM bandwidth (bytes/s) of a large device copy: each element read once and written once."""
  x = jnp.ones((int(n_bytes) // 4,), jnp.float32)
  return 2 * x.nbytes / best_time(jax.jit(lambda a: a * 2.0), x, repeats)


def best_time(fn, x, repeats: int) -> float:
  """The fastest of `repeats` runs of fn(x), after one that compiles (seconds)."""
  _sync(fn(x))
  best = np.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    _sync(fn(x))
    best = min(best, time.perf_counter() - t0)
  return best


def weight_sized_buffers(hlo: str, cfg) -> int:
  """Instructions of the compiled program whose output has a layer weight's shape and that are
  not parameters or views: weights copied out of the stacked params (0 when read in place)."""
  d, f, n, k, h = cfg.d_model, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  g = n // k  # wqkv [D, K, G + 2, H], w_gate_up [D, 2, F] (models/llama.py)
  shapes = {f"{f},{d}", f"{n},{h},{d}", f"{n * h},{d}", f"{d},{k},{g + 2},{h}",
            f"{d},{k * (g + 2) * h}", f"{d},{2},{f}", f"{d},{2 * f}"}  # (and as XLA reshapes them)
  count = 0
  for line in hlo.splitlines():
    m = re.match(r"\s*(ROOT )?%?[\w.-]+ = \w+\[([\d,]+)\]\S* (\S+?)\(", line)
    if m and m.group(2) in shapes and m.group(3) not in (
        "parameter", "get-tuple-element", "bitcast", "tuple", "constant"):
      count += 1
  return count


_PER_LAYER: dict = {}


def per_layer_params(params):
  """baselines.per_layer_params (a one-time copy of the layer weights, kept for the run)."""
  if "params" not in _PER_LAYER:
    _PER_LAYER["params"] = baselines.per_layer_params(params)
  return _PER_LAYER["params"]


def decode_rows(layout, batch: int, context: int, steps: int, pool_pages: int):
  """DecodeRows of `batch` rows at `context` tokens each; rows share pool pages only when the
  pool is smaller than batch x context (each layer still reads far more than the L2 holds)."""
  max_pages = -(-(context + steps + 1) // layout.page_size)
  rb = RunningBatch(batch, max_pages, 1, layout)
  pages = 1 + np.arange(batch * max_pages) % (pool_pages - 1)
  rb.page_table[:] = pages.reshape(batch, max_pages)
  rb.positions[:] = context
  rb.n_generated[:] = 1
  rb.max_new_tokens[:] = 10**6
  rb.done[:] = False
  return rb.device_rows()


def bench_decode_step(results: dict, args, cfg):
  params = _params(cfg, args.seed)
  bandwidth = measure_bandwidth(args.copy_gib * 2**30)
  results["bandwidth_gb_s"] = bandwidth / 1e9
  print(f"measured HBM bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
  weight_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(params["layers"]))
  weight_bytes += int(params["final_norm"].nbytes) + int(
      params["lm_head"].nbytes if "lm_head" in params else params["embed"].nbytes)
  steps = args.micro_steps
  engine = sx.Engine(cfg, params, page_size=args.page_size,
                     kv_pool_bytes=int(args.micro_pool_gib * 2**30))
  layout = engine.layout
  per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(cfg.jnp_dtype).itemsize
  results["decode_step"] = []
  for loop in args.layer_loops:
    for batch in args.micro_batches:
      for context in args.micro_contexts:
        if loop != "scan" and (batch, context) != (args.micro_batches[0], args.micro_contexts[0]):
          continue  # the other layer loop once, at the first shape (its compile is long)
        rows = decode_rows(layout, batch, context, steps, layout.num_pages)
        step_params, program_loop = params, loop
        if loop == "per_layer":  # layers as separate arrays: nothing to slice (a weight copy)
          step_params, program_loop = per_layer_params(params), "scan"
        t0 = time.perf_counter()
        compiled = decode_loop.lower(engine.pool, step_params, rows, np.int32(1), cfg=cfg,
                                     steps=steps, layer_loop=program_loop).compile()
        compile_s = time.perf_counter() - t0
        copies = weight_sized_buffers(compiled.as_text(), cfg)

        def decode_loop_compiled(pool, *a, compiled=compiled):  # the executable compiled above
          return compiled(pool, *a)

        times = []
        for _ in range(args.micro_repeats + 1):
          t0 = time.perf_counter()
          _sync(engine.kv.run(decode_loop_compiled, step_params, rows, np.int32(1)))
          times.append(time.perf_counter() - t0)
        step_s = float(np.median(times[1:])) / steps
        kv_bytes = batch * (context + steps / 2) * per_token
        floor_s = (weight_bytes + kv_bytes) / bandwidth
        row = {"layer_loop": loop, "batch": batch, "context": context, "steps": steps,
               "step_ms": 1e3 * step_s, "floor_ms": 1e3 * floor_s,
               "weight_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9,
               "of_floor": floor_s / step_s, "weight_sized_buffers": copies,
               "compile_s": compile_s}
        results["decode_step"].append(row)
        _save(results)
        print(f"decode_loop[{loop}] batch {batch:3d} x {context:5d}: {row['step_ms']:7.2f} ms/step,"
              f" floor {row['floor_ms']:6.2f} ms ({100 * row['of_floor']:.0f}% of it), weight-"
              f"sized buffers {copies}, compile {compile_s:.0f} s", flush=True)

  if args.skip_engine_decode:
    return
  # The engine end to end: per-token time with host visits, against the device step.
  batch, context = args.micro_batches[0], args.micro_contexts[0]
  rng = np.random.default_rng(2)
  reqs = [sx.Request([sx.Segment(_ids(rng, context, cfg.vocab_size), cache=False)])
          for _ in range(batch)]
  sp = sx.SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
  results["engine_decode"] = []
  for spv in sorted({1, args.steps_per_visit}):
    engine.clear_caches()
    engine.steps_per_visit = spv
    engine.max_batch_size = batch
    engine.generate(reqs, sp, reuse=sx.ReuseConfig("full"))  # compile
    t0 = time.perf_counter()
    outs = engine.generate(reqs, sp, reuse=sx.ReuseConfig("full"))
    wall = time.perf_counter() - t0
    token_s = (wall - max(o.stats.first_token_s for o in outs)) / steps
    device = next((r["step_ms"] for r in results["decode_step"]
                   if (r["layer_loop"], r["batch"], r["context"]) == ("scan", batch, context)),
                  None)
    row = {"steps_per_visit": spv, "batch": batch, "context": context,
           "token_ms": 1e3 * token_s, "device_step_ms": device}
    results["engine_decode"].append(row)
    _save(results)
    print(f"engine steps_per_visit {spv:3d}, batch {batch} x {context}: {row['token_ms']:.2f} "
          f"ms/token (device step {device} ms)", flush=True)


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

RESULTS_MARKER = "<!-- results: written by scripts/bench_throughput.py --report -->"


def _job_lines(job: dict) -> list[str]:
  lengths = job.get("lengths", "uniform")
  lines = [f"Job: {job['requests']} requests ({job['preset']}, {job['dtype']}), system "
           f"{job['system_len']} + {job['passages_per_request']} of {job['passages']} passages x "
           f"{job['passage_len']} + question {job['question_len']} tokens, output "
           f"{job['new_tokens'][0]}..{job['new_tokens'][1]} tokens ({lengths}), reuse "
           f"{job['reuse']}, {job['rows']} rows, {job['steps_per_visit']} steps per visit, pool "
           f"{job['pool_pages']} pages of {job['page_size']}.", "",
           "| batching | output tok/s | x static | bound: every row busy | bound: prefill free | "
           "job (s) | prefill (s) | decode (s) | busy rows | TTFT mean (s) | TTFT p90 (s) | "
           "peak pages | compiled in job | errors | first run of the job: tok/s (compiling) |",
           "|" + " --- |" * 15]
  names = [r["batching"] for r in job["runs"]]
  for r in job["runs"]:
    name = r["batching"]
    if names.count(name) > 1:
      name += f", refill {r.get('refill_fraction', 0):g}"
    ph = r.get("phases", {})
    fmt = lambda v, f="{:.2f}x": "-" if v is None else f.format(v)  # noqa: E731
    lines.append(
        f"| {name} | {r['output_tokens_per_s']:.0f} | {fmt(r.get('speedup'))} | "
        f"{fmt(r.get('bound_every_row_busy'))} | {fmt(r.get('bound_prefill_free'))} | "
        f"{r['job_s']:.1f} | {fmt(ph.get('prefill_s'), '{:.1f}')} | "
        f"{fmt(ph.get('decode_s'), '{:.1f}')} | "
        f"{busy(ph, job['rows'])} | "
        f"{r['ttft_mean_s']:.2f} | {r['ttft_p90_s']:.2f} | {r['peak_pages']} / "
        f"{r['pool_pages']} | {r['compilations_during_job']}"
        + (f" ({r['compile_s']:.1f} s)" if "compile_s" in r else "") + f" | {r['errors']} | "
        + cold(r.get("warmup")) + " |")
  return lines


def busy(phases: dict, rows: int) -> str:
  """Busy rows of an average decode step (older runs: rows running at a loop's start)."""
  if phases.get("occupancy") is not None:
    return f"{phases['occupancy'] * rows:.1f} / {rows}"
  if phases.get("decode_rows_per_call") is not None:
    return f"{phases['decode_rows_per_call']:.1f} / {rows} (at loop starts)"
  return "-"


def cold(warmup: dict | None) -> str:
  """The warm-up run, when it was the job itself (--warmup-requests 0): what a fresh process
  gets from this job, compilations included."""
  if not warmup:
    return "-"
  return (f"{warmup['output_tokens_per_s']:.0f} ({warmup['compilations_during_job']} programs, "
          f"{warmup['compile_s']:.0f} s)")


def report(json_path: str, md_path: str):
  """Renders runs' JSON as a markdown table (md_path) and a PNG beside it. json_path may name
  several files (comma-separated): the first gives the header and the decode step, each gives its
  job (for instance one per --lengths)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  files = []
  for path in json_path.split(","):
    with open(path) as f:
      files.append(json.load(f))
  res = files[0]
  commands = [f"`{r['command']}`" for r in files]
  lines = [f"{res['device']}, jax {res['jax']}, {res['date']}. "
           f"Command{'s' if len(files) > 1 else ''}: {', '.join(commands)}", ""]
  jobs = [r["job"] for r in files if r.get("job")]
  job = jobs[0] if jobs else None
  for j in jobs:
    lines += _job_lines(j) + [""]
  if lines[-1] == "":
    lines.pop()
  for r in files:
    prof = r.get("prefill_profile")
    if prof:
      lines += ["", f"The prefill of {prof['requests']} of the job's requests (one admission "
                f"group, prefill and first token): {prof['wall_ms']:.1f} ms wall, "
                f"{prof['gpu_kernel_ms']:.1f} ms of GPU kernels, against a FLOP floor of "
                f"{prof['floor_ms']:.1f} ms ({prof['flops'] / 1e12:.1f} TFLOP of projections and "
                f"MLP at the {prof['matmul_tflops']:.0f} TFLOP/s of a large matmul measured in "
                f"the same run). Kernels by time:", "", "| kernel | ms | share | calls |",
                "| --- | --- | --- | --- |"]
      for name, ms, count in prof["top_ms"][:10]:
        lines.append(f"| `{name[:70]}` | {ms:.2f} | {100 * ms / prof['gpu_kernel_ms']:.0f}% | "
                     f"{count} |")
  if res.get("decode_step"):
    lines += ["", f"Decode step (decode_loop, device time per step) against its byte floor "
              f"(weights + K/V read once at the measured {res['bandwidth_gb_s']:.0f} GB/s):", "",
              "| layer loop | batch | context | step (ms) | floor (ms) | % of floor | weights GB | "
              "K/V GB | weight-sized buffers |", "|" + " --- |" * 9]
    for r in res["decode_step"]:
      lines.append(f"| {r['layer_loop']} | {r['batch']} | {r['context']} | {r['step_ms']:.2f} | "
                   f"{r['floor_ms']:.2f} | {100 * r['of_floor']:.0f}% | {r['weight_gb']:.1f} | "
                   f"{r['kv_gb']:.1f} | {r['weight_sized_buffers']} |")
  if res.get("engine_decode"):
    lines += ["", "| engine steps per visit | batch | context | ms per token (host incl.) | "
              "device step (ms) |", "| --- | --- | --- | --- | --- |"]
    for r in res["engine_decode"]:
      dev = f"{r['device_step_ms']:.2f}" if r["device_step_ms"] is not None else "-"
      lines.append(f"| {r['steps_per_visit']} | {r['batch']} | {r['context']} | "
                   f"{r['token_ms']:.2f} | {dev} |")
  for err in res.get("errors", []):
    last = err.strip().splitlines()[-1]
    lines += ["", f"A part of this run failed (the rest ran): `{last}`"]
  # A page with the marker keeps what is above it (the prose); the results replace the rest.
  head = ""
  if os.path.exists(md_path):
    with open(md_path) as f:
      text = f.read()
    if RESULTS_MARKER in text:
      head = text[:text.index(RESULTS_MARKER) + len(RESULTS_MARKER)] + "\n\n"
  with open(md_path, "w") as f:
    f.write(head + "\n".join(lines) + "\n")
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  if jobs:
    labels, values, colors = [], [], []
    for j in jobs:
      names = [r["batching"] for r in j["runs"]]
      for r in j["runs"]:
        name = r["batching"]
        if names.count(name) > 1:  # runs of one batching differ by refill fraction
          name += f" {r.get('refill_fraction', 0):g}"
        labels.append(f"{name}\n{j.get('lengths', 'uniform')}" if len(jobs) > 1 else name)
        values.append(r["output_tokens_per_s"])
        colors.append("C0" if r["batching"] == "static" else "C1")
    axes[0].bar(np.arange(len(values)), values, color=colors)
    axes[0].set_xticks(np.arange(len(values)), labels, fontsize=7)
    axes[0].set_ylabel("output tokens / s")
    axes[0].set_title(f"{job['requests']} requests, {job['preset']}, {job['rows']} rows",
                      fontsize=9)
  if res.get("decode_step"):
    rows = [r for r in res["decode_step"] if r["layer_loop"] == "scan"]
    labels = [f"{r['batch']}x{r['context'] // 1024}K" for r in rows]
    x = np.arange(len(rows))
    axes[1].bar(x - 0.2, [r["step_ms"] for r in rows], 0.4, label="measured")
    axes[1].bar(x + 0.2, [r["floor_ms"] for r in rows], 0.4, label="byte floor (copy bandwidth)")
    axes[1].set_xticks(x, labels)
    axes[1].set_ylabel("ms per decode step")
    axes[1].legend(fontsize=8)
  elif jobs:  # no decode-step sweep in this run: where each job's time went instead
    runs = [r for j in jobs for r in j["runs"]]
    x = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for key, label in (("prefill_s", "prefill"), ("decode_s", "decode loops"),
                       ("host_other_s", "host, other")):
      v = np.array([r["phases"][key] for r in runs])
      axes[1].bar(x, v, bottom=bottom, label=label)
      bottom += v
    axes[1].set_xticks(x, labels, fontsize=7)
    axes[1].set_ylabel("job time (s)")
    axes[1].legend(fontsize=8)
  fig.suptitle(res["device"], fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.splitext(md_path)[0] + ".png", dpi=120)
  print("\n".join(lines))


# ------------------------------------------------------------------------------------------------

def _ints(s):
  return [int(x) for x in s.split(",") if x]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "throughput.json"))
  ap.add_argument("--report", metavar="JSON", help="render JSON as --md (and a PNG); no device")
  ap.add_argument("--md", default="docs/throughput.md")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes, float32: a CPU check")
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--skip-job", action="store_true")
  ap.add_argument("--skip-micro", action="store_true")
  job = ap.add_argument_group("the job")
  job.add_argument("--requests", type=int, default=1000)
  job.add_argument("--warmup-requests", type=int, default=96,
                   help="0: warm up with the timed job itself (the timed run compiles nothing)")
  job.add_argument("--min-new", type=int, default=16)
  job.add_argument("--max-new", type=int, default=256,
                   help="longest output; lower it to shorten the run")
  job.add_argument("--lengths", choices=LENGTHS, default="uniform",
                   help="distribution of output lengths in [--min-new, --max-new]")
  job.add_argument("--passages", type=int, default=32)
  job.add_argument("--passage-len", type=int, default=512)
  job.add_argument("--passages-per-request", type=int, default=2)
  job.add_argument("--system-len", type=int, default=128)
  job.add_argument("--question-len", type=int, default=32)
  job.add_argument("--rows", type=int, default=64, help="max_batch_size (rows of either batching)")
  job.add_argument("--refill-fractions", default=None,
                   help="continuous batching: run it once per value of scheduler.REFILL_FRACTION "
                        "(comma-separated; default: the scheduler's)")
  job.add_argument("--steps-per-visit", type=int, default=32)
  job.add_argument("--page-size", type=int, default=16)
  job.add_argument("--pool-gib", type=float, default=16.0)
  job.add_argument("--pool-pages", type=int, default=None, help="overrides --pool-gib")
  job.add_argument("--reuse", default="sparsex")
  job.add_argument("--batching", type=lambda s: s.split(","), default=["static", "continuous"])
  job.add_argument("--profile-prefill", type=int, default=0, metavar="N",
                   help="after the job: profile the prefill of its first N requests (GPU)")
  job.add_argument("--profile-top", type=int, default=15)
  micro = ap.add_argument_group("the decode step")
  micro.add_argument("--micro-batches", type=_ints, default=[16, 32, 64])
  micro.add_argument("--micro-contexts", type=_ints, default=[4096, 8192])
  micro.add_argument("--micro-steps", type=int, default=32)
  micro.add_argument("--micro-repeats", type=int, default=3)
  micro.add_argument("--micro-pool-gib", type=float, default=16.0,
                     help="K/V pool of the step benchmark (rows share pages beyond it)")
  micro.add_argument("--copy-gib", type=float, default=4.0, help="bandwidth probe size")
  micro.add_argument("--skip-engine-decode", action="store_true",
                     help="the device step only, not the engine's time per token beside it")
  micro.add_argument("--layer-loops", type=lambda s: s.split(","),
                     default=["scan", "unrolled", "per_layer"],
                     help="scan: lax.scan over the stacked layers (the engine's); unrolled: a\n"
                          "Python loop over static slices of the stack; per_layer: layers as\n"
                          "separate arrays (a second copy of the weights, this run only)")
  args = ap.parse_args(argv)
  if args.report:
    report(args.report, args.md)
    return
  dtype = "bfloat16"
  if args.smoke:  # tiny everything; float32 (bfloat16 is emulated on CPU)
    args.preset, dtype = "tiny", "float32"
    args.requests, args.warmup_requests = min(args.requests, 24), min(args.warmup_requests, 6)
    args.min_new, args.max_new = min(args.min_new, 2), min(args.max_new, 9)
    args.passages, args.passage_len, args.system_len, args.question_len = 6, 12, 8, 4
    args.rows, args.steps_per_visit, args.pool_pages = min(args.rows, 4), 4, 160
    args.micro_batches, args.micro_contexts, args.micro_steps = [2, 4], [64], 4
    args.micro_repeats, args.micro_pool_gib, args.copy_gib = 1, 0.002, 0.01
  cfg = get_config(args.preset, dtype=dtype)
  results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
             "date": time.strftime("%Y-%m-%d"),
             "command": "python scripts/bench_throughput.py "
                        + " ".join(sys.argv[1:] if argv is None else argv),
             "errors": []}
  parts = [] if args.skip_job else [lambda: bench_job(results, args, cfg)]
  if not args.skip_micro:
    parts.append(lambda: bench_decode_step(results, args, cfg))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  _OUT[:] = [args.out]
  for part in parts:
    try:
      part()
    except Exception:  # keep what was measured; report the failure
      results["errors"].append(traceback.format_exc())
      print(traceback.format_exc(), flush=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
