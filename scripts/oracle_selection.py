"""How much of the naive->full gap can *any* ranking of the reused tokens recover at r = 0.15?

A diagnostic for issue 10's 90% target, on the same prompts and metric as `sparsex eval`. The
runtime rule (`axn+heads2`) ranks reused token j by its attention at the last full layer T - 1
times the norm of its K/V deviation at layer T, the only sparse layer where the fresh K/V can be
computed exactly (every layer below ran in full). Above T the deviation is unobservable at run
time. This script measures it anyway, from a full prefill of the same prompt, and ranks by it:

  oracle dev@T           |dK_T, dV_T|: the deviation alone at layer T (CacheBlend's signal, norm)
  oracle attn x dev@T    attention at T-1 x |dK_T, dV_T|: the runtime rule rebuilt from the
                         pools (checks this script's machinery: it must match `axn+heads2`)
  oracle dev>=T          sum over every sparse layer l >= T of |dK_l, dV_l|
  oracle attn x dev>=T   attention at T-1 x that sum
  oracle attn_l x dev_l  sum over probed layers l of attention at l x |dK_l, dV_l| (attention
                         at l comes from a prefill whose full layers end at l)

every one with the 2 segment heads of the runtime rule, the same budget ceil(r * n_reused) and
the same program (host scores, `device_score="given"`). "Deviation" is full prefill's K/V minus
naive reuse's (the cached K/V, re-rotated): the error an unselected token's K/V would carry if
nothing else changed. If even these rankings stay far below 90%, selection at r = 0.15 is not
where the rest of the gap is.

Uses the engine's internals (the store, the planner's policy, the pool) to read K/V: a research
script, not an API. Writes `sparsex eval`'s JSON format, so `sparsex eval --report OUT.json`
renders its tables and paired intervals (every comparison is against `axn+heads2`).

    python scripts/oracle_selection.py --data ../shared/data/musique_s.json --model PATH.gguf \
      --split dev --prompts 25 --out docs/results/oracle_dev
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import time
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparsex_jax as sx  # noqa: E402
from sparsex_jax import policy as pol  # noqa: E402
from sparsex_jax.evaluation import metrics as mt  # noqa: E402
from sparsex_jax.evaluation import report  # noqa: E402
from sparsex_jax.evaluation import runner  # noqa: E402
from sparsex_jax.evaluation import text as txt  # noqa: E402
from sparsex_jax.evaluation import workloads as wl  # noqa: E402
from sparsex_jax.evaluation.methods import VARIANTS  # noqa: E402
from sparsex_jax.prompt import tokenize  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GivenRanking(pol.SparseQAttention):
  """The runtime rule's budget and segment heads, ranked by scores computed outside the prefill."""

  device_score: ClassVar[str] = "given"
  given: np.ndarray | None = dataclasses.field(default=None, compare=False, hash=False)

  def host_scores(self, plan, ratio: float) -> np.ndarray:
    if self.given is None or self.given.shape != (plan.n,):
      raise ValueError(f"given scores of shape {getattr(self.given, 'shape', None)}, "
                       f"the plan has {plan.n} tokens")
    return self.given.astype(np.float32)


