"""Summaries of raw `sparsex eval` JSON: tables (markdown), the T x r heatmap and the
quality-vs-TTFT plot.

Statistics (see metrics.py): every mean comes with a 95% percentile bootstrap interval over
prompts. Gap recovered is computed per workload on means, 1 - mean KL(method) / mean KL(naive),
with naive's and the method's KL resampled jointly; its mean over workloads resamples each
workload on its own (a stratified bootstrap) and averages the draws. A difference between two
methods is resampled paired (the same prompts for both) and reported as a tie when its interval
contains 0.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from sparsex_jax.research import methods as mth
from sparsex_jax.research import metrics as mt

PER_PROMPT = ("kl", "top1", "em", "task")
COMPARE_WITH = ("epic r=0.15", "cacheblend r=0.15")
RULE_NAMES = {"sparsex": "the default rule", "sparsex-paper": "the paper's rule",
              "sparsex-attention": "the paper's attention-only rule"}


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def load_runs(paths: Sequence[str]) -> tuple[list[dict], list[dict]]:
  """(metas, prompts) of raw JSON files. Runs that split the methods of the same prompts join:
  a prompt seen in several files gets every file's methods, and a method measured twice keeps
  the later file's result."""
  metas, by_key = [], {}
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such eval JSON")
    try:
      with open(path) as f:
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
    with open(path) as f:
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
  summary = {"workloads": {}, "overall": {}, "comparisons": [], "n_boot": n_boot,
             "default_label": default}
  draws = {}  # (workload, label) -> bootstrap draws of gap recovered, on that workload's prompts
  for w in workloads:
    ps = [p for p in prompts if p["workload"] == w and _ok(p, "full")]
    base = [p for p in ps if _ok(p, "naive")]
    idx = mt.bootstrap_indices(len(base), n_boot, seed) if base else None
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
  return summary


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


def _comparison(summary: dict, label: str, ref: str) -> dict | None:
  for c in summary["comparisons"]:
    if c["method"] == label and c["vs"] == ref:
      return c
  return None


def markdown(metas: list[dict], summary: dict, ttft: dict, ttft_missing: list[str],
             out_name: str) -> str:
  meta = merged_meta(metas)
  default = summary["default_label"]
  labels = [m["label"] for m in meta["methods"]]
  workloads = list(summary["workloads"])
  lines = [f"# `sparsex eval`: {meta['split']} split", ""]
  lines.append(f"Model {meta['model_name']} ({meta['model']}, {meta['dtype']}), device "
               f"{meta['device']} ({meta['platform']}), jax {meta['jax']}, python "
               f"{meta['python']}, code {meta.get('code_rev') or 'unknown'}.")
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
            f"vs {default} |", "| --- | " + " | ".join("---" for _ in workloads) + " | --- | --- |"]
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
    lines.append(f"| {name} | " + " | ".join(cells) + f" | "
                 f"{_ci_pct(o['gap_recovered']) if o else 'n/a'} | {vs} |")

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
    lines += ["", f"## Grid of {family} ({RULE_NAMES[family]}): gap recovered, mean over "
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
  fig.suptitle(f"{family} ({RULE_NAMES[family]}) gap recovered (%), {meta['split']} split, "
               f"{meta['model_name']}, {meta['device']}", fontsize=9)
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
  return True


def ttft_plot(meta: dict, summary: dict, ttft: dict, path: str) -> list[str]:
  """Gap recovered (mean over workloads, with CI) against TTFT; returns the labels left out."""
  labels = [m["label"] for m in meta["methods"]]
  family = {m["label"]: m["family"] for m in meta["methods"]}
  missing = [lab for lab in labels if lab not in ttft]
  pts = [lab for lab in labels if lab in ttft and lab in summary["overall"]]
  missing += [lab for lab in labels if lab in ttft and lab not in summary["overall"]]
  if not ttft:
    return missing
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  markers = {"prefix": "D", "naive": "x", "cacheblend": "s", "epic": "^", "random": "v",
             "sparsex": "o", "sparsex-paper": "X", "sparsex-attention": "P", "full": "*"}
  for lab in pts:
    x = ttft[lab]["ttft_ms"]
    o = summary["overall"][lab]["gap_recovered"]
    y, (lo, hi) = o["mean"], o["ci"]
    is_default = lab == summary["default_label"]
    ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt=markers.get(family[lab], "o"),
                ms=11 if is_default else 7, capsize=3,
                color="crimson" if is_default else None)
    ax.annotate(lab + (" (default)" if is_default else ""), (x, y), fontsize=7,
                xytext=(4, 4), textcoords="offset points")
  src = sorted({(v["device"], v["preset"], v["n_prompt"]) for v in ttft.values()})
  ax.set_xlabel("TTFT (ms, median): " + "; ".join(f"{d}, {p} shapes, {n}-token RAG prompt"
                                                   for d, p, n in src), fontsize=8)
  ax.set_ylabel("gap recovered, mean over workloads")
  ax.axhline(0, color="gray", lw=0.5)
  ax.axhline(1, color="gray", lw=0.5, ls=":")
  ax.grid(alpha=0.3)
  ax.set_title(f"Quality ({meta['model_name']}, {meta['split']} split, {meta['device']}) vs TTFT",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return missing


def render(paths: Sequence[str], out: str, ttft_files: Sequence[str], n_boot: int = 2000
           ) -> dict:
  """Summarises raw JSON into OUT.json (raw + summary), OUT.md, OUT_heatmap.png, OUT_ttft.png."""
  metas, prompts = load_runs(paths)
  if not prompts:
    raise ValueError(f"{', '.join(paths)}: no evaluated prompts to report")
  summary = summarize(metas, prompts, n_boot)
  ttft = load_ttft(ttft_files)
  name = os.path.basename(out)
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  meta = merged_meta(metas)
  heatmap(meta, summary, out + "_heatmap.png")
  missing = ttft_plot(meta, summary, ttft, out + "_ttft.png")
  ours = {m["label"] for m in meta["methods"]}
  summary["ttft"] = {k: v for k, v in ttft.items() if k in ours}
  summary["ttft_missing"] = missing
  text = markdown(metas, summary, ttft, missing, name)
  with open(out + ".md", "w") as f:
    f.write(text)
  merged = {"meta": meta if len(metas) == 1 else {**meta, "runs": metas},
            "prompts": sorted(prompts, key=lambda p: (p["workload"], p["index"])),
            "summary": summary}
  tmp = out + ".json.tmp"
  with open(tmp, "w") as f:
    json.dump(merged, f, indent=1, default=float)
  os.replace(tmp, out + ".json")
  print(text)
  return summary
