"""How much of the naive->full gap can *any* ranking of the reused tokens recover at r = 0.15?

A diagnostic for issue 10's 90% target, on the same prompts and metric as `sparsex eval`. The
default rule (sx.SparseX) ranks reused token j by the Sparse-Q attention (layers T - 1 and T
summed at T >= 2, T - 1 alone at T = 1) times the norm of its K/V deviation at layer T, the only
sparse layer where the fresh K/V can be computed exactly (every layer below ran in full). Above T
the deviation is unobservable at run time. This study measures it anyway, from a full prefill of
the same prompt, and ranks by it:

  oracle dev@T           |dK_T, dV_T|: the deviation alone at layer T (CacheBlend's signal, norm)
  oracle attn x dev@T    the default rule's attention x |dK_T, dV_T|: the default rule rebuilt
                         from the pools (checks this study's machinery: it must match the rule)
  oracle dev>=T          sum over every sparse layer l >= T of |dK_l, dV_l|
  oracle attn x dev>=T   the default rule's attention x that sum
  oracle attn_l x dev_l  sum over probed layers l of attention at l x |dK_l, dV_l| (attention
                         at l comes from a prefill whose full layers end at l)

every one in the default rule's program: its 2 segment heads, the same budget ceil(r * n_reused),
layer T's fresh K/V written for every token, the ranking given by the host (GivenRanking).
"Deviation" is full prefill's K/V minus naive reuse's (the cached K/V, re-rotated): the error an
unselected token's K/V would carry if nothing else changed. If even these rankings stay far below
90%, selection at r = 0.15 is not where the rest of the gap is. The paper's rule runs beside them.

Uses the engine's internals (the store, the pool) to read K/V: research code, not an API. Writes
`sparsex eval`'s JSON format, so `sparsex eval --report OUT.json` renders its tables and paired
intervals (every comparison is against the default rule).

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

import sparsex_jax as sx
from sparsex_jax.labels import EXACT, NEW, REUSED
from sparsex_jax.prompt import tokenize
from sparsex_jax.reuse import DEFAULT_LAYER_THRESHOLD, Selection, ceil_fraction
from sparsex_jax.reuse.base import reused_segments
from sparsex_jax.reuse.sparsex import overflow_tokens
from sparsex_jax.step_runner import prefill_and_commit
from sparsex_jax.research import methods as mth
from sparsex_jax.research import metrics as mt
from sparsex_jax.research import report
from sparsex_jax.research import runner
from sparsex_jax.research import text as txt
from sparsex_jax.research import workloads as wl

ORACLES = ("oracle dev@T", "oracle attn x dev@T", "oracle dev>=T", "oracle attn x dev>=T",
           "oracle attn_l x dev_l")


@dataclasses.dataclass(frozen=True)
class RefreshThenGiven:
  """The default rule's scoring step without its ranking: layer T's fresh K/V written for every
  token (as the default does), the host's scores returned."""

  uses_probe: ClassVar[bool] = False

  def __call__(self, inputs, pool):
    _, pool = inputs.deviation(pool, refresh=True)
    return inputs.batch.given_score, pool


@dataclasses.dataclass(frozen=True)
class GivenRanking(sx.SparseX):
  """The default rule's budget, segment heads and program, ranked by scores computed outside the
  prefill (`given`, one per prompt token)."""

  mode: ClassVar[str] = "oracle"
  given: np.ndarray | None = dataclasses.field(default=None, compare=False, hash=False)

  def select(self, plan, layer_threshold: int) -> Selection:
    if self.given is None or self.given.shape != (plan.n,):
      raise ValueError(f"given scores of shape {getattr(self.given, 'shape', None)}, "
                       f"the plan has {plan.n} tokens")
    return dataclasses.replace(super().select(plan, layer_threshold),
                               given_score=self.given.astype(np.float32))

  def device_scorer(self, layer_threshold: int):
    return RefreshThenGiven()