def _run(engine, request: sx.Request, policy: pol.ReusePolicy, capture: bool = False):
  """One prefill under `policy`: float32 logits [V], the plan, and (capture) the deviation
  input: the K and V of every prompt position, every layer, [L, n, K*H] each."""
  prompt = tokenize(request, engine.tokenizer, engine.config, 0)
  with engine.store.acquire([prompt], policy, 0) as leases, engine.kv.recovering():
    plans, out, _ = engine._prefill([prompt], leases, policy)
    plan = plans[0]
    logits = np.asarray(out.logits[0], np.float32)
    kv = None
    if capture:
      s = engine.layout.page_size
      pos = np.arange(plan.n)
      pages = jnp.asarray(np.asarray(plan.page_table)[pos // s])
      offs = jnp.asarray(pos % s)
      pool = engine.pool
      kv = tuple(jnp.moveaxis(pool[x][:, :, pages, offs, :], 2, 1).reshape(
          pool[x].shape[0], plan.n, -1).astype(jnp.float32) for x in ("k", "v"))
  return logits, plan, kv


def _deviation(full_kv, naive_kv) -> np.ndarray:
  """|dK_l, dV_l| per layer and position [L, n]."""
  dk = full_kv[0] - naive_kv[0]
  dv = full_kv[1] - naive_kv[1]
  return np.asarray(jnp.sqrt(jnp.sum(dk * dk, -1) + jnp.sum(dv * dv, -1)), np.float64)


def _attention_at(engine, request, layer: int, ratio: float) -> np.ndarray:
  """Attention mass the Sparse-Q rows pay each prompt position at `layer` (the paper's signal,
  from a prefill whose full layers are [0, layer]); 0 off the reused tokens."""
  cfg = sx.ReuseConfig("sparsex", recompute_ratio=ratio, layer_threshold=layer + 1,
                       importance_signal="attention", segment_heads=0, importance_layers="last",
                       refresh_threshold_kv=False, update_caches=False)
  _, plan = engine.prefill_logits(request, reuse=cfg, return_plan=True)
  out = np.zeros(plan.labels.size, np.float64)
  out[plan.reused_positions] = plan.scores
  return out


def evaluate(engine, prompt: wl.Prompt, ratio: float, threshold: int, probe_layers) -> dict:
  engine.clear_caches()
  for step in prompt.warm:
    runner.apply_warm(engine, step)
  cfg = engine.config
  resolve = lambda c: c.resolve(cfg)  # noqa: E731
  full_logits, plan, full_kv = _run(engine, prompt.request,
                                    resolve(sx.ReuseConfig("full", update_caches=False)), True)
  naive_logits, plan, naive_kv = _run(engine, prompt.request,
                                      resolve(sx.ReuseConfig("naive", update_caches=False)), True)
  dev = _deviation(full_kv, naive_kv)
  del full_kv, naive_kv
  reused = plan.labels == pol.REUSED
  n_reused = int(reused.sum())
  results = {}

  def record(label, logits, n_rec, t0):
    results[label] = {"kl": mt.kl_divergence(full_logits, logits),
                      "top1": mt.top1_agree(full_logits, logits), "em": True, "task": 0.0,
                      "match_len": 0, "text": "", "n_generated": 0,
                      "n_exact": int(np.sum(plan.labels == pol.EXACT)), "n_reused": n_reused,
                      "n_new": int(np.sum(plan.labels == pol.NEW)), "n_recomputed": n_rec,
                      "frac_recomputed": n_rec / n_reused if n_reused else 0.0,
                      "ttft_s": time.perf_counter() - t0, "prefill_s": time.perf_counter() - t0}

  record("full", full_logits, 0, time.perf_counter())
  record("naive", naive_logits, 0, time.perf_counter())
  base = dict(recompute_ratio=ratio, layer_threshold=threshold, update_caches=False)
  for label, variant in ((f"sparsex[axn+heads2] r={ratio:.2f} T={threshold}", "axn+heads2"),
                         (f"sparsex[axn+heads2+fresh] r={ratio:.2f} T={threshold}",
                          "axn+heads2+fresh")):
    t0 = time.perf_counter()
    logits, p = engine.prefill_logits(prompt.request, reuse=sx.ReuseConfig(
        "sparsex", **base, **VARIANTS[variant]), return_plan=True)
    record(label, logits, int(p.selected_positions.size), t0)

  attn = {l: _attention_at(engine, prompt.request, l, ratio) for l in probe_layers}
  a_t = attn[threshold - 1]
  deep = dev[threshold:].sum(0)
  rankings = {
      "oracle dev@T": dev[threshold],
      "oracle attn x dev@T": a_t * dev[threshold],
      "oracle dev>=T": deep,
      "oracle attn x dev>=T": a_t * deep,
      "oracle attn_l x dev_l": sum(attn[l] * dev[max(l, threshold)] for l in probe_layers),
  }
  policy = resolve(sx.ReuseConfig("sparsex", **base))
  for name, score in rankings.items():
    t0 = time.perf_counter()
    given = np.where(reused, score, 0.0)
    scorer = GivenRanking(segment_heads=pol.DEFAULT_SEGMENT_HEADS, given=given)
    logits, p, _ = _run(engine, prompt.request, dataclasses.replace(policy, scorer=scorer))
    record(f"{name} r={ratio:.2f} T={threshold}", logits, int(p.n_select), t0)
  seg = plan.segment_ids[reused]
  starts = {g: int(np.flatnonzero(plan.segment_ids == g)[0]) for g in np.unique(seg)}
  features = {  # per reused token, for offline analysis of runtime proxies (--features)
      "deviation": dev[:, reused].astype(np.float16),  # [L, n_reused]
      "attention": np.stack([attn[l][reused] for l in probe_layers]).astype(np.float16),
      "position": np.flatnonzero(reused).astype(np.int32),
      "in_segment": (np.flatnonzero(reused) - np.array([starts[g] for g in seg])).astype(np.int32),
      "segment": seg.astype(np.int32),
      "token": plan.token_ids[reused].astype(np.int32),
  }
  return {"key": prompt.key, "workload": prompt.workload, "split": prompt.split,
          "index": prompt.index, "item": prompt.item, "n_prompt": int(plan.n),
          "task_metric": prompt.task_metric, "answers": list(prompt.answers),
          "info": prompt.info, "results": results,
          "deviation_by_layer": dev[:, reused].mean(1).tolist()}, features


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", help="musique_s.json (without it the MuSiQue workload is skipped)")
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--split", default="dev", choices=("dev", "test"))
  ap.add_argument("--prompts", type=int, default=25)
  ap.add_argument("--workloads", default=",".join(wl.WORKLOADS))
  ap.add_argument("--ratio", type=float, default=0.15)
  ap.add_argument("--threshold", type=int, default=pol.DEFAULT_LAYER_THRESHOLD)
  ap.add_argument("--probe-layers", default="", help="layers whose attention the last oracle "
                  "reads (default: T-1 and five more spread over the sparse layers)")
  ap.add_argument("--quick", action="store_true", help="short prompts (CPU smoke run)")
  ap.add_argument("--time-budget-s", type=float, default=None)
  ap.add_argument("--out", default=os.path.join("docs", "results", "oracle_dev"))
  args = ap.parse_args(argv)
  t_start = time.perf_counter()
  workloads = [w for w in args.workloads.split(",") if w]
  items = None
  if "musique" in workloads:
    if args.data:
      items = txt.load_musique(args.data)
    else:
      workloads.remove("musique")
  engine = sx.Engine.from_pretrained(args.model, dtype="float32", num_pages=64)
  tok = engine.tokenizer
  sizes = wl.Sizes.quick() if args.quick else wl.Sizes()
  prompts = wl.build(tok, workloads, args.split, args.prompts, sizes, 0, items)
  every = [p for ps in prompts.values() for p in ps]
  engine = sx.Engine(engine.config, engine.params, tok, page_size=16,
                     num_pages=runner._pages_for(tok, every, 16))
  n_layers, t = engine.config.n_layers, args.threshold
  if not 1 <= t < n_layers:
    raise SystemExit(f"--threshold must be in [1, {n_layers - 1}], got {t}")
  if args.probe_layers:
    probe = sorted({int(x) for x in args.probe_layers.split(",")} | {t - 1})
  else:
    probe = sorted({t - 1} | {int(x) for x in np.linspace(t, n_layers - 2, 5).round()})
  if probe[0] < 0 or probe[-1] > n_layers - 2:
    raise SystemExit(f"--probe-layers must be in [0, {n_layers - 2}], got {probe}")
  r = args.ratio
  labels = (["full", "naive", f"sparsex[axn+heads2] r={r:.2f} T={t}",
             f"sparsex[axn+heads2+fresh] r={r:.2f} T={t}"]
            + [f"{n} r={r:.2f} T={t}" for n in ("oracle dev@T", "oracle attn x dev@T",
                                                 "oracle dev>=T", "oracle attn x dev>=T",
                                                 "oracle attn_l x dev_l")])
  meta = {**runner._device_info(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": "python scripts/oracle_selection.py " + shlex.join(sys.argv[1:]
                                                                        if argv is None else argv),
          "code_rev": os.environ.get("SPARSEX_EVAL_REV") or runner._git_rev(),
          "model": args.model, "model_name": engine.config.name, "n_layers": n_layers,
          "dtype": "float32", "split": args.split, "seed": 0, "quick": args.quick,
          "prompts_per_workload": args.prompts, "first_prompt": 0, "workloads": workloads,
          "sizes": dict(vars(sizes)), "max_new_tokens": 1, "probe_layers": probe,
          "methods": [{"label": lb, "family": "oracle" if lb.startswith("oracle") else
                       lb.split("[")[0].split(" ")[0], "ratio": None if lb in ("full", "naive")
                       else r, "threshold": None if lb in ("full", "naive") else t}
                      for lb in labels],
          "default_label": labels[2], "notes": [], "complete": False}
  data = {"meta": meta, "prompts": []}
  features = {}
  stopped = False
  for i in range(args.prompts):
    for w in workloads:
      if i >= len(prompts[w]):
        continue
      if args.time_budget_s and time.perf_counter() - t_start > args.time_budget_s:
        stopped = True
        break
      rec, feats = evaluate(engine, prompts[w][i], r, t, probe)
      data["prompts"].append(rec)
      features.update({f"{rec['key']}/{k}": v for k, v in feats.items()})
      res = rec["results"]
      print(f"[{w} {i + 1}] {rec['n_prompt']} tokens, {time.perf_counter() - t_start:.0f} s: "
            + ", ".join(f"{k.split(' r=')[0]} {v['kl']:.4f}" for k, v in res.items()
                        if k != "full"), flush=True)
    if stopped:
      break
    runner._write_json(args.out + ".json", data)
    np.savez_compressed(args.out + "_features.npz", **features)
  meta["complete"] = not stopped
  meta["elapsed_s"] = time.perf_counter() - t_start
  runner._write_json(args.out + ".json", data)
  np.savez_compressed(args.out + "_features.npz", **features)
  report.render([args.out + ".json"], args.out, [], n_boot=1000)
  return 0


if __name__ == "__main__":
  sys.exit(main())
