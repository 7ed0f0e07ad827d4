"""Summaries of raw `sparsex eval` JSON: tables (markdown), the per-genre and per-shape
breakdown of each workload family, the leave-one-family-out selection (selection.py), the T x r
heatmap, the quality-vs-TTFT plane (one panel per family) and a short results page.

Statistics (see metrics.py): every mean comes with a 95% percentile bootstrap interval over
prompts. Gap recovered is computed per workload on means, 1 - mean KL(method) / mean KL(naive),
with naive's and the method's KL resampled jointly; its mean over workloads resamples each
workload on its own (a stratified bootstrap) and averages the draws. A difference between two
methods is resampled paired (the same prompts for both) and reported as a tie when its interval
contains 0.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Sequence

import numpy as np

from sparsex_jax.research import methods as mth
from sparsex_jax.research import metrics as mt
from sparsex_jax.research import selection

PER_PROMPT = ("kl", "top1", "em", "task")
COMPARE_WITH = ("epic r=0.15", "cacheblend r=0.15")
RULE_NAMES = {"sparsex": "the default rule", "sparsex-paper": "the paper's rule",
              "sparsex-attention": "the paper's attention-only rule"}


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def _open_text(path: str):
  """A result file, plain or gzip-compressed (.gz: the archived rounds in docs/results)."""
  return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def load_runs(paths: Sequence[str]) -> tuple[list[dict], list[dict]]:
  """(metas, prompts) of raw JSON files. Runs that split the methods of the same prompts join:
  a prompt seen in several files gets every file's methods, and a method measured twice keeps
  the later file's result."""
  metas, by_key = [], {}
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such eval JSON")
    try:
      with _open_text(path) as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or "meta" not in data or "prompts" not in data:
      raise ValueError(f"{path}: not a `sparsex eval` JSON (needs 'meta' and 'prompts')")
    # A merged report keeps every run's meta under "runs".
    runs = data["meta"].get("runs") or [data["meta"]]
    if any(m.get("labels") != mth.LABELS for m in runs):
      runs, data["prompts"] = _relabelled(runs, data["prompts"])
    metas.extend(runs)
    for p in data["prompts"]:
      earlier = by_key.get(p["key"])
      by_key[p["key"]] = p if earlier is None else {
          **p, "results": {**earlier["results"], **p["results"]}}
  splits = {m["split"] for m in metas}
  if len(splits) > 1:
    raise ValueError(f"refusing to merge runs of different splits: {sorted(splits)}")
  return metas, list(by_key.values())


def _relabelled(metas: list[dict], prompts: list[dict]) -> tuple[list[dict], list[dict]]:
  """Runs written before today's labels, in today's labels (methods.current_label)."""
  new = mth.current_label

  def method(m):  # a removed rule ("sparsex[axn+heads2] ...") becomes a family of its own
    label = new(m["label"])
    return {**m, "label": label,
            "family": label.split(" ")[0] if m["family"] == "sparsex" else m["family"]}
  metas = [{**m, "labels": mth.LABELS, "methods": [method(x) for x in m["methods"]],
            "default_label": new(m["default_label"])} for m in metas]
  prompts = [{**p, "results": {new(k): v for k, v in p["results"].items()}} for p in prompts]
  return metas, prompts


def merged_meta(metas: list[dict]) -> dict:
  """One meta for joined runs: the first run's settings, every run's methods (each label once,
  in the order first seen), the newest run's default."""
  if len(metas) == 1:
    return metas[0]
  methods, seen = [], set()
  for m in metas:
    for method in m["methods"]:
      if method["label"] not in seen:
        seen.add(method["label"])
        methods.append(method)
  return {**metas[0], "methods": methods, "default_label": metas[-1]["default_label"]}


def load_ttft(paths: Sequence[str]) -> dict[str, dict]:
  """label -> {ttft_ms, preset, n_prompt, device, file} from bench_ttft JSON (later files win)."""
  out = {}
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such TTFT JSON (scripts/bench_ttft.py output)")
    with _open_text(path) as f:
      data = json.load(f)
    rows = data.get("ttft") if isinstance(data, dict) else None
    if not isinstance(rows, list):
      raise ValueError(f"{path}: not a bench_ttft JSON (needs a 'ttft' list)")
    relabel = mth.current_label if data.get("labels") != mth.LABELS else str
    for i, r in enumerate(rows):
      if "policy" not in r or "ttft_ms_median" not in r:
        raise ValueError(f"{path}: ttft[{i}] lacks policy or ttft_ms_median")
      out[relabel(r["policy"])] = {"ttft_ms": float(r["ttft_ms_median"]), "preset": r.get("preset"),
                          "n_prompt": r.get("n_prompt"), "device": data.get("device"),
                          "file": os.path.basename(path)}
  return out


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------

def _values(prompts: list[dict], label: str, key: str) -> np.ndarray:
  return np.array([float(p["results"][label][key]) for p in prompts], np.float64)


