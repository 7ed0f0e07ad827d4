"""Time to first token by method, context and workload, on a GPU, with random weights at real shapes.

Every method runs through the engine (`Engine.prefill_logits`) on the same requests, side by side,
with the plain dense prefill (one jitted lax.scan over the layers, cuDNN flash attention, no pages,
no caches) timed in the same run as the anchor: speed-ups are against it and against the engine's
own full prefill.

Workloads: rag, chat and agent (sparsex_jax/research/ttft.py says what each holds).

Timing: each (workload, context, method) is compiled by a warm-up request, then timed over --runs
requests (median and p90). `ttft` is the wall time of prefill_logits (tokenize, cache lookups,
planning, the device program, the commit, the logits on the host); `device` is the time of the
device programs alone (dispatch to ready), `host` the rest. Each method's floor is
max(FLOPs / matmul peak, bytes / copy bandwidth), both peaks measured in the same run, from the
plan (what was computed where); `floor %` = floor / device time.

  python scripts/bench_ttft.py --out $OUT                       (all of it: far beyond 8 minutes)
  python scripts/bench_ttft.py --out $OUT --contexts 8192 32768 --workloads rag --runs 10
  python scripts/bench_ttft.py --report $OUT/ttft.json --out docs/ttft   (markdown + PNGs; no GPU)
  python scripts/bench_ttft.py --smoke --out /tmp/ttft          (CPU self-check: tiny shapes)

Before timing (unless --skip-checks), the engine on the GPU kernels is checked against the same
engine on the jnp references (tiny model, float32 and bfloat16): logits of every method and decoded
tokens. Old flags still work: --only LABELS (= --methods), --repeats (= --runs), --skip-decode,
--decode-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import numpy as np

import sparsex_jax as sx
from models import llama
from models.config import get_config
from sparsex_jax.research import methods as mth
from sparsex_jax.research.ttft import (DEFAULT_METHODS, DENSE, POLICIES, WORKLOADS, DeviceTimer,
                                       Workload, bench_workload, ceilings, make_engine,
                                       random_ids, time_decode)

# --sweep: the default rule at these r x T (speed-up vs r and T), one workload and context; the
# defaults are the grid of `sparsex eval` (issue 10), so that every cell of its heatmap has a TTFT.
SWEEP_R, SWEEP_T = (0.05, 0.10, 0.15, 0.20, 0.30), (0, 1, 2, 4, 8)


# ----------------------------------------------------------------------------------------------
# Kernels vs references (engine level)
# ----------------------------------------------------------------------------------------------

def check_backends(results: dict, labels):
  """Pallas-kernel engine vs reference engine on a tiny model: logits and decoded tokens."""
  for dtype, tol in (("float32", 2e-3), ("bfloat16", 3e-2)):
    cfg = get_config("tiny", dtype=dtype).replace(n_layers=5, n_heads=8, n_kv_heads=2,
                                                  head_dim=64)
    params = llama.init_params(cfg, 0)
    params = jax.tree.map(lambda w: w * 3 if w.ndim == 3 else w, params)
    rng = np.random.default_rng(0)
    docs = [random_ids(rng, n, cfg.vocab_size) for n in (70, 131, 45)]
    system, question = random_ids(rng, 40, cfg.vocab_size), random_ids(rng, 9, cfg.vocab_size)
    req = sx.Request([sx.Segment(system), sx.Segment(docs[1]), sx.Segment(question, cache=False),
                      sx.Segment(docs[0]), sx.Segment(docs[2]), sx.Segment(question, cache=False)])
    engines = {b: sx.Engine(cfg, params, page_size=16, num_pages=256, attention_backend=b)
               for b in ("reference", "pallas", "pallas_triton")}
    for e in engines.values():
      e.cache_segments(docs)
      # The system prompt becomes an exact prefix: the full layers then start after it.
      e.prefill_logits(sx.Request([sx.Segment(system, cache=False),
                                   sx.Segment(question, cache=False)]), reuse=sx.ReuseConfig(
                                       "prefix"))
    for label, reuse in POLICIES:
      if label == "prefix" or label not in labels:
        continue  # prefix would turn the whole prompt into exact hits for the policies after it
      got = {b: e.prefill_logits(req, reuse=reuse) for b, e in engines.items()}
      for b in ("pallas", "pallas_triton"):  # each kernel set against the references
        rel = float(np.linalg.norm(got[b] - got["reference"]) / np.linalg.norm(got["reference"]))
        results["checks"].append({"dtype": dtype, "policy": label if b == "pallas" else
                                  f"{label} ({b})", "rel_err": rel, "ok": rel < tol})
    # The engine (compiled with COMPILER_OPTIONS) against the model's plain forward (XLA's
    # defaults): full prefill's last logits, so the options cannot change results unseen.
    ids = np.concatenate([np.asarray(s.content, np.int32) for s in req.segments])
    plain = np.asarray(llama.forward(params, cfg, ids[None]))[0, -1]
    for b, e in engines.items():
      got = e.prefill_logits(req, reuse=sx.ReuseConfig("full", update_caches=False))
      rel = float(np.linalg.norm(got - plain) / np.linalg.norm(plain))
      results["checks"].append({"dtype": dtype, "policy": f"full ({b}) vs plain forward",
                                "rel_err": rel, "ok": rel < tol})
    sp = sx.SamplingParams(max_new_tokens=12, ignore_eos=True)
    toks = {b: e.generate([req], sp, reuse=sx.SparseX())[0].token_ids
            for b, e in engines.items()}
    results["checks"].append({"dtype": dtype, "policy": "decode tokens",
                              "ok": toks["pallas"] == toks["reference"] == toks["pallas_triton"],
                              "pallas": toks["pallas"], "pallas_triton": toks["pallas_triton"],
                              "reference": toks["reference"]})
    print(dtype, [(c["policy"], round(c.get("rel_err", 0), 5), c["ok"])
                  for c in results["checks"] if c["dtype"] == dtype], flush=True)


def bench(results, args, ceil):
  for preset in args.presets:
    contexts = args.contexts
    t0 = time.perf_counter()
    engine = make_engine(preset, contexts, args.smoke, args.attention_backend)
    timer = DeviceTimer(engine)
    print(f"{preset}: init {time.perf_counter() - t0:.1f} s", flush=True)
    for context in contexts:
      for name in args.workloads:
        wl = Workload(name, engine.config, context, args.runs)
        try:
          bench_workload(results, engine, timer, preset, wl, args.methods, args.runs, ceil)
        except Exception:  # keep what was measured; report the failure
          results["errors"].append(f"{preset} {name} {context}: " + traceback.format_exc())
          print(traceback.format_exc(), flush=True)
        _save(results, args.out)
    if args.sweep:
      wl = Workload(args.workloads[0], engine.config, args.sweep, args.runs)
      labels = []
      for r in args.sweep_ratios:
        for t in args.sweep_thresholds:
          if t >= engine.config.n_layers:
            continue
          label = mth.default_label(r, t)
          if label not in {lb for lb, _ in POLICIES}:
            POLICIES.append((label, sx.SparseX(recompute_ratio=r, layer_threshold=t)))
          labels.append(label)
      sweep_rows = len(results["ttft"])
      bench_workload(results, engine, timer, preset, wl, [DENSE, "full"] + labels, args.runs,
                     ceil)
      for row in results["ttft"][sweep_rows:]:
        row["sweep"] = True
      _save(results, args.out)
    del engine, timer


def _save(results, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "ttft.json"), "w") as f:
    json.dump(results, f, indent=1)


# ----------------------------------------------------------------------------------------------
# Report: markdown tables and PNGs
# ----------------------------------------------------------------------------------------------

def report(json_path: str, out_prefix: str):
  """Renders a ttft.json as <out_prefix>.md tables and PNGs (TTFT vs context per method, speed-up
  vs r and T)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(json_path) as f:
    res = json.load(f)
  rows = res["ttft"]
  main = [r for r in rows if not r.get("sweep")]
  lines = [f"{res['device']}, jax {res['jax']}, {res['date']}. Command: `python "
           f"{res['command']}`", ""]
  if "ceilings" in res:
    c = res["ceilings"]
    lines += [f"Ceilings measured in the run: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, "
              f"copy {c['copy_gbps']:.0f} GB/s (read + write).", ""]
  groups = {}
  for r in main:
    groups.setdefault((r.get("preset", "?"), r.get("workload", "rag"), r.get("context",
                                                                              r["n_prompt"])),
                      []).append(r)
  for (preset, wl, ctx), rs in groups.items():
    dense = next((r for r in rs if r["policy"] == DENSE), None)
    full = next((r for r in rs if r["policy"] == "full"), None)
    lines += [f"### {preset}, {wl}, {ctx} tokens ({rs[0]['n_prompt']} in the prompt)", "",
              "| method | exact | reused | recomputed | TTFT median (ms) | p90 | device | host |"
              " floor (ms) | floor reached | x vs dense | x vs full |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rs:
      med = r["ttft_ms_median"]

      def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)
      reached = None if r.get("floor_frac") is None else 100 * r["floor_frac"]
      x_dense = None if dense is None else dense["ttft_ms_median"] / med
      x_full = None if full is None else full["ttft_ms_median"] / med
      lines.append(
          f"| {r['policy']} | {r['n_exact']} | {r['n_reused']} | {r['n_recomputed']} | "
          f"{med:.1f} | {fmt(r.get('ttft_ms_p90'))} | {fmt(r.get('device_ms_median'))} | "
          f"{fmt(r.get('host_ms_median'))} | {fmt(r.get('floor_ms'))} ({r.get('bound', '-')}) | "
          f"{fmt(reached, '.0f')}% | {fmt(x_dense, '.2f')}x | {fmt(x_full, '.2f')}x |")
    lines.append("")
  checks = res.get("checks", [])
  if checks:
    lines += ["Pallas-kernel engine vs jnp-reference engine (tiny model, same run):", "",
              "| dtype | policy | logits rel. error | ok |", "| --- | --- | --- | --- |"]
    for c in checks:
      err = f"{c['rel_err']:.2e}" if "rel_err" in c else "tokens equal" if c["ok"] else (
          "tokens differ")
      lines.append(f"| {c['dtype']} | {c['policy']} | {err} | {c['ok']} |")
    lines.append("")
  for err in res.get("errors", []):
    lines += ["A step of this run failed (the rest ran): `" + err.strip().splitlines()[0] + " ... "
              + err.strip().splitlines()[-1] + "`", ""]
  if "decode" in res:
    d = res["decode"]
    lines += [f"Paged decode ({d['preset']}, batch {d['batch']} x {d['context']}-token "
              f"contexts, {d['steps']} steps, engine end to end incl. host loop): "
              f"{d['decode_ms_per_step']:.2f} ms per step.", ""]
  pngs = []
  # TTFT vs context, one panel per (preset, workload).
  panels = sorted({(r.get("preset"), r.get("workload", "rag")) for r in main})
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (preset, wl) in zip(axes[0], panels):
      sub = [r for r in main if r.get("preset") == preset and r.get("workload", "rag") == wl]
      for method in dict.fromkeys(r["policy"] for r in sub):
        pts = sorted((r.get("context", r["n_prompt"]), r["ttft_ms_median"]) for r in sub
                     if r["policy"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                linestyle="--" if method == DENSE else "-")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("context (tokens)")
      ax.set_ylabel("TTFT median (ms)")
      ax.set_title(f"{preset}, {wl}", fontsize=9)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_prefix + "_context.png", dpi=120)
    pngs.append(out_prefix + "_context.png")
  sweep = [r for r in rows if r.get("sweep")]
  if sweep:
    base = next((r["ttft_ms_median"] for r in sweep if r["policy"] == DENSE), None) or next(
        r["ttft_ms_median"] for r in sweep if r["policy"] == "full")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    pts = {}
    for r in sweep:
      if "r=" in r["policy"]:
        rr = float(r["policy"].split("r=")[1].split()[0])
        tt = int(r["policy"].split("T=")[1])
        pts.setdefault(tt, []).append((rr, base / r["ttft_ms_median"]))
    for tt in sorted(pts):
      p = sorted(pts[tt])
      ax.plot([x for x, _ in p], [y for _, y in p], marker="o", label=f"T={tt}")
    ax.set_xlabel("recompute ratio r")
    ax.set_ylabel("speed-up vs dense prefill")
    ax.set_title(f"{sweep[0]['preset']}, {sweep[0]['workload']}, {sweep[0]['context']} tokens",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_prefix + "_sweep.png", dpi=120)
    pngs.append(out_prefix + "_sweep.png")
    lines += ["Speed-up vs r and T (default rule; TTFT medians, x vs the dense prefill):", "",
              "| method | TTFT median (ms) | device | x vs dense |", "| --- | --- | --- | --- |"]
    for r in sweep:
      lines.append(f"| {r['policy']} | {r['ttft_ms_median']:.1f} | "
                   f"{r.get('device_ms_median', 0):.1f} | {base / r['ttft_ms_median']:.2f}x |")
    lines.append("")
  for p in pngs:
    lines.append(f"![{os.path.basename(p)}]({os.path.basename(p)})")
  with open(out_prefix + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------

def bench_decode(results: dict, preset: str, batch: int, context: int, steps: int,
                 extra_pages: int = 64):
  """Paged decode speed: a batch of `context`-token prompts, `steps` greedy tokens each.

  extra_pages grows the pool beyond what the batch needs: if a step's time grows with it, some
  step copies pool memory it does not use.
  """
  engine = sx.Engine.random(preset, dtype="bfloat16", page_size=16,
                            num_pages=batch * ((context + steps) // 16 + 2) + extra_pages)
  row = time_decode(engine, batch, context, steps)
  row["preset"] = preset
  results.setdefault("decode_runs", []).append(row)
  results["decode"] = row
  print(f"decode {preset} batch {batch} x {context}, pool {row['pool_gb']:.1f} GB: "
        f"{row['decode_ms_per_step']:.2f} ms/step "
        f"({row['kv_gb_per_s']:.0f} GB/s of KV, weights not counted)", flush=True)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--report", metavar="JSON", help="render a ttft.json as --out .md/.png; no GPU")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--presets", nargs="+", default=["llama3-8b", "smollm2-135m"])
  ap.add_argument("--preset", help="one preset (old flag; same as --presets P)")
  ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 8192, 16384, 32768])
  ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
  ap.add_argument("--methods", "--only", nargs="+", dest="methods", default=None,
                  help=f"method labels (default: {DEFAULT_METHODS}); '{DENSE}' is the anchor")
  ap.add_argument("--runs", "--repeats", type=int, dest="runs", default=10,
                  help="timed runs per method after the warm-up (median and p90)")
  ap.add_argument("--sweep", type=int, metavar="CONTEXT", default=0,
                  help="also time the default rule at r x T (speed-up vs r and T) at this "
                       "context, on the first workload")
  ap.add_argument("--sweep-ratios", nargs="+", type=float, default=list(SWEEP_R))
  ap.add_argument("--sweep-thresholds", nargs="+", type=int, default=list(SWEEP_T))
  ap.add_argument("--smoke", action="store_true",
                  help="CPU self-check: tiny model, tiny contexts, 2 runs, no checks")
  ap.add_argument("--attention-backend", default="auto",
                  help="the engine's kernels: auto/pallas (sparse-query attention on Mosaic GPU "
                  "where it runs), pallas_triton (the Triton kernel), reference")
  ap.add_argument("--skip-checks", action="store_true")
  ap.add_argument("--checks-only", action="store_true",
                  help="only the kernels-vs-references engine check (for the --methods)")
  ap.add_argument("--skip-decode", action="store_true")
  ap.add_argument("--decode-only", action="store_true",
                  help="only the decode timing, at two pool sizes (a pool-copy check)")
  args = ap.parse_args()
  if args.report:
    report(args.report, args.out)
    return
  if args.preset:
    args.presets = [args.preset]
  if args.smoke:
    args.presets, args.runs, args.skip_checks, args.skip_decode = ["tiny"], 2, True, True
    args.contexts = [c for c in args.contexts if c <= 512] or [256, 512]
  known = {label for label, _ in POLICIES} | {DENSE}
  args.methods = args.methods or DEFAULT_METHODS
  unknown = set(args.methods) - known
  for lb in sorted(unknown):
    try:
      mth.config_of(lb)  # a rule's label at any (r, T)
      unknown.discard(lb)
    except ValueError:
      pass
  if unknown:
    raise SystemExit(f"--methods: unknown labels {sorted(unknown)}; known: {sorted(known)}")
  results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": " ".join(["scripts/bench_ttft.py"] + sys.argv[1:]),
             "labels": mth.LABELS,
             "attention_backend": args.attention_backend,
             "checks": [], "ttft": [], "errors": []}
  if args.decode_only:
    for extra in (64, 8000):  # +16 GB of pool on llama3-8b (fits beside 2 x 16 GB of weights)
      bench_decode(results, args.presets[0], 16, 4096, 32, extra_pages=extra)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
      json.dump(results, f, indent=1)
    return
  steps = [] if args.skip_checks else [lambda: check_backends(results, set(args.methods))]
  if not args.checks_only:
    results["ceilings"] = ceilings(args.smoke)
    steps.append(lambda: bench(results, args, results["ceilings"]))
  if not (args.skip_decode or args.checks_only):
    steps.append(lambda: bench_decode(results, args.presets[0], 16, 4096, 32))
  for step in steps:
    try:
      step()
    except Exception:  # keep what was measured; report the failure
      results["errors"].append(traceback.format_exc())
      print(traceback.format_exc(), flush=True)
    _save(results, args.out)
  print(json.dumps({k: v for k, v in results.items() if k != "ttft"}, indent=1)[:3000])


if __name__ == "__main__":
  main()
