"""Time to first token by reuse policy on a GPU, with random weights at real shapes.

A RAG-shaped workload: a system prompt, `--passages` retrieved passages (precomputed alone with
engine.cache_segments, as a corpus would be) in a different order on every run (each run starts
with another passage), and a new question.
So the prefix cache only ever hits the system prompt, while segment reuse sees every passage.
Each policy is warmed up (compiled) and then timed `--repeats` times; medians are reported.

Before timing, the engine on the Pallas kernels is checked against the same engine on the jnp
references (tiny model, float32 and bfloat16): prefill logits of every policy and decoded tokens.

  python scripts/bench_ttft.py --out $OUT          (on the GPU machine; writes ttft.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import sparsex_jax as sx  # noqa: E402
from models import llama  # noqa: E402
from models.config import get_config  # noqa: E402

PAPER = dict(importance_signal="attention", segment_heads=0)  # the paper's selection rule
# Labels match `sparsex eval`'s, so quality and TTFT join by label.
POLICIES = [
    ("full", sx.ReuseConfig("full")),
    ("naive", sx.ReuseConfig("naive")),
    ("cacheblend r=0.15", sx.ReuseConfig("cacheblend", recompute_ratio=0.15)),
    ("epic r=0.15", sx.ReuseConfig("epic", recompute_ratio=0.15)),
    ("sparsex r=0.15 T=2", sx.ReuseConfig("sparsex", recompute_ratio=0.15, layer_threshold=2,
                                          **PAPER)),
    ("sparsex r=0.15 T=4", sx.ReuseConfig("sparsex", recompute_ratio=0.15, layer_threshold=4,
                                          **PAPER)),
    ("sparsex r=0.05 T=4", sx.ReuseConfig("sparsex", recompute_ratio=0.05, layer_threshold=4,
                                          **PAPER)),
    ("sparsex r=0.30 T=2", sx.ReuseConfig("sparsex", recompute_ratio=0.30, layer_threshold=2,
                                          **PAPER)),
    # The default selection rule (attention x deviation, 2 segment heads; docs/quality.md).
    ("sparsex[axd+heads2] r=0.15 T=2", sx.ReuseConfig("sparsex", recompute_ratio=0.15,
                                                      layer_threshold=2)),
    ("sparsex[axd+heads2] r=0.15 T=4", sx.ReuseConfig("sparsex", recompute_ratio=0.15,
                                                      layer_threshold=4)),
    # Last: prefix mode caches every full block it computes, which would turn later policies'
    # passages into exact hits.
    ("prefix", sx.ReuseConfig("prefix")),
]


def _ids(rng, n, vocab):
  return [int(i) for i in rng.integers(10, vocab, size=n)]


def check_backends(results: dict):
  """Pallas-kernel engine vs reference engine on a tiny model: logits and decoded tokens."""
  for dtype, tol in (("float32", 2e-3), ("bfloat16", 3e-2)):
    cfg = get_config("tiny", dtype=dtype).replace(n_layers=5, n_heads=8, n_kv_heads=2,
                                                  head_dim=64)
    params = llama.init_params(cfg, 0)
    params = jax.tree.map(lambda w: w * 3 if w.ndim == 3 else w, params)
    rng = np.random.default_rng(0)
    docs = [_ids(rng, n, cfg.vocab_size) for n in (70, 131, 45)]
    system, question = _ids(rng, 40, cfg.vocab_size), _ids(rng, 9, cfg.vocab_size)
    req = sx.Request([sx.Segment(system), sx.Segment(docs[1]), sx.Segment(question, cache=False),
                      sx.Segment(docs[0]), sx.Segment(docs[2]), sx.Segment(question, cache=False)])
    engines = {b: sx.Engine(cfg, params, page_size=16, num_pages=256, attention_backend=b)
               for b in ("reference", "pallas")}
    for e in engines.values():
      e.cache_segments(docs)
    for label, reuse in POLICIES:
      if label == "prefix":
        continue  # would turn the whole prompt into exact hits for the policies after it
      got = {b: e.prefill_logits(req, reuse=reuse) for b, e in engines.items()}
      rel = float(np.linalg.norm(got["pallas"] - got["reference"])
                  / np.linalg.norm(got["reference"]))
      results["checks"].append({"dtype": dtype, "policy": label, "rel_err": rel, "ok": rel < tol})
    sp = sx.SamplingParams(max_new_tokens=12, ignore_eos=True)
    toks = {b: e.generate([req], sp, reuse=sx.ReuseConfig("sparsex"))[0].token_ids
            for b, e in engines.items()}
    results["checks"].append({"dtype": dtype, "policy": "decode tokens",
                              "ok": toks["pallas"] == toks["reference"],
                              "pallas": toks["pallas"], "reference": toks["reference"]})
    print(dtype, [(c["policy"], round(c.get("rel_err", 0), 5), c["ok"])
                  for c in results["checks"] if c["dtype"] == dtype], flush=True)


def bench(results: dict, preset: str, n_passages: int, passage_len: int, repeats: int,
          backend: str):
  cfg = get_config(preset, dtype="bfloat16")
  rng = np.random.default_rng(1)
  passages = [_ids(rng, passage_len, cfg.vocab_size) for _ in range(n_passages)]
  system = _ids(rng, 256, cfg.vocab_size)
  n_prompt = len(system) + n_passages * passage_len + 32
  t0 = time.perf_counter()
  engine = sx.Engine.random(preset, dtype="bfloat16", page_size=16,
                            num_pages=(n_prompt // 16 + 8) * (n_passages + 4),
                            attention_backend=backend)
  engine.cache_segments(passages, batch_size=2)
  print(f"{preset}: init + cache_segments {time.perf_counter() - t0:.1f} s", flush=True)

  def request(i):
    # A rotation: every run (warm-up included) starts with a different passage, so the prefix
    # cache can only ever match the system prompt.
    order = (np.arange(n_passages) + i) % n_passages
    return sx.Request([sx.Segment(system)] + [sx.Segment(passages[j]) for j in order]
                      + [sx.Segment(_ids(np.random.default_rng(200 + i), 32, cfg.vocab_size),
                                    cache=False)])

  for label, reuse in POLICIES:
    t0 = time.perf_counter()
    engine.prefill_logits(request(-1), reuse=reuse)  # compile
    compile_s = time.perf_counter() - t0
    times, plan = [], None
    for i in range(repeats):
      t0 = time.perf_counter()
      _, plan = engine.prefill_logits(request(i), reuse=reuse, return_plan=True)
      times.append(time.perf_counter() - t0)
    row = {"preset": preset, "backend": backend, "policy": label, "n_prompt": n_prompt,
           "n_exact": int(np.sum(plan.labels == 0)), "n_reused": int(plan.reused_positions.size),
           "n_recomputed": int(plan.selected_positions.size), "ttft_ms_median":
           1e3 * float(np.median(times)), "ttft_ms_all": [1e3 * t for t in times],
           "compile_s": compile_s}
    results["ttft"].append(row)
    print(f"  {label:20s} ttft {row['ttft_ms_median']:8.1f} ms  (exact {row['n_exact']}, reused "
          f"{row['n_reused']}, recomputed {row['n_recomputed']}; compile {compile_s:.0f} s)",
          flush=True)


def report(json_path: str, out_prefix: str):
  """Renders a ttft.json (from a GPU run) as a markdown table and a PNG bar chart."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(json_path) as f:
    res = json.load(f)
  rows = res["ttft"]
  full = next(r["ttft_ms_median"] for r in rows if r["policy"] == "full")
  lines = [f"{res['device']}, jax {res['jax']}, {res['date']}. Command: `python {res['command']}`",
           "", "| policy | prompt tokens | exact | reused | recomputed | TTFT median (ms) | "
           "speed-up vs full |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['policy']} | {r['n_prompt']} | {r['n_exact']} | {r['n_reused']} | "
                 f"{r['n_recomputed']} | {r['ttft_ms_median']:.1f} | "
                 f"{full / r['ttft_ms_median']:.2f}x |")
  checks = res.get("checks", [])
  if checks:
    lines += ["", "Pallas-kernel engine vs jnp-reference engine (tiny model, same run):", "",
              "| dtype | policy | logits rel. error | ok |", "| --- | --- | --- | --- |"]
    for c in checks:
      err = f"{c['rel_err']:.2e}" if "rel_err" in c else "tokens equal" if c["ok"] else (
          "tokens differ")
      lines.append(f"| {c['dtype']} | {c['policy']} | {err} | {c['ok']} |")
  for err in res.get("errors", []):
    lines += ["", "A step of this run failed (the rest ran): `" + err.strip().splitlines()[-1] + "`"]
  if "decode" in res:
    d = res["decode"]
    lines += ["", f"Paged decode ({d['preset']}, batch {d['batch']} x {d['context']}-token "
              f"contexts, {d['steps']} steps, engine end to end incl. host loop): "
              f"{d['decode_ms_per_step']:.2f} ms per step."]
  with open(out_prefix + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.barh([r["policy"] for r in rows][::-1], [r["ttft_ms_median"] for r in rows][::-1])
  ax.set_xlabel("time to first token, median (ms)")
  ax.set_title(f"{rows[0]['preset']} bf16, {rows[0]['n_prompt']}-token RAG prompt, "
               f"{res['device']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(out_prefix + ".png", dpi=120)
  print("\n".join(lines))


def bench_decode(results: dict, preset: str, batch: int, context: int, steps: int,
                 extra_pages: int = 64):
  """Paged decode speed: a batch of `context`-token prompts, `steps` greedy tokens each.

  extra_pages grows the pool beyond what the batch needs: if a step's time grows with it, some
  step copies pool memory it does not use.
  """
  cfg = get_config(preset, dtype="bfloat16")
  rng = np.random.default_rng(2)
  engine = sx.Engine.random(preset, dtype="bfloat16", page_size=16,
                            num_pages=batch * ((context + steps) // 16 + 2) + extra_pages)
  reqs = [sx.Request([sx.Segment(_ids(rng, context, cfg.vocab_size))]) for _ in range(batch)]
  sp = sx.SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
  engine.generate(reqs, sp, reuse=sx.ReuseConfig("full"))  # compile
  t0 = time.perf_counter()
  outs = engine.generate(reqs, sp, reuse=sx.ReuseConfig("full"))
  wall = time.perf_counter() - t0
  step_ms = 1e3 * (wall - outs[0].stats.ttft_s) / steps
  kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * batch * (context + steps / 2)
  row = {"preset": preset, "batch": batch, "context": context, "steps": steps,
         "pool_gb": engine.layout.num_pages * engine.layout.bytes_per_page / 1e9,
         "decode_ms_per_step": step_ms, "kv_gb_per_s": kv_bytes / (step_ms * 1e-3) / 1e9}
  results.setdefault("decode_runs", []).append(row)
  results["decode"] = row
  print(f"decode {preset} batch {batch} x {context}, pool {row['pool_gb']:.1f} GB: "
        f"{step_ms:.2f} ms/step "
        f"({row['kv_gb_per_s']:.0f} GB/s of KV, weights not counted)", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--report", metavar="JSON", help="render a ttft.json as --out .md/.png; no GPU")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--passages", type=int, default=6)
  ap.add_argument("--passage-len", type=int, default=1280)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--skip-checks", action="store_true")
  ap.add_argument("--skip-decode", action="store_true")
  ap.add_argument("--only", nargs="*", help="time only the policies whose label is one of these")
  ap.add_argument("--decode-only", action="store_true",
                  help="only the decode timing, at two pool sizes (a pool-copy check)")
  args = ap.parse_args()
  if args.report:
    report(args.report, args.out)
    return
  if args.only:
    unknown = set(args.only) - {label for label, _ in POLICIES}
    if unknown:
      raise SystemExit(f"--only: unknown labels {sorted(unknown)}; known: "
                       f"{[label for label, _ in POLICIES]}")
    POLICIES[:] = [(label, reuse) for label, reuse in POLICIES if label in args.only]
  results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
             "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
             "checks": [], "ttft": [], "errors": []}
  path = os.path.join(args.out, "ttft.json")
  if args.decode_only:
    for extra in (64, 8000):  # +16 GB of pool on llama3-8b (fits beside 2 x 16 GB of weights)
      bench_decode(results, args.preset, 16, 4096, 32, extra_pages=extra)
    with open(os.path.join(args.out, "decode.json"), "w") as f:
      json.dump(results, f, indent=1)
    return
  steps = [] if args.skip_checks else [lambda: check_backends(results)]
  steps.append(lambda: bench(results, args.preset, args.passages, args.passage_len,
                             args.repeats, "auto"))
  if not args.skip_decode:
    steps.append(lambda: bench_decode(results, args.preset, 16, 4096, 32))
  for step in steps:
    try:
      step()
    except Exception:  # keep what was measured; report the failure
      results["errors"].append(traceback.format_exc())
      print(traceback.format_exc(), flush=True)
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
  print(json.dumps({k: v for k, v in results.items() if k != "ttft"}, indent=1)[:3000])


if __name__ == "__main__":
  main()
