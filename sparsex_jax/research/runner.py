"""`sparsex eval`: warm the caches once per prompt, run every method on that cache state, score.

For each prompt: engine.clear_caches(), apply the prompt's warm-up (the cache state it needs),
then for every method prefill_logits (first-token logits and the PrefillPlan) and a greedy
generate. Methods run with update_caches=False, so none of them changes what the next one sees;
the runner checks that the cache contents are the same after the methods as before.

Prompts are taken round-robin over the workloads, and the raw JSON is rewritten after every
prompt: a run stopped by --time-budget-s (or killed) still leaves balanced, usable results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import time
import traceback

import numpy as np

import sparsex_jax as sx
from sparsex_jax.kv.host_tier import HOST_DTYPES, dequantize, quantize
from sparsex_jax.research import methods as mth
from sparsex_jax.research import metrics as mt
from sparsex_jax.research import report
from sparsex_jax.research import text as txt
from sparsex_jax.research import workloads as wl

DEFAULT_TTFT = os.path.join("docs", "results", "ttft_h100_thresholds.json")
QUICK = {"prompts": 2, "methods": "full,naive,epic,sparsex", "ratios": "0.15", "thresholds": "4",
         "max_new_tokens": 8}


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--split", choices=("dev", "test"), default="test",
                 help="dev (choose options on it) or test (report on it; never tune on it)")
  p.add_argument("--prompts", type=int, default=None, help="prompts per workload (default 50)")
  p.add_argument("--first", type=int, default=0,
                 help="index of the first prompt per workload (split one evaluation over several "
                 "runs, then merge them with --report)")
  p.add_argument("--workloads", default=",".join(wl.WORKLOADS),
                 help=f"comma-separated subset of {','.join(wl.WORKLOADS)}")
  p.add_argument("--data", default=None,
                 help="path to musique_s.json; without it the musique workload is skipped")
  p.add_argument("--model", default="smollm2-135m",
                 help="smollm2-135m (embedded), a .gguf file or a Hugging Face folder")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--methods", default=None,
                 help=f"comma-separated subset of {','.join(mth.FAMILIES)} (default "
                      f"{','.join(mth.DEFAULT_FAMILIES)}); full always runs (the reference); "
                      "sparsex is the default rule, sparsex-paper the paper's as published, "
                      "sparsex-attention its attention-only ranking")
  p.add_argument("--ratios", default=None, help="recompute ratios of the rules' grids (default "
                 + ",".join(f"{r:g}" for r in mth.GRID_RATIOS) + ")")
  p.add_argument("--thresholds", default=None, help="layer thresholds of the rules' grids "
                 "(default " + ",".join(str(t) for t in mth.GRID_THRESHOLDS) + ")")
  p.add_argument("--baseline-ratio", type=float, default=0.15,
                 help="recompute ratio of cacheblend, epic and random")
  p.add_argument("--max-new-tokens", type=int, default=None,
                 help="greedy tokens compared for exact match (default 32)")
  p.add_argument("--seed", type=int, default=0, help="prompt seed (facts, depths, windows)")
  p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
  p.add_argument("--time-budget-s", type=float, default=None,
                 help="start no new prompt after this many seconds (results so far are kept)")
  p.add_argument("--out", default=None, help="output prefix: PREFIX.json, PREFIX.md, "
                 "PREFIX_heatmap.png, PREFIX_ttft.png (default docs/results/eval_<split>, "
                 "or .out/eval_quick with --quick)")
  p.add_argument("--ttft", action="append", default=None, metavar="JSON",
                 help="TTFT JSON of scripts/bench_ttft.py to join by method label (repeatable; "
                 f"later files win; default {DEFAULT_TTFT} if present)")
  p.add_argument("--resume", action="store_true",
                 help="continue PREFIX.json of an earlier run with the same settings: its prompts "
                 "are kept and skipped")
  p.add_argument("--far-tier", default="native", choices=HOST_DTYPES,
                 help="reuse every cached segment as a host or disk tier in this format gives it "
                 "back (int8, fp8: quantised with per-head scales, then dequantised; issue 31's "
                 "8-bit tier quality)")
  p.add_argument("--attention-backend", default="auto",
                 choices=("auto", "pallas", "pallas_triton", "reference"),
                 help="the engine's attention backend (auto: Pallas kernels on GPU)")
  p.add_argument("--quick", action="store_true",
                 help="CPU smoke run: 2 prompts per workload, short contexts, 4 methods, "
                 "8 decode tokens")
  p.add_argument("--report", nargs="+", metavar="JSON", default=None,
                 help="no model: re-render (and merge) raw JSON from earlier runs into --out")
  p.add_argument("--candidates", default=None,
                 help='"LABEL1;LABEL2": leave-one-family-out selection over these labels')
  p.add_argument("--reference", default=None,
                 help="with --candidates: the label to beat (default: the run's default)")


def _settings(args) -> dict:
  quick = args.quick
  pick = lambda v, key, full: v if v is not None else (QUICK[key] if quick else full)  # noqa
  s = {
      "prompts": pick(args.prompts, "prompts", 50),
      "methods": pick(args.methods, "methods", ",".join(mth.DEFAULT_FAMILIES)),
      "ratios": pick(args.ratios, "ratios", ",".join(f"{r:g}" for r in mth.GRID_RATIOS)),
      "thresholds": pick(args.thresholds, "thresholds",
                         ",".join(str(t) for t in mth.GRID_THRESHOLDS)),
      "max_new_tokens": pick(args.max_new_tokens, "max_new_tokens", 32),
  }
  if s["prompts"] < 1:
    raise ValueError(f"--prompts must be >= 1, got {s['prompts']}")
  if s["max_new_tokens"] < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {s['max_new_tokens']}")
  return s


def _device_info() -> dict:
  import jax
  d = jax.devices()[0]
  return {"device": str(getattr(d, "device_kind", d.platform)), "platform": d.platform,
          "jax": jax.__version__, "python": platform.python_version(),
          "host": platform.machine()}


def _cache_fingerprint(engine) -> tuple:
  """What the caches hold (not their hit counters): must not move while methods run."""
  st = engine.stats()
  seg, pre = st["segment_cache"], st["prefix_cache"]
  return (seg.get("entries"), seg.get("cached_tokens"), pre.get("cached_blocks"),
          st["pool"].get("pages_used"))


def apply_warm(engine, step: wl.WarmStep):
  """Puts one warm-up step into the caches (see workloads.WARM_KINDS)."""
  if step.kind == "segments":
    engine.cache_segments(list(step.segments))
  elif step.kind == "prefix":
    engine.prefill_logits(sx.Request(step.segments), reuse=sx.Prefix())
  else:
    # In context: every layer computed for every token (T = depth makes any reuse exact), and
    # the request's cacheable segments stored at their positions here.
    n_layers = engine.config.n_layers
    engine.prefill_logits(sx.Request(step.segments),
                          reuse=sx.Naive(layer_threshold=n_layers))


def round_trip_segments(engine, host_dtype: str) -> int:
  """Replaces every cached segment's K/V by what a far tier keeping them in `host_dtype` gives
  back: quantised as kv/host_tier.py stores them, dequantised as a load writes them. The methods
  then reuse exactly what they would read after the segment came back from that tier (every
  layer: the baselines read all of them, sparsex those from T). Returns the segments changed."""
  if host_dtype == "native":
    return 0
  store = engine.store
  n = 0
  for key in store.segment_cache.keys():
    entry = store.segment_cache.get(key)
    k, v = store.page_io.read_pages(entry.pages)
    k, v = (dequantize(quantize(x, host_dtype), x.dtype) for x in (k, v))
    store.page_io.write_pages(entry.pages, k, v)
    n += 1
  return n


def evaluate_prompt(engine, prompt: wl.Prompt, methods: list[mth.Method],
                    sampling: sx.SamplingParams, far_tier: str = "native") -> dict:
  """Every method on one prompt, from one warm-up; the full-prefill reference comes first.
  far_tier: the format the cached segments come back in (round_trip_segments)."""
  engine.clear_caches()
  for step in prompt.warm:
    apply_warm(engine, step)
  round_trip_segments(engine, far_tier)
  before = _cache_fingerprint(engine)
  results, ref_logits, ref_tokens = {}, None, None
  # A KL-only run (--max-new-tokens 1, greedy) halves its device calls: the one token is the
  # argmax of the prefill's logits.
  one_greedy_token = sampling.max_new_tokens <= 1 and sampling.temperature == 0
  n_prompt = None
  for m in methods:
    try:
      t0 = time.perf_counter()
      logits, plan = engine.prefill_logits(prompt.request, reuse=m.config, return_plan=True)
      prefill_s = time.perf_counter() - t0
      if one_greedy_token:  # the logits above already give it: no second prefill
        token_ids = [int(np.argmax(logits))]
        text, ttft_s = engine.tokenizer.decode(token_ids), prefill_s
      else:
        out = engine.generate([prompt.request], sampling, reuse=m.config)[0]
        token_ids, text, ttft_s = out.token_ids, out.text, float(out.stats.ttft_s)
    except Exception as e:  # keep the run going; the summary skips it and says so
      results[m.label] = {"error": f"{type(e).__name__}: {e}"}
      traceback.print_exc()
      if m.family == "full":
        raise  # without the reference nothing else can be scored
      continue
    if ref_logits is None:
      ref_logits, ref_tokens = logits, token_ids
    labels = np.asarray(plan.labels)
    n_prompt = int(labels.size)
    n_reused = int(plan.reused_positions.size)
    n_rec = int(plan.selected_positions.size)
    results[m.label] = {
        "kl": mt.kl_divergence(ref_logits, logits),
        "top1": mt.top1_agree(ref_logits, logits),
        "em": mt.exact_match(ref_tokens, token_ids, sampling.max_new_tokens),
        "match_len": mt.common_prefix(ref_tokens, token_ids),
        "task": mt.task_score(prompt.task_metric, text, prompt.answers),
        "text": text,
        "n_generated": len(token_ids),
        "n_exact": int(np.sum(labels == 0)), "n_reused": n_reused,
        "n_new": int(np.sum(labels == 2)), "n_recomputed": n_rec,
        "frac_recomputed": n_rec / n_reused if n_reused else 0.0,
        "ttft_s": ttft_s, "prefill_s": prefill_s,
    }
  after = _cache_fingerprint(engine)
  if after != before:
    raise RuntimeError(f"{prompt.key}: the caches changed while methods ran ({before} -> "
                       f"{after}); a method stored something despite update_caches=False")
  return {"key": prompt.key, "workload": prompt.workload, "split": prompt.split,
          "index": prompt.index, "item": prompt.item, "n_prompt": n_prompt,
          "task_metric": prompt.task_metric, "answers": list(prompt.answers),
          "info": prompt.info, "results": results}


def _write_json(path: str, data: dict):
  """Atomic (a run killed mid-write leaves the previous file); compact: it is rewritten often."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, default=float)
  os.replace(tmp, path)