def _ok(p: dict, *labels: str) -> bool:
  return all(lab in p["results"] and "error" not in p["results"][lab] for lab in labels)


def summarize(metas: list[dict], prompts: list[dict], n_boot: int = 2000, seed: int = 0) -> dict:
  meta = merged_meta(metas)
  labels = [m["label"] for m in meta["methods"]]
  default = meta["default_label"]
  workloads = [w for w in meta["workloads"] if any(p["workload"] == w for p in prompts)]
  summary = {"workloads": {}, "overall": {}, "pooled": {}, "comparisons": [], "n_boot": n_boot,
             "default_label": default}
  draws = {}  # (workload, label) -> bootstrap draws of gap recovered, on that workload's prompts
  bases = {}  # workload -> (its prompts with full and naive, their bootstrap indices)
  for w in workloads:
    ps = [p for p in prompts if p["workload"] == w and _ok(p, "full")]
    base = [p for p in ps if _ok(p, "naive")]
    idx = mt.bootstrap_indices(len(base), n_boot, seed) if base else None
    bases[w] = (base, idx)
    ws = {"n": len(ps), "task_metric": ps[0]["task_metric"] if ps else None,
          "mean_prompt_tokens": float(np.mean([p["n_prompt"] for p in ps])) if ps else 0.0,
          "methods": {}}
    for label in labels:
      good = [p for p in ps if _ok(p, label)]
      if not good:
        continue
      s = {"n": len(good), "errors": len(ps) - len(good)}
      for key in PER_PROMPT:
        s[key] = mt.mean_ci(_values(good, label, key), n_boot, seed)
      s["task_minus_full"] = mt.mean_ci(
          _values(good, label, "task") - _values(good, "full", "task"), n_boot, seed)
      for key in ("n_reused", "n_recomputed", "frac_recomputed", "match_len"):
        s[key] = float(np.mean(_values(good, label, key)))
      s["ttft_ms_here"] = 1e3 * float(np.median(_values(good, label, "ttft_s")))
      s["prefill_ms_here"] = 1e3 * float(np.median(_values(good, label, "prefill_s")))
      if base and all(_ok(p, label) for p in base):
        kl_m, kl_n = _values(base, label, "kl"), _values(base, "naive", "kl")
        d = mt.gap_recovered_draws(kl_m, kl_n, idx)
        draws[(w, label)] = d
        s["gap_recovered"] = {"n": len(base), "mean": mt.gap_recovered(kl_m, kl_n),
                              "ci": list(mt.percentile_ci(d))}
      ws["methods"][label] = s
    summary["workloads"][w] = ws

  # Over workloads: the plain mean of per-workload values; stratified bootstrap draws.
  for label in labels:
    have = [w for w in workloads if (w, label) in draws]
    if not have or len(have) < len(workloads):
      continue
    point = float(np.mean([summary["workloads"][w]["methods"][label]["gap_recovered"]["mean"]
                           for w in have]))
    d = np.mean([draws[(w, label)] for w in have], axis=0)
    summary["overall"][label] = {"gap_recovered": {"mean": point, "ci": list(mt.percentile_ci(d))},
                                 "workloads": have}
    summary["pooled"][label] = _pooled(bases, label, have)
  # Paired differences of the over-workload gap recovered (same resamples for both methods).
  refs = [default] + [c for c in COMPARE_WITH if c in labels]
  for ref in refs:
    if ref not in summary["overall"]:
      continue
    for label in labels:
      if label == ref or label not in summary["overall"]:
        continue
      ws_ = summary["overall"][label]["workloads"]
      d = np.mean([draws[(w, label)] - draws[(w, ref)] for w in ws_], axis=0)
      diff = summary["overall"][label]["gap_recovered"]["mean"] - summary["overall"][ref][
          "gap_recovered"]["mean"]
      ci = mt.percentile_ci(d)
      summary["comparisons"].append({"method": label, "vs": ref, "metric": "gap_recovered",
                                     "diff": diff, "ci": list(ci),
                                     "verdict": mt.diff_verdict(ci)})
  summary["breakdown"] = breakdown(prompts, workloads, labels, n_boot, seed)
  # The draws, for leave_one_family_out (selection.py); not written to JSON (render drops "_"
  # keys).
  summary["_draws"] = {w: {lab: d for (w_, lab), d in draws.items() if w_ == w}
                       for w in workloads}
  return summary


