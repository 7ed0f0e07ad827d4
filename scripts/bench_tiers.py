"""TTFT with the reused segments in each KV tier: the GPU pool, the host-memory tier, the disk cache,
beside full prefill, in one run; and the bytes each host-tier request moves against (L - T) / L of
the segments' K/V (docs/TIERS.md).

A RAG request at each context: a new head, passages of --segment-tokens (cached alone at position
0), a new question (heads and questions are not cached: every request differs only there). For
each context and method:

  dense        the anchor: a plain jitted prefill of the same number of tokens, cuDNN attention
               on a GPU, no pages (sparsex_jax.research.ttft.dense_prefill).
  full         ReuseConfig("full"): every token computed, no cache read.
  pool         the passages in the pool (the segment cache).
  host         the passages in the host tier before every request (evicted there first, untimed);
               the request copies layers [T, L) of them into pool pages while the prefill's
               full layers run (the prefill in two halves, the copies' writes between them).
  host-serial  the same with every copy written before the prefill's first half (round 12's
               order): what the overlap with the full layers saves.
  host-inputs-after
               the same with the prefill's inputs copied to the device after the loads' copies
               (round 16's order, patched here only): what sending them first saves.
  host-int8    the same with --host-cache-dtype int8 (8-bit values + per-row scales move).
  disk         the passages only in the cache dir (evicted from the pool and no host tier): the
               request reads, verifies and writes them whole before its prefill.

TTFT is the wall time of Engine.prefill_logits (tokenize, loads, planning, the prefill program,
the commit, the logits on the host), median of --runs after a warm-up request (compiles).

  python scripts/bench_tiers.py --out $OUT                              (llama3-8b, 8K and 32K)
  python scripts/bench_tiers.py --out $OUT --contexts 8192 16384 32768 --runs 5
  python scripts/bench_tiers.py --smoke --out /tmp/tiers               (CPU self-check: tiny)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

import sparsex_jax as sx
from models import llama
from models.config import get_config
from sparsex_jax.research.ttft import time_dense

SCENARIOS = ("dense", "full", "pool", "host", "host-serial", "host-inputs-after", "host-int8",
             "disk")
HOST_SCENARIOS = (("host", "native"), ("host-serial", "native"), ("host-inputs-after", "native"),
                  ("host-int8", "int8"))


def _ids(n, rng, vocab):
  return [int(i) for i in rng.integers(3, vocab, size=n)]


def _passages(cfg, context, segment_tokens, seed=0):
  rng = np.random.default_rng(seed)
  n = max(1, (context - 96) // segment_tokens)
  return [_ids(segment_tokens, rng, cfg.vocab_size) for _ in range(n)]


def _request(cfg, passages, run):
  """A fresh head and question (not cached) around the cached passages."""
  rng = np.random.default_rng(10_000 + run)
  return sx.Request([sx.Segment(_ids(64, rng, cfg.vocab_size), cache=False)]
                    + [sx.Segment(p) for p in passages]
                    + [sx.Segment(_ids(32, rng, cfg.vocab_size), cache=False)])


def _engine(cfg, params, context, n_passages, segment_tokens, **kw):
  # Room for the request and every passage cached beside it, twice over (a pool that never
  # evicts on its own: the scenario decides where the passages are).
  page = 16
  pages = 2 * (context + n_passages * (segment_tokens + page)) // page + 64
  return sx.Engine(cfg, params, None, page_size=page, num_pages=pages, **kw)


def _evict_to_host(engine) -> None:
  """Every segment down to the host tier, its copies there complete (on a GPU they are read
  into pinned host memory without waiting): the request is timed from segments in the tier."""
  engine.store.segment_cache.evict(1 << 40)
  tier = engine.host_tier
  jax.block_until_ready([x for key in tier.keys()
                         for x in tier.get(key).k.values + tier.get(key).v.values])


def _time(engine, cfg, passages, reuse, runs, before=None):
  """Median and all TTFTs (ms) over `runs` requests after one warm-up; host-tier bytes per run."""
  times, moved, all_layers = [], [], []
  for run in range(runs + 1):
    # Every request from the same state: the previous one's prompt is not left in the exact or
    # continuation cache (round 17: the pool filled after two requests, and later ones paid for
    # evicting them, 62 -> 81 ms over five runs at 8K).
    engine.store.continuation_cache.clear()
    engine.store.prefix_cache.clear()
    if before is not None:
      before()
    tier = engine.host_tier
    b0 = (tier.bytes_moved, tier.bytes_all_layers) if tier is not None else (0, 0)
    t0 = time.perf_counter()
    engine.prefill_logits(_request(cfg, passages, run), reuse)
    dt = time.perf_counter() - t0
    if run == 0:
      clock0 = tier.load_times(wait=True) if tier is not None else None
      continue  # warm-up: compiles
    times.append(dt * 1e3)
    if tier is not None:
      moved.append(tier.bytes_moved - b0[0])
      all_layers.append(tier.bytes_all_layers - b0[1])
  out = {"ttft_ms": statistics.median(times), "runs_ms": [round(t, 3) for t in times]}
  if tier is not None:  # the copies' time in flight per timed request, and the part exposed
    clock = tier.load_times(wait=True)
    n = clock["loads_timed"] - clock0["loads_timed"]
    if n:
      out["copy_ms_per_request"] = 1e3 * (clock["load_copy_s"] - clock0["load_copy_s"]) / n
      out["exposed_ms_per_request"] = 1e3 * (clock["load_exposed_s"]
                                             - clock0["load_exposed_s"]) / n
  if moved:
    out["bytes_moved"] = int(statistics.median(moved))
    out["bytes_all_layers"] = int(statistics.median(all_layers))
  return out


@contextlib.contextmanager
def _serial_loads(engine):
  """The host-serial scenario: each load is started and written at once, before the planning and
  the prefill's first half, so nothing overlaps the copies (an ablation in this script only)."""
  from sparsex_jax import step_runner
  from sparsex_jax.kv.host_tier import finish_loads
  start = step_runner.start_loads
  step_runner.start_loads = finish_loads
  try:
    yield
  finally:
    step_runner.start_loads = start