def _pages_for(tok, prompts: list[wl.Prompt], page_size: int) -> int:
  """Pool pages for the longest prompt: its request, its warm-up and the in-context copies."""
  longest = 0
  for p in prompts:
    n_req = sum(len(tok.encode(s.content)) for s in p.request.segments)
    n_warm = sum(len(tok.encode(s.content)) for st in p.warm for s in st.segments)
    longest = max(longest, 2 * n_req + 2 * n_warm)
  return longest // page_size + 512


def run(args, argv: list[str], engine=None) -> int:
  """Runs `sparsex eval` (argparse args from add_arguments). `engine`: use this engine (its
  config, weights and tokenizer) instead of loading --model, e.g. random weights at the model's
  shapes to warm a persistent compilation cache."""
  if args.report:
    out = args.out or os.path.join("docs", "results", f"eval_{args.split}")
    report.render(args.report, out, _ttft_files(args), n_boot=args.bootstrap,
                  candidates=args.candidates, reference=args.reference)
    return 0
  s = _settings(args)
  out = args.out or (os.path.join(".out", "eval_quick") if args.quick
                     else os.path.join("docs", "results", f"eval_{args.split}"))
  workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
  for w in workloads:
    if w not in wl.WORKLOADS:
      raise ValueError(f"--workloads: unknown workload {w!r}; choose from {wl.WORKLOADS}")
  notes = []
  items = None
  if "musique" in workloads:
    if args.data is None:
      workloads.remove("musique")
      notes.append("musique workload skipped: no --data PATH to musique_s.json given")
      print(f"sparsex eval: {notes[-1]}", flush=True)
    else:
      items = txt.load_musique(args.data)
  if not workloads:
    raise ValueError("no workload left to run")
  families = [f.strip() for f in s["methods"].split(",") if f.strip()]
  ratios = mth.parse_floats(s["ratios"], "--ratios")
  thresholds = mth.parse_ints(s["thresholds"], "--thresholds")

  t_start = time.perf_counter()
  if engine is None:
    engine = sx.Engine.from_pretrained(args.model, dtype=args.dtype, num_pages=64)
  tok = engine.tokenizer
  if tok is None:
    raise ValueError(f"{args.model}: the model has no tokenizer; the workloads need text")
  n_layers = engine.config.n_layers
  methods = mth.method_grid(families, n_layers, ratios, thresholds, args.baseline_ratio)
  sizes = wl.Sizes.quick() if args.quick else wl.Sizes()
  if args.first < 0:
    raise ValueError(f"--first must be >= 0, got {args.first}")
  prompts = wl.build(tok, workloads, args.split, args.first + s["prompts"], sizes, args.seed,
                     items)
  prompts = {w: ps[args.first:] for w, ps in prompts.items()}
  all_prompts = [p for ps in prompts.values() for p in ps]
  # A pool sized for the longest prompt (the engine above only lent its tokenizer and weights).
  engine = sx.Engine(engine.config, engine.params, tok, page_size=16,
                     num_pages=_pages_for(tok, all_prompts, 16),
                     attention_backend=args.attention_backend,
                     mesh=sx.mesh_for(getattr(args, "tp", None)))
  load_s = time.perf_counter() - t_start
  sampling = sx.SamplingParams(max_new_tokens=s["max_new_tokens"], temperature=0.0)
  default = mth.default_method(n_layers)

  meta = {
      **_device_info(),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "command": "sparsex eval " + shlex.join(argv),
      "code_rev": os.environ.get("SPARSEX_EVAL_REV") or _git_rev(),
      "model": args.model, "model_name": engine.config.name, "n_layers": n_layers,
      "dtype": args.dtype, "split": args.split, "seed": args.seed, "quick": args.quick,
      "prompts_per_workload": s["prompts"], "first_prompt": args.first, "workloads": workloads,
      "sizes": json.loads(json.dumps(dataclasses.asdict(sizes))), "max_new_tokens": s["max_new_tokens"],
      "data": os.path.basename(args.data) if args.data else None,
      "methods": [{"label": m.label, "family": m.family, "ratio": m.ratio,
                   "threshold": m.threshold} for m in methods],
      "default_label": default.label, "labels": mth.LABELS, "notes": notes, "load_s": load_s,
      "time_budget_s": args.time_budget_s, "attention_backend": args.attention_backend,
      "far_tier": args.far_tier,
      "complete": False,
  }
  data = {"meta": meta, "prompts": []}
  raw_path = out + ".json"
  done = set()
  if args.resume and os.path.exists(raw_path):
    data["prompts"] = _resumable(raw_path, meta)
    done = {p["key"] for p in data["prompts"]}
    meta["resumed"] = len(done)
    print(f"sparsex eval: resuming {raw_path}: {len(done)} prompts already done", flush=True)
  print(f"sparsex eval: {len(methods)} methods x {len(all_prompts)} prompts "
        f"({', '.join(f'{w} {len(ps)}' for w, ps in prompts.items())}), split {args.split}, "
        f"{meta['device']}, jax {meta['jax']}; writing {raw_path}", flush=True)
  stopped = False
  last = {}  # workload -> seconds its latest prompt took (the next one's estimate)
  last_write = time.perf_counter()
  for i in range(s["prompts"]):
    for w in workloads:
      if i >= len(prompts[w]) or prompts[w][i].key in done:  # MuSiQue has 75 items per split
        continue
      elapsed = time.perf_counter() - t_start
      if args.time_budget_s is not None and elapsed + last.get(w, 0.0) > args.time_budget_s:
        stopped = True
        break
      t_prompt = time.perf_counter()
      rec = evaluate_prompt(engine, prompts[w][i], methods, sampling, args.far_tier)
      last[w] = time.perf_counter() - t_prompt
      data["prompts"].append(rec)
      meta["elapsed_s"] = time.perf_counter() - t_start
      meta["compilations"] = engine.stats().get("compilations")
      if time.perf_counter() - last_write > 10:  # rewriting megabytes per prompt adds up
        _write_json(raw_path, data)
        last_write = time.perf_counter()
      r = rec["results"]
      kl = lambda label: r.get(label, {}).get("kl", float("nan"))  # noqa: E731
      print(f"[{w} {args.first + i + 1}/{args.first + len(prompts[w])}] {rec['n_prompt']} tokens, "
            f"{meta['elapsed_s']:.0f} s: KL naive {kl('naive'):.3f}, {default.label} "
            f"{kl(default.label):.3f}; task full {r['full']['task']:.2f}", flush=True)
    if stopped:
      break
  if stopped:
    notes.append(f"stopped by --time-budget-s {args.time_budget_s:g} after "
                 f"{len(data['prompts'])} prompts")
    print(f"sparsex eval: {notes[-1]}", flush=True)
  meta["complete"] = not stopped
  meta["elapsed_s"] = time.perf_counter() - t_start
  _write_json(raw_path, data)
  report.render([raw_path], out, _ttft_files(args), n_boot=args.bootstrap,
                  candidates=args.candidates, reference=args.reference)
  return 0