def _pooled(bases: dict, label: str, workloads: list[str]) -> dict:
  """Gap recovered on every prompt of every workload at once, 1 - mean KL(method) / mean
  KL(naive) over all of them (workloads weigh by their prompt counts and their KL scale); the
  bootstrap resamples each workload's prompts with its own indices (stratified)."""
  num = den = 0.0
  dnum, dden = 0.0, 0.0
  n = 0
  for w in workloads:
    base, idx = bases[w]
    kl_m, kl_n = _values(base, label, "kl"), _values(base, "naive", "kl")
    num, den, n = num + kl_m.sum(), den + kl_n.sum(), n + len(base)
    dnum, dden = dnum + kl_m[idx].sum(axis=1), dden + kl_n[idx].sum(axis=1)
  mean = float(1.0 - num / den) if den > 0 else float("nan")
  with np.errstate(divide="ignore", invalid="ignore"):
    d = np.where(dden > 0, 1.0 - dnum / dden, np.nan)
  return {"n": n, "gap_recovered": {"mean": mean, "ci": list(mt.percentile_ci(d))}}


BREAKDOWN = ("genre", "shape")  # info keys of a prompt that split a workload
MIN_CELL = 3  # a breakdown cell of fewer prompts prints "n/a (k)"


def prompt_tag(p: dict, key: str) -> str:
  """A prompt's genre or shape ("-" in result files written before they were recorded)."""
  v = (p.get("info") or {}).get(key)
  return str(v) if v not in (None, "") else "-"


def breakdown(prompts: list[dict], workloads: list[str], labels: list[str], n_boot: int = 2000,
              seed: int = 0) -> dict:
  """workload -> key ("genre", "shape") -> value -> {"n": prompts with full and naive,
  "methods": label -> {"n", "mean", "ci"}}: gap recovered on that cell's prompts alone. A key
  every prompt of a workload lacks is left out (old result files)."""
  out, idxs = {}, {}
  for w in workloads:
    base = [p for p in prompts if p["workload"] == w and _ok(p, "full", "naive")]
    out[w] = {}
    for key in BREAKDOWN:
      values = sorted({prompt_tag(p, key) for p in base})
      if values == ["-"]:
        continue
      cells = {}
      for v in values:
        ps = [p for p in base if prompt_tag(p, key) == v]
        cell = {"n": len(ps), "methods": {}}
        for label in labels:
          good = [p for p in ps if _ok(p, label)]
          if not good:
            continue
          kl_m, kl_n = _values(good, label, "kl"), _values(good, "naive", "kl")
          if len(good) not in idxs:  # one set of resamples per size: paired across methods
            idxs[len(good)] = mt.bootstrap_indices(len(good), n_boot, seed)
          idx = idxs[len(good)]
          cell["methods"][label] = {
              "n": len(good), "mean": mt.gap_recovered(kl_m, kl_n),
              "ci": list(mt.percentile_ci(mt.gap_recovered_draws(kl_m, kl_n, idx)))}
        cells[v] = cell
      out[w][key] = cells
  return out


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
  return "n/a" if not np.isfinite(x) else f"{100 * x:.0f}%"


def _ci_pct(s: dict) -> str:
  lo, hi = s["ci"]
  if not np.isfinite(s["mean"]):
    return "n/a"
  return f"{100 * s['mean']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def _ci_num(s: dict, fmt: str = ".3f") -> str:
  lo, hi = s["ci"]
  return f"{s['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def key_methods(meta: dict, summary: dict, highlight: Sequence[str] = ()) -> list[str]:
  """The methods the compact tables show: every method outside the rules' grids (full, naive,
  the baselines), each rule's default cell (the first of its grid as method_grid orders it:
  the rule at its shipped defaults, e.g. T = 0.15 L for the paper's), the run's default and the
  highlighted labels, in the run's order."""
  labels = [m["label"] for m in meta["methods"]]
  keep = {m["label"] for m in meta["methods"] if m["family"] in mth.BASELINES}
  for family in dict.fromkeys(m["family"] for m in meta["methods"]):
    if family in mth.BASELINES:
      continue
    keep.add(next(m["label"] for m in meta["methods"] if m["family"] == family))
  keep |= {summary["default_label"]} | set(highlight)
  return [lab for lab in labels if lab in keep]


def breakdown_markdown(summary: dict, labels: Sequence[str], out_name: str) -> list[str]:
  """Per workload, the key methods' gap recovered per genre and per shape."""
  bd = summary.get("breakdown") or {}
  lines = ["## Gap recovered by genre and shape, per workload", ""]
  if not any(bd.get(w) for w in bd):
    return lines + ["The prompts carry no genre or shape (result files written before they were "
                    "recorded): no breakdown."]
  lines += [f"Each cell: gap recovered on that cell's prompts alone; n/a (k) where fewer than "
            f"{MIN_CELL} prompts. Naive (0%) and full (100%) are left out. 95% intervals: "
            f"`{out_name}.json`, summary.breakdown."]
  for w, keys in bd.items():
    cols = []  # (key, value, cell) of the keys that split this workload
    single = []
    for key, cells in keys.items():
      if len(cells) < 2:
        single += [f"one {key}, {v}" for v in cells]
        continue
      cols += [(key, v, c) for v, c in cells.items()]
    lines += ["", f"### {w}" + (f" ({'; '.join(single)})" if single else ""), ""]
    if not cols:
      lines.append("Nothing to split: see the workload's column above.")
      continue
    lines += ["| method | " + " | ".join(f"{k}: {v} (n={c['n']})" for k, v, c in cols) + " |",
              "| --- | " + " | ".join("---" for _ in cols) + " |"]
    for label in labels:
      if label in ("full", "naive"):
        continue
      cells = []
      for _, _, c in cols:
        m = c["methods"].get(label)
        if m is None:
          cells.append("-")
        elif m["n"] < MIN_CELL:
          cells.append(f"n/a ({m['n']})")
        else:
          cells.append(_pct(m["mean"]) + (f" (n={m['n']})" if m["n"] != c["n"] else ""))
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def _comparison(summary: dict, label: str, ref: str) -> dict | None:
  for c in summary["comparisons"]:
    if c["method"] == label and c["vs"] == ref:
      return c
  return None