@contextlib.contextmanager
def _inputs_after_loads():
  """The host-inputs-after scenario: the prefill's batch stays numpy, so jit copies it to the
  device when the first half is dispatched, behind the loads' copies (round 16's order)."""
  from sparsex_jax import step_runner
  ahead = step_runner.inputs_ahead_of_loads
  step_runner.inputs_ahead_of_loads = lambda batch: batch
  try:
    yield
  finally:
    step_runner.inputs_ahead_of_loads = ahead


def _ordering(name, engine):
  if name == "host-serial":
    return _serial_loads(engine)
  if name == "host-inputs-after":
    return _inputs_after_loads()
  return contextlib.nullcontext()


def bench_context(cfg, params, context, args, reuse, cache_root):
  passages = _passages(cfg, context, args.segment_tokens)
  policy = reuse.resolve(cfg)
  row = {"context": context, "n_passages": len(passages), "segment_tokens": args.segment_tokens,
         "layer_threshold": policy.layer_threshold, "n_layers": cfg.n_layers}
  mk = lambda **kw: _engine(cfg, params, context, len(passages), args.segment_tokens, **kw)

  eng = mk()
  if "dense" in args.scenarios:
    n_prompt = sum(len(s.content) for s in _request(cfg, passages, 0).segments)
    times, _ = time_dense(eng, n_prompt, args.runs, np.random.default_rng(7))
    row["dense"] = {"ttft_ms": 1e3 * statistics.median(times),
                    "runs_ms": [round(1e3 * t, 3) for t in times]}
  row["full"] = _time(eng, cfg, passages, sx.ReuseConfig("full"), args.runs)
  eng.cache_segments(passages, batch_size=args.batch_size)
  row["pool"] = _time(eng, cfg, passages, reuse, args.runs)
  del eng
  gc.collect()

  for name, dtype in HOST_SCENARIOS:
    if name not in args.scenarios:
      continue
    eng = mk(host_cache_bytes=args.host_bytes, host_cache_dtype=dtype)
    # The engine cuts host copies at its default threshold; cut them at the one measured (the
    # smoke run's T = 2, or --threshold), so that a load stages layers [T, L) alone.
    eng.host_tier.split_layer = policy.layer_threshold
    eng.cache_segments(passages, batch_size=args.batch_size)
    evict = lambda e=eng: _evict_to_host(e)  # noqa: E731
    with _ordering(name, eng):
      row[name] = _time(eng, cfg, passages, reuse, args.runs, before=evict)
    row[name]["tier_stats"] = eng.stats()["host_tier"]
    row[name]["programs"] = sorted(eng.kv.log.programs())
    del eng, evict  # the closure held the engine (and its pool) alive: 32K ran out of memory
    gc.collect()

  if "disk" in args.scenarios:
    eng = mk()
    eng.use_cache_dir(os.path.join(cache_root, f"ctx{context}"))
    eng.cache_segments(passages, batch_size=args.batch_size)
    evict = lambda e=eng: e.store.segment_cache.evict(1 << 40)  # noqa: E731
    row["disk"] = _time(eng, cfg, passages, reuse, args.runs, before=evict)
    del eng, evict
    gc.collect()

  ratio = (cfg.n_layers - policy.layer_threshold) / cfg.n_layers
  row["expected_moved_fraction"] = ratio
  for name, _ in HOST_SCENARIOS:
    if name in row and row[name].get("bytes_all_layers"):
      row[name]["moved_fraction"] = row[name]["bytes_moved"] / row[name]["bytes_all_layers"]
  for name in [name for name, _ in HOST_SCENARIOS] + ["disk"]:
    if name in row:
      row[name]["vs_pool"] = row[name]["ttft_ms"] / row["pool"]["ttft_ms"]
  return row