def _resumable(path: str, meta: dict) -> list[dict]:
  """The prompts of an earlier run's JSON, if it ran the same evaluation (else a clear error)."""
  try:
    with open(path) as f:
      old = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{e.lineno}: cannot resume from invalid JSON ({e.msg})") from None
  om = old.get("meta", {})
  same = lambda x: json.loads(json.dumps(x))  # noqa: E731  (tuples came back as lists)
  om.setdefault("far_tier", "native")  # runs from before the option
  for key in ("split", "seed", "model_name", "sizes", "max_new_tokens", "dtype", "far_tier"):
    if same(om.get(key)) != same(meta.get(key)):
      raise ValueError(f"{path}: cannot resume: {key} was {om.get(key)!r}, now {meta.get(key)!r}")
  if [m["label"] for m in om.get("methods", [])] != [m["label"] for m in meta["methods"]]:
    raise ValueError(f"{path}: cannot resume: the method list differs")
  meta["runs_before"] = (om.get("runs_before") or []) + [
      {k: om.get(k) for k in ("command", "date", "elapsed_s", "device", "code_rev")}]
  return old.get("prompts", [])


def _ttft_files(args) -> list[str]:
  if args.ttft:
    return args.ttft
  return [DEFAULT_TTFT] if os.path.exists(DEFAULT_TTFT) else []


def _git_rev() -> str | None:
  import subprocess
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                          text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None