def markdown(metas: list[dict], summary: dict, ttft: dict, ttft_missing: list[str],
             out_name: str, highlight: Sequence[str] = ()) -> str:
  meta = merged_meta(metas)
  default = summary["default_label"]
  labels = [m["label"] for m in meta["methods"]]
  workloads = list(summary["workloads"])
  lines = [f"# `sparsex eval`: {meta['split']} split", ""]
  lines.append(f"Model {meta['model_name']} ({meta['model']}, {meta['dtype']}), device "
               f"{meta['device']} ({meta['platform']}), jax {meta['jax']}, python "
               f"{meta['python']}, code {meta.get('code_rev') or 'unknown'}.")
  tiers = sorted({m.get("far_tier", "native") for m in metas})
  if tiers != ["native"]:
    lines.append(f"Cached segments reused as a far tier in {', '.join(tiers)} gives them back "
                 "(`--far-tier`: quantised, then dequantised).")
  for m in metas:
    for r in m.get("runs_before", []):  # earlier runs this one resumed
      lines.append(f"- {r['date']}: `{r['command']}` ({r.get('elapsed_s') or 0:.0f} s, "
                   f"{r.get('device')}, code {r.get('code_rev')}; resumed by the next line)")
    lines.append(f"- {m['date']}: `{m['command']}` ({m.get('elapsed_s', 0):.0f} s"
                 f"{'' if m.get('complete') else ', stopped early'})")
  for m in metas:
    for note in m.get("notes", []):
      lines.append(f"- note: {note}")
  sw = summary["workloads"]
  lines += ["", "Prompts per workload: " + ", ".join(
      f"{w} {sw[w]['n']} (mean {sw[w]['mean_prompt_tokens']:.0f} tokens)" for w in workloads)
      + f". Bootstrap: {summary['n_boot']} resamples, 95% percentile intervals. Default: `"
      + default + "`.", ""]

  lines += ["## Gap recovered (1 - mean KL(method) / mean KL(naive)), per workload and mean", "",
            "| method | " + " | ".join(workloads) + " | mean over workloads [95% CI] | "
            f"pooled over prompts | vs {default} |",
            "| --- | " + " | ".join("---" for _ in workloads) + " | --- | --- | --- |"]
  for label in labels:
    if label in ("full",):
      continue
    cells = []
    for w in workloads:
      s = summary["workloads"][w]["methods"].get(label, {}).get("gap_recovered")
      cells.append(_pct(s["mean"]) if s else "n/a")
    o = summary["overall"].get(label)
    c = _comparison(summary, label, default)
    vs = (f"{100 * c['diff']:+.0f} pts [{100 * c['ci'][0]:+.0f}, {100 * c['ci'][1]:+.0f}]: "
          f"{c['verdict']}") if c else ("(default)" if label == default else "n/a")
    name = f"**{label}**" if label == default else label
    pooled = summary.get("pooled", {}).get(label)
    lines.append(f"| {name} | " + " | ".join(cells) + f" | "
                 f"{_ci_pct(o['gap_recovered']) if o else 'n/a'} | "
                 f"{_pct(pooled['gap_recovered']['mean']) if pooled else 'n/a'} | {vs} |")
  lines += ["", "Mean over workloads: each workload's gap recovered, averaged. Pooled: 1 - mean "
            "KL(method) / mean KL(naive) over the prompts of all workloads at once (a workload "
            "weighs by its prompts and its KL scale)."]
  if summary.get("lofo"):
    lines += ["", "## Leave-one-family-out selection", "",
              "For each workload family held out: the candidate with the best mean gap recovered "
              "on the other families, and how it does on the held-out one against the reference "
              "and the baselines (paired bootstrap on that family's prompts). Candidates: "
              + ", ".join(f"`{c}`" for c in summary["lofo"]["candidates"]) + ".", ""]
    lines += selection.markdown(summary["lofo"])
  lines += [""] + breakdown_markdown(summary, key_methods(meta, summary, highlight), out_name)

  # A KL-only run (--max-new-tokens 1) generates no answer: no task score, no exact match.
  n_tokens = int(meta.get("max_new_tokens") or 32)
  decoded = n_tokens > 1
  if not decoded:
    lines += ["", "KL-only run (`--max-new-tokens 1`): first-token metrics only; no task score "
              "and no exact match were measured."]
  for w in workloads:
    ws = summary["workloads"][w]
    metric = "SQuAD token F1" if ws["task_metric"] == "f1" else "answer in output"
    decode_cols = f" exact {n_tokens} | task | task - full |" if decoded else ""
    lines += ["", f"## {w}: {ws['n']} prompts, mean {ws['mean_prompt_tokens']:.0f} tokens"
              + (f", task = {metric}" if decoded else ""), "",
              "| method | KL mean [95% CI] | KL median | top-1 |" + decode_cols
              + " gap recovered | recomputed (of reused) | TTFT here (ms) |",
              "| --- | --- | --- | --- |" + " --- | --- | --- |" * decoded + " --- | --- | --- |"]
    for label in labels:
      s = ws["methods"].get(label)
      if s is None:
        continue
      gr = _ci_pct(s["gap_recovered"]) if "gap_recovered" in s else "n/a"
      err = f" ({s['errors']} errors)" if s["errors"] else ""
      tmf = s["task_minus_full"]
      decode_cells = (f" {_ci_pct(s['em'])} | {_ci_pct(s['task'])} | {100 * tmf['mean']:+.1f} "
                      f"[{100 * tmf['ci'][0]:+.1f}, {100 * tmf['ci'][1]:+.1f}] |"
                      if decoded else "")
      lines.append(
          f"| {label}{err} | {_ci_num(s['kl'], '.4f')} | {s['kl']['median']:.4f} | "
          f"{_ci_pct(s['top1'])} |{decode_cells} {gr} | "
          f"{s['n_recomputed']:.0f} of {s['n_reused']:.0f} ({_pct(s['frac_recomputed'])}) | "
          f"{s['ttft_ms_here']:.1f} |")

  for family in mth.RULES:
    grid = _grid(meta, summary, family)
    if grid is None:
      continue
    ts, rs, g = grid
    lines += ["", f"## Grid of {family} ({RULE_NAMES.get(family, 'a candidate rule')}): gap recovered, mean over "
              "workloads (rows T, columns r)", ""]
    if family == _heatmap_family(meta):
      lines += [f"![heatmap]({out_name}_heatmap.png)", ""]
    lines += ["| T \\ r | " + " | ".join(f"{r:.2f}" for r in rs) + " |",
              "| --- | " + " | ".join("---" for _ in rs) + " |"]
    for i, t in enumerate(ts):
      lines.append(f"| {t} | " + " | ".join(_pct(v) for v in g[i]) + " |")

  lines += ["", "## Quality vs TTFT", ""]
  if ttft:
    src = sorted({(v["file"], v["device"], v["preset"], v["n_prompt"]) for v in ttft.values()})
    lines.append(f"![quality vs TTFT]({out_name}_ttft.png)")
    lines.append("")
    lines.append("TTFT joined by method label from " + "; ".join(
        f"{f} ({d}, {p}, {n}-token prompt)" for f, d, p, n in src) + ".")
    lines.append("Configurations without a TTFT measurement, left out of the plot: "
                 + (", ".join(f"`{m}`" for m in ttft_missing) if ttft_missing else "none") + ".")
  else:
    lines.append("No TTFT JSON given: no quality-vs-TTFT plot.")
  lines += ["", "Per-prompt numbers: `" + out_name + ".json` (prompts[].results[method])."]
  return "\n".join(lines) + "\n"