@dataclasses.dataclass(frozen=True)
class ForcedSet(sx.SparseX):
  """Exactly the tokens of `chosen` recomputed (in the default rule's program: layer T's fresh
  K/V written for every token), whatever the budget: the greedy oracle's probe."""

  mode: ClassVar[str] = "oracle-set"
  segment_heads: int = 0
  chosen: np.ndarray | None = dataclasses.field(default=None, compare=False, hash=False)

  def select(self, plan, layer_threshold: int) -> Selection:
    if self.chosen is None or self.chosen.shape != (plan.n,):
      raise ValueError(f"chosen of shape {getattr(self.chosen, 'shape', None)}, the plan has "
                       f"{plan.n} tokens")
    forced = self.chosen & (plan.labels == REUSED) & ~plan.sparse_q
    return Selection(n_select=int(forced.sum()), forced=forced,
                     given_score=np.zeros(plan.n, np.float32))

  def device_scorer(self, layer_threshold: int):
    return RefreshThenGiven()


def greedy_blocks(plan, n_blocks: int = 48) -> list[np.ndarray]:
  """The reused tokens cut into blocks of b = ceil(n_reused / n_blocks) (at least 8) consecutive
  tokens, never across a segment boundary: the greedy oracle's units."""
  n_reused = int(np.sum(plan.labels == REUSED))
  b = max(8, -(-n_reused // n_blocks))
  out = []
  for members in reused_segments(plan):
    members = members[~plan.sparse_q[members]]
    out.extend(members[i:i + b] for i in range(0, members.size, b))
  return out


def greedy_oracle(engine, request, plan, full_logits, ratio: float, threshold: int):
  """The true oracle at a budget of ceil(r * n_reused) tokens: blocks added one at a time,
  each round the block whose recomputation lowers the first-token KL from full prefill most
  (every candidate measured by a prefill). Returns (KL after each round, the chosen mask)."""
  blocks = greedy_blocks(plan)
  budget = ceil_fraction(ratio, int(np.sum(plan.labels == REUSED)))
  chosen = np.zeros(plan.n, bool)
  curve, left = [], list(range(len(blocks)))
  while left and chosen.sum() < budget:
    best = None
    for i in left:
      trial = chosen.copy()
      trial[blocks[i]] = True
      logits = engine.prefill_logits(request, reuse=ForcedSet(
          recompute_ratio=ratio, layer_threshold=threshold, chosen=trial, update_caches=False))
      kl = mt.kl_divergence(full_logits, np.asarray(logits, np.float32))
      if best is None or kl < best[0]:
        best = (kl, i)
    chosen[blocks[best[1]]] = True
    left.remove(best[1])
    curve.append(best[0])
  return curve, chosen


# The rules the oracle rankings are compared with: the ones that recompute exactly ceil(r n)
# ranked tokens (the paper's published rule recomputes its overflow and tail blocks besides).
RULES_COMPARED = ("sparsex", "sparsex-attention")

def _capture(engine, request: sx.Request, method: sx.ReuseMethod):
  """One prefill under `method`: float32 logits [V], the plan, and the K and V of every prompt
  position in every layer after it, [L, n, K*H] each (read from the engine's pool)."""
  policy = method.resolve(engine.config)
  prompt = tokenize(request, engine.tokenizer, engine.config, 0)
  with engine.store.acquire([prompt], policy, 0) as leases, engine.kv.recovering():
    plans, out, _ = prefill_and_commit(engine, [prompt], leases, policy)
    plan = plans[0]
    logits = np.asarray(out.logits[0], np.float32)
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
  method = sx.SparseXAttention(recompute_ratio=ratio, layer_threshold=layer + 1, update_caches=False)
  _, plan = engine.prefill_logits(request, reuse=method, return_plan=True)
  out = np.zeros(plan.labels.size, np.float64)
  out[plan.reused_positions] = plan.scores
  return out


def rule_attention(attention: dict, threshold: int) -> np.ndarray:
  """The attention the default rule reads (sparsex_jax/reuse/sparsex.py): layers T - 1 and T
  summed at T >= 2, T - 1 alone at T = 1."""
  return attention[threshold - 1] + (attention[threshold] if threshold >= 2 else 0.0)


def probe_layers(n_layers: int, threshold: int, asked: str = "") -> list[int]:
  """The layers whose attention is read: the default rule's (T - 1, and T at T >= 2) and the
  asked ones (default: five spread over the sparse layers)."""
  rule = {threshold - 1} | ({threshold} if threshold >= 2 else set())
  if asked:
    extra = {int(x) for x in asked.split(",")}
  else:
    extra = {int(x) for x in np.linspace(threshold, n_layers - 2, 5).round()}
  return sorted(rule | extra)


def evaluate(engine, prompt: wl.Prompt, ratio: float, threshold: int, probe: list[int],
             greedy: bool = False):
  """Every method and ranking on one prompt: (its `sparsex eval` record, per-token features)."""
  engine.clear_caches()
  for step in prompt.warm:
    runner.apply_warm(engine, step)
  full_logits, plan, full_kv = _capture(engine, prompt.request, sx.Full(update_caches=False))
  naive_logits, plan, naive_kv = _capture(engine, prompt.request, sx.Naive(update_caches=False))
  dev = _deviation(full_kv, naive_kv)
  del full_kv, naive_kv
  reused = plan.labels == REUSED
  n_reused = int(reused.sum())
  results = {}

  def record(label, logits, n_rec, t0):
    results[label] = {"kl": mt.kl_divergence(full_logits, logits),
                      "top1": mt.top1_agree(full_logits, logits), "em": True, "task": 0.0,
                      "match_len": 0, "text": "", "n_generated": 0,
                      "n_exact": int(np.sum(plan.labels == EXACT)), "n_reused": n_reused,
                      "n_new": int(np.sum(plan.labels == NEW)), "n_recomputed": n_rec,
                      "frac_recomputed": n_rec / n_reused if n_reused else 0.0,
                      "ttft_s": time.perf_counter() - t0, "prefill_s": time.perf_counter() - t0}

  def run(label, method):
    t0 = time.perf_counter()
    logits, p = engine.prefill_logits(prompt.request, reuse=method, return_plan=True)
    record(label, logits, int(p.selected_positions.size), t0)

  record("full", full_logits, 0, time.perf_counter())
  record("naive", naive_logits, 0, time.perf_counter())
  for family in RULES_COMPARED:
    m = mth.rule_method(family, ratio, threshold)
    run(m.label, m.config)

  attn = {l: _attention_at(engine, prompt.request, l, ratio) for l in probe}
  a_rule = rule_attention(attn, threshold)
  deep = dev[threshold:].sum(0)
  rankings = {
      "oracle dev@T": dev[threshold],
      "oracle attn x dev@T": a_rule * dev[threshold],
      "oracle dev>=T": deep,
      "oracle attn x dev>=T": a_rule * deep,
      "oracle attn_l x dev_l": sum(attn[l] * dev[max(l, threshold)] for l in probe),
  }
  for name, score in rankings.items():
    run(f"{name} r={ratio:.2f} T={threshold}",
        GivenRanking(recompute_ratio=ratio, layer_threshold=threshold,
                     given=np.where(reused, score, 0.0), update_caches=False))
  if greedy:
    t0 = time.perf_counter()
    curve, chosen = greedy_oracle(engine, prompt.request, plan, full_logits, ratio, threshold)
    logits = engine.prefill_logits(prompt.request, reuse=ForcedSet(
        recompute_ratio=ratio, layer_threshold=threshold, chosen=chosen, update_caches=False))
    record(f"oracle greedy-KL r={ratio:.2f} T={threshold}", np.asarray(logits, np.float32),
           int(chosen.sum()), t0)
  seg = plan.segment_ids[reused]
  starts = {g: int(np.flatnonzero(plan.segment_ids == g)[0]) for g in np.unique(seg)}
  alone = {s.content for step in prompt.warm if step.kind == "segments" for s in step.segments}
  seg_alone = np.array([prompt.request.segments[int(g)].content in alone for g in seg])
  seg_len = {g: int(np.sum(plan.segment_ids[reused] == g)) for g in np.unique(seg)}
  features = {  # per reused token, for offline analysis of runtime proxies
      "deviation": dev[:, reused].astype(np.float16),  # [L, n_reused]
      "attention": np.stack([attn[l][reused] for l in probe]).astype(np.float16),
      "position": np.flatnonzero(reused).astype(np.int32),
      "in_segment": (np.flatnonzero(reused) - np.array([starts[g] for g in seg])).astype(np.int32),
      "segment": seg.astype(np.int32),
      "token": plan.token_ids[reused].astype(np.int32),
      "segment_length": np.array([seg_len[g] for g in seg], np.int32),
      "cached_alone": seg_alone,
      "next_to_new": overflow_tokens(plan, 16)[reused],
  }
  if greedy:
    features["greedy_chosen"] = chosen[reused]
    features["greedy_curve"] = np.asarray(curve, np.float32)
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
  ap.add_argument("--threshold", type=int, default=DEFAULT_LAYER_THRESHOLD)
  ap.add_argument("--probe-layers", default="", help="layers whose attention the last oracle "
                  "reads, beside the default rule's T-1 and T (default: five spread over the "
                  "sparse layers)")
  ap.add_argument("--quick", action="store_true", help="short prompts (CPU smoke run)")
  ap.add_argument("--greedy-prompts", type=int, default=0, help="prompts per workload (the "
                  "first ones) that also run the greedy KL oracle (a prefill per block per "
                  "round: about 400 prefills a prompt)")
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
  n_layers, t, r = engine.config.n_layers, args.threshold, args.ratio
  # the attention at a layer l is read by a prefill whose full layers are [0, l]: l < L - 1
  if not 1 <= t <= n_layers - 2:
    raise SystemExit(f"--threshold must be in [1, {n_layers - 2}], got {t}")
  probe = probe_layers(n_layers, t, args.probe_layers)
  if probe[0] < 0 or probe[-1] > n_layers - 2:
    raise SystemExit(f"--probe-layers must be in [0, {n_layers - 2}], got {probe}")
  rules = [mth.rule_method(f, r, t) for f in RULES_COMPARED]
  methods = ([{"label": lb, "family": lb, "ratio": None, "threshold": None}
              for lb in ("full", "naive")]
             + [{"label": m.label, "family": m.family, "ratio": r, "threshold": t} for m in rules]
             + [{"label": f"{n} r={r:.2f} T={t}", "family": "oracle", "ratio": r,
                 "threshold": t} for n in ORACLES + (("oracle greedy-KL",)
                                                      if args.greedy_prompts else ())])
  meta = {**runner._device_info(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": "python scripts/oracle_selection.py " + shlex.join(sys.argv[1:]
                                                                        if argv is None else argv),
          "code_rev": os.environ.get("SPARSEX_EVAL_REV") or runner._git_rev(),
          "model": args.model, "model_name": engine.config.name, "n_layers": n_layers,
          "dtype": "float32", "split": args.split, "seed": 0, "quick": args.quick,
          "prompts_per_workload": args.prompts, "first_prompt": 0, "workloads": workloads,
          "sizes": dataclasses.asdict(sizes), "max_new_tokens": 1, "probe_layers": probe,
          "methods": methods, "default_label": rules[0].label, "labels": mth.LABELS,
          "notes": [], "complete": False}
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
      rec, feats = evaluate(engine, prompts[w][i], r, t, probe, greedy=i < args.greedy_prompts)
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