def plot(result: dict, path: str) -> None:
  """TTFT per scenario against the context (one line each), the pool and full prefill marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = result["rows"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in SCENARIOS:
    pts = [(r["context"], r[name]["ttft_ms"]) for r in rows if name in r]
    if pts:
      ax.plot(*zip(*pts), marker="o", label=name)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("prompt tokens")
  ax.set_ylabel("TTFT (ms)")
  ax.set_title(f"sparsex TTFT by where the reused segments are ({result['preset']})", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True, help="output folder (tiers.json)")
  p.add_argument("--preset", default="llama3-8b")
  p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
  p.add_argument("--segment-tokens", type=int, default=512)
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--threshold", type=int, default=None, help="sparsex T (default: its own)")
  p.add_argument("--ratio", type=float, default=None, help="sparsex r (default: its own)")
  p.add_argument("--host-bytes", type=int, default=None,
                 help="host tier budget (default: 64 GiB, 64 MiB with --smoke)")
  p.add_argument("--batch-size", type=int, default=8, help="passages per caching prefill")
  p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
  p.add_argument("--smoke", action="store_true", help="CPU self-check: tiny model, short contexts")
  p.add_argument("--plot-only", metavar="JSON", help="draw OUT/tiers.png from an earlier tiers.json")
  args = p.parse_args(argv)
  if args.plot_only:
    with open(args.plot_only) as f:
      result = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    plot(result, os.path.join(args.out, "tiers.png"))
    return 0
  if args.smoke:
    cfg = get_config("tiny", dtype="float32").replace(n_layers=5)
    args.contexts = [c for c in args.contexts if c <= 512] or [256]
    args.segment_tokens = min(args.segment_tokens, 64)
    args.runs = min(args.runs, 2)
    args.host_bytes = args.host_bytes or 64 << 20
  else:
    cfg = get_config(args.preset, dtype="bfloat16")
    args.host_bytes = args.host_bytes or 64 << 30
  if cfg.max_seq_len < max(args.contexts) + 256:  # random weights: any length runs
    cfg = cfg.replace(max_seq_len=max(args.contexts) + 256)
  fields = {k: v for k, v in (("layer_threshold", args.threshold), ("recompute_ratio", args.ratio))
            if v is not None}
  if args.smoke and "layer_threshold" not in fields:
    fields["layer_threshold"] = 2
  reuse = sx.ReuseConfig("sparsex", **fields)
  params = llama.init_params(cfg, 0)
  os.makedirs(args.out, exist_ok=True)
  result = {"device": str(jax.devices()[0]), "backend": jax.default_backend(),
            "jax": jax.__version__, "preset": cfg.name, "dtype": cfg.dtype,
            "reuse": repr(reuse), "command": " ".join(sys.argv), "rows": []}
  with tempfile.TemporaryDirectory() as cache_root:
    for context in args.contexts:
      row = bench_context(cfg, params, context, args, reuse, cache_root)
      result["rows"].append(row)
      summary = "  ".join(f"{s} {row[s]['ttft_ms']:.1f} ms" for s in SCENARIOS if s in row)
      host = row.get("host", {})
      moved = host.get("moved_fraction")
      copy = ""
      if "copy_ms_per_request" in host:
        copy = (f"; copy {host['copy_ms_per_request']:.1f} ms a request, "
                f"{host['exposed_ms_per_request']:.1f} ms exposed")
      print(f"{context}: {summary}; host moved {moved} of the K/V "
            f"(expected {row['expected_moved_fraction']:.3f}){copy}", file=sys.stderr)
      path = os.path.join(args.out, "tiers.json")
      with open(path, "w") as f:  # after every context: a run cut short keeps what it measured
        json.dump(result, f, indent=1)
  plot(result, os.path.join(args.out, "tiers.png"))
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