def _grid_methods(meta: dict, family: str) -> list[dict]:
  """The methods of one rule's T x r grid (one label per cell)."""
  return [m for m in meta["methods"] if m["family"] == family]


def _heatmap_family(meta: dict) -> str | None:
  """The rule whose grid the heatmap shows: the default rule's if it ran, else the paper's."""
  return next((f for f in mth.RULES if _grid_methods(meta, f)), None)


def _grid(meta: dict, summary: dict, family: str):
  sp = _grid_methods(meta, family)
  if not sp:
    return None
  ts = sorted({m["threshold"] for m in sp})
  rs = sorted({m["ratio"] for m in sp})
  g = np.full((len(ts), len(rs)), np.nan)
  for m in sp:
    o = summary["overall"].get(m["label"])
    if o:
      g[ts.index(m["threshold"]), rs.index(m["ratio"])] = o["gap_recovered"]["mean"]
  return ts, rs, g


def heatmap(meta: dict, summary: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  family = _heatmap_family(meta)
  if family is None:
    return False
  ts, rs, g = _grid(meta, summary, family)
  panels = [("mean over workloads", g)]
  for w in summary["workloads"]:
    gw = np.full_like(g, np.nan)
    for m in _grid_methods(meta, family):
      s = summary["workloads"][w]["methods"].get(m["label"], {}).get("gap_recovered")
      if s:
        gw[ts.index(m["threshold"]), rs.index(m["ratio"])] = s["mean"]
    panels.append((w, gw))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
  for k, (ax, (title, vals)) in enumerate(zip(axes[0], panels)):
    im = ax.imshow(vals, cmap="RdYlGn", vmin=-0.5, vmax=1.0, origin="lower", aspect="auto")
    ax.set_xticks(range(len(rs)), [f"{r:.2f}" for r in rs], fontsize=7)
    ax.set_yticks(range(len(ts)), [str(t) for t in ts], fontsize=7)
    ax.set_xlabel("recompute ratio r", fontsize=8)
    if k == 0:
      ax.set_ylabel("layer threshold T", fontsize=8)
    ax.set_title(title, fontsize=9)
    for i in range(len(ts)):
      for j in range(len(rs)):
        if np.isfinite(vals[i, j]):
          ax.text(j, i, f"{100 * vals[i, j]:.0f}", ha="center", va="center", fontsize=7)
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="gap recovered")
  fig.suptitle(f"{family} ({RULE_NAMES.get(family, 'a candidate rule')}) gap recovered (%), {meta['split']} split, "
               f"{meta['model_name']}, {meta['device']}", fontsize=9)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True


BASELINE_STYLE = {  # marker, colour of the single-point methods on the quality-vs-TTFT plane
    "full": ("*", "black"), "prefix": ("D", "tab:brown"), "naive": ("x", "dimgray"),
    "cacheblend": ("s", "tab:olive"), "epic": ("^", "tab:purple"), "random": ("v", "tab:cyan")}
RULE_COLOURS = ("tab:blue", "tab:green", "tab:orange", "tab:brown", "tab:gray", "tab:olive")
CANDIDATE_MARKERS = ("P", "X", "h", "p", "8", "d")


def pareto_front(points: Sequence[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
  """The (x, y, label) points no other point beats on both lower x (TTFT) and higher y
  (quality), by increasing x."""
  front, best = [], -np.inf
  for x, y, lab in sorted(points, key=lambda p: (p[0], -p[1])):
    if y > best:
      front.append((x, y, lab))
      best = y
  return front


def _gap_of(summary: dict, panel: str | None, label: str) -> dict | None:
  """Gap recovered (mean, ci) of a method on one workload, or over workloads (panel None)."""
  if panel is None:
    o = summary["overall"].get(label)
    s = o["gap_recovered"] if o else None
  else:
    s = summary["workloads"][panel]["methods"].get(label, {}).get("gap_recovered")
  return s if s and np.isfinite(s["mean"]) else None


def quality_ttft_figure(meta: dict, summary: dict, ttft: dict, candidates: Sequence[str] = ()):
  """The quality-vs-TTFT plane, one panel per workload family and one for the mean over them:
  x = TTFT (ms, the joined bench_ttft JSON), y = gap recovered (95% CI bars). Each rule's grid is
  drawn as its Pareto front (its other cells faint), the baselines as single markers, the default
  ringed, the candidates in their own colour; one legend below. Returns the matplotlib figure
  (None without any point)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  from matplotlib.ticker import NullFormatter, ScalarFormatter
  labels = [m["label"] for m in meta["methods"] if m["label"] in ttft]
  if not labels:
    return None
  family = {m["label"]: m["family"] for m in meta["methods"]}
  rules = [f for f in dict.fromkeys(family[lab] for lab in labels) if f not in mth.BASELINES]
  colour = {f: RULE_COLOURS[i % len(RULE_COLOURS)] for i, f in enumerate(rules)}
  default = summary["default_label"]
  candidates = [c for c in candidates if c in labels]
  panels = [(w, w) for w in summary["workloads"]] + [(None, "mean over families")]
  xs = [ttft[lab]["ttft_ms"] for lab in labels]
  ticks = [t for t in (10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)
           if min(xs) / 1.1 <= t <= max(xs) * 1.1]
  ncols = 3
  nrows = -(-len(panels) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(12, 3.5 * nrows), squeeze=False)
  flat = list(axes.ravel())
  for ax in flat[len(panels):]:
    fig.delaxes(ax)
  legend = {}  # legend text -> handle, shared by the panels

  def point(ax, lab, s, marker, col, ms, text, **kw):
    x, y, (lo, hi) = ttft[lab]["ttft_ms"], s["mean"], s["ci"]
    yerr = [[max(y - lo, 0)], [max(hi - y, 0)]] if np.isfinite(lo) and np.isfinite(hi) else None
    ax.errorbar([x], [y], yerr=yerr, fmt=marker, color=col, ms=ms, elinewidth=0.6, capsize=2,
                **kw)
    legend.setdefault(text, Line2D([], [], ls="", marker=marker, color=col, ms=ms, **kw))

  for k, (ax, (panel, title)) in enumerate(zip(flat, panels)):
    for f in rules:
      pts = [(ttft[lab]["ttft_ms"], s["mean"], lab) for lab in labels
             if family[lab] == f and (s := _gap_of(summary, panel, lab))]
      if not pts:
        continue
      front = pareto_front(pts)
      ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=colour[f], ms=3, alpha=0.25)
      for x, y, lab in front:
        s = _gap_of(summary, panel, lab)
        ax.errorbar([x], [y], yerr=[[max(y - s["ci"][0], 0)], [max(s["ci"][1] - y, 0)]]
                    if np.all(np.isfinite(s["ci"])) else None, fmt="none", ecolor=colour[f],
                    elinewidth=0.6, capsize=2)
      ax.plot([p[0] for p in front], [p[1] for p in front], "-o", color=colour[f], ms=5, lw=1.2)
      legend.setdefault(f"{f}: Pareto front of its grid (faint: other cells)",
                        Line2D([], [], color=colour[f], marker="o", ms=5, lw=1.2))
    for lab in labels:
      s = _gap_of(summary, panel, lab)
      if s is None:
        continue
      if family[lab] in mth.BASELINES:
        marker, col = BASELINE_STYLE.get(family[lab], ("o", "gray"))
        point(ax, lab, s, marker, col, 12 if marker == "*" else 7, lab)
      if lab in candidates:
        point(ax, lab, s, CANDIDATE_MARKERS[candidates.index(lab) % len(CANDIDATE_MARKERS)],
              "magenta", 9, f"candidate: {lab}")
      if lab == default:
        x = ttft[lab]["ttft_ms"]
        ax.plot([x], [s["mean"]], "o", ms=16, mfc="none", mec="crimson", mew=1.8)
        legend.setdefault(f"default: {lab}", Line2D([], [], ls="", marker="o", ms=12, mfc="none",
                                                    mec="crimson", mew=1.8))
    ax.axhline(0, color="gray", lw=0.5)
    ax.axhline(1, color="gray", lw=0.5, ls=":")
    ax.set_xscale("log")  # full and prefix sit far right; the reuse methods crowd the left
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(ticks)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    if k % ncols == 0:
      ax.set_ylabel("gap recovered", fontsize=8)
    if k >= len(panels) - ncols:
      ax.set_xlabel("TTFT (ms, median; log scale)", fontsize=8)
  src = sorted({(v["device"], v["preset"], v["n_prompt"]) for v in ttft.values()})
  fig.suptitle(f"Quality ({meta['model_name']}, {meta['split']} split, {meta['device']}) vs TTFT ("
               + "; ".join(f"{d}, {p} shapes, {n}-token prompt" for d, p, n in src) + ")",
               fontsize=9)
  fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=3, fontsize=7,
             frameon=False)
  rows_legend = -(-len(legend) // 3)
  fig.tight_layout(rect=(0, min(0.04 * rows_legend + 0.02, 0.3), 1, 0.96))
  return fig


def ttft_plot(meta: dict, summary: dict, ttft: dict, path: str, candidates: Sequence[str] = ()
              ) -> list[str]:
  """Writes quality_ttft_figure to path; returns the labels left out (no TTFT, or no gap
  recovered over every workload)."""
  labels = [m["label"] for m in meta["methods"]]
  missing = [lab for lab in labels if lab not in ttft]
  missing += [lab for lab in labels if lab in ttft and lab not in summary["overall"]]
  if not ttft:
    return missing
  fig = quality_ttft_figure(meta, summary, ttft, candidates)
  if fig is not None:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
  return missing


def _ttft_8k(ttft: dict, label: str) -> str:
  t = ttft.get(label)
  if t is None:
    return "-"
  n = t.get("n_prompt")
  at = "" if n is None or 7000 <= n <= 9000 else f" (at {n})"
  return f"{t['ttft_ms']:.1f}{at}"


def results_page(summary: dict, meta: dict, ttft: dict, out_name: str,
                 highlight: Sequence[str] = ()) -> str:
  """A short page for docs/quality.md to embed: one row per key method (mean over families
  [CI], each family, pooled, the planted-fact accuracy on needle when decoded, TTFT at 8K), the
  quality-vs-TTFT plot and the run's provenance. `meta`: merged_meta's (with "runs", every run's
  meta, when several were joined)."""
  workloads = list(summary["workloads"])
  labels = key_methods(meta, summary, highlight)
  decoded = int(meta.get("max_new_tokens") or 32) > 1 and "needle" in summary["workloads"]
  default = summary["default_label"]
  lines = [f"### {meta['model_name']}, {meta['split']} split: gap recovered", "",
           "| method | mean over families [95% CI] | " + " | ".join(workloads) + " | pooled |"
           + (" planted fact found (needle) |" if decoded else "") + " TTFT at 8K (ms) |",
           "| --- | --- | " + " | ".join("---" for _ in workloads) + " | --- |"
           + (" --- |" if decoded else "") + " --- |"]
  for lab in labels:
    o = summary["overall"].get(lab)
    cells = [_pct(g["mean"]) if (g := _gap_of(summary, w, lab)) else "n/a" for w in workloads]
    pooled = summary.get("pooled", {}).get(lab)
    fact = ""
    if decoded:
      t = summary["workloads"]["needle"]["methods"].get(lab, {}).get("task")
      fact = f" {_ci_pct(t)} |" if t else " n/a |"
    name = f"**{lab}** (default)" if lab == default else lab
    lines.append(f"| {name} | {_ci_pct(o['gap_recovered']) if o else 'n/a'} | "
                 + " | ".join(cells)
                 + f" | {_pct(pooled['gap_recovered']['mean']) if pooled else 'n/a'} |"
                 + fact + f" {_ttft_8k(ttft, lab)} |")
  sw = summary["workloads"]
  lines += ["", "Gap recovered = 1 - mean KL(method) / mean KL(naive) of the first token, per "
            "family; pooled = the same over all prompts at once. Prompts: " + ", ".join(
                f"{w} {sw[w]['n']}" for w in workloads) + f"; {summary['n_boot']} bootstrap "
            "resamples."]
  if ttft:
    src = sorted({(v["device"], v["preset"], v["n_prompt"]) for v in ttft.values()})
    lines += ["", f"![quality vs TTFT]({out_name}_ttft.png)", "",
              "TTFT: " + "; ".join(f"{d}, {p} shapes, {n}-token prompt" for d, p, n in src) + "."]
  lines += ["", f"Device {meta['device']} ({meta['platform']}), jax {meta['jax']}, code "
            f"{meta.get('code_rev') or 'unknown'}."]
  for m in meta.get("runs") or [meta]:
    lines.append(f"- {m['date']}: `{m['command']}`")
  return "\n".join(lines) + "\n"


LOFO_NOT_BASELINES = ("full", "prefix")  # full prefill's quality, at its cost: no competitor


def lofo_baselines(meta: dict, summary: dict) -> list[str]:
  """The baselines a leave-one-family-out choice must beat or tie: naive, cacheblend, epic and
  random as they ran (full and prefix recompute everything outside the prefix, so they reach
  full prefill's quality at its TTFT and are no bar for a reuse method)."""
  return [m["label"] for m in meta["methods"] if m["family"] in mth.BASELINES
          and m["family"] not in LOFO_NOT_BASELINES and m["label"] in summary["overall"]]


def render(paths: Sequence[str], out: str, ttft_files: Sequence[str], n_boot: int = 2000,
           candidates: str | Sequence[str] | None = None, reference: str | None = None,
           highlight: Sequence[str] = ()) -> dict:
  """Summarises raw JSON into OUT.json (raw + summary), OUT.md, OUT_page.md (the short results
  page), OUT_heatmap.png, OUT_ttft.png. `candidates` ("a;b" or a list of labels): run the
  leave-one-family-out selection over them against `reference` (default: the run's default) and
  the baselines; they are drawn in their own colour and join the compact tables, as do the
  `highlight` labels."""
  metas, prompts = load_runs(paths)
  if not prompts:
    raise ValueError(f"{', '.join(paths)}: no evaluated prompts to report")
  meta = merged_meta(metas)
  known = [m["label"] for m in meta["methods"]]
  candidates = selection.parse_labels(candidates)
  for label in candidates + list(highlight) + ([reference] if reference else []):
    if label not in known:
      raise ValueError(f"{label!r} is no method of these runs; they have: " + ", ".join(known))
  summary = summarize(metas, prompts, n_boot)
  ttft = load_ttft(ttft_files)
  name = os.path.basename(out)
  if candidates:
    baselines = lofo_baselines(meta, summary)
    summary["lofo"] = selection.leave_one_family_out(
        summary, candidates, reference or summary["default_label"], baselines)
  highlight = list(dict.fromkeys(list(highlight) + candidates))
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  heatmap(meta, summary, out + "_heatmap.png")
  missing = ttft_plot(meta, summary, ttft, out + "_ttft.png", candidates)
  ours = {m["label"] for m in meta["methods"]}
  summary["ttft"] = {k: v for k, v in ttft.items() if k in ours}
  summary["ttft_missing"] = missing
  text = markdown(metas, summary, ttft, missing, name, highlight)
  with open(out + ".md", "w") as f:
    f.write(text)
  page_meta = meta if len(metas) == 1 else {**meta, "runs": metas}
  with open(out + "_page.md", "w") as f:
    f.write(results_page(summary, page_meta, summary["ttft"], name, highlight))
  public = {k: v for k, v in summary.items() if not k.startswith("_")}
  merged = {"meta": meta if len(metas) == 1 else {**meta, "runs": metas},
            "prompts": sorted(prompts, key=lambda p: (p["workload"], p["index"])),
            "summary": public}
  tmp = out + ".json.tmp"
  with open(tmp, "w") as f:
    json.dump(merged, f, indent=1, default=float)
  os.replace(tmp, out + ".json")
  print(text)
  return summary
