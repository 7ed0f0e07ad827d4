"""Leave-one-family-out (LOFO) selection: would choosing a configuration on the other workload
families have picked one that also wins on the family held out?

For each family F the candidate with the best mean gap recovered over the OTHER families is the
fold's choice; on F it is compared, paired, with the reference (today's default) and with every
baseline, using the bootstrap draws report.summarize keeps per (family, method) (every method of a
family is resampled with the same prompt indices, so a difference of draws is a paired draw).
Verdicts: "wins" when the 95% interval of (chosen - other) on F lies above 0, "ties" when it
contains 0, "loses" when it lies below, "identical" when the two give the same KL on every prompt
of F. A fold passes when its choice wins or ties against every baseline and wins against the
reference. A fold whose choice is identical to the reference on every prompt of F, and wins or
ties every baseline, does not apply: the candidate does not act on that family (a rule that
changes only segments computed in context selects exactly as the reference where every segment
was cached alone), so the family can neither confirm nor refute it. The configuration to adopt is
the one the same procedure picks on every family; it is adopted only if no fold fails and at
least one passes (it won on a family it did not see, and lost nowhere).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from sparsex_jax.research import metrics as mt


def parse_labels(labels: str | Sequence[str] | None) -> list[str]:
  """"a;b" or ["a", "b"] -> ["a", "b"] (labels contain spaces and commas' neighbours, so ';')."""
  if labels is None:
    return []
  if isinstance(labels, str):
    labels = labels.split(";")
  return [x.strip() for x in labels if x and x.strip()]


def _verdict(ci: Sequence[float]) -> str:
  return {"better": "wins", "worse": "loses", "tie": "ties"}.get(mt.diff_verdict(ci), "n/a")


def _gap(summary: dict, family: str, label: str) -> dict | None:
  s = summary["workloads"][family]["methods"].get(label, {}).get("gap_recovered")
  return {"mean": s["mean"], "ci": list(s["ci"])} if s else None


def leave_one_family_out(summary: dict, candidates: list[str], reference: str,
                         baselines: list[str]) -> dict:
  """Per-fold choices and verdicts (see the module doc). `summary`: report.summarize's (it
  carries the bootstrap draws under "_draws"). Candidates not measured on every family are
  skipped (listed under "skipped"); the reference and baselines must be measured on every
  family."""
  draws = summary.get("_draws")
  if draws is None:
    raise ValueError("leave_one_family_out needs report.summarize's summary (bootstrap draws); "
                     "a summary read back from JSON has none: re-render from the raw JSON")
  families = list(summary["workloads"])
  if len(families) < 2:
    raise ValueError(f"leave-one-family-out needs at least 2 workload families, got {families}")

  def measured(label):
    return all(label in draws.get(w, {}) and np.isfinite(_gap(summary, w, label)["mean"])
               for w in families)

  for label in [reference] + list(baselines):
    if not measured(label):
      raise ValueError(f"{label!r} is not measured on every family ({', '.join(families)})")
  usable = [c for c in candidates if measured(c)]
  skipped = [c for c in candidates if c not in usable]
  if not usable:
    raise ValueError("no candidate is measured on every family: " + ", ".join(candidates))

  def gap(w, label):
    return _gap(summary, w, label)["mean"]

  def best(over):
    scores = {c: float(np.mean([gap(w, c) for w in over])) for c in usable}
    top = max(scores.values())
    return next(c for c in usable if scores[c] == top), scores  # ties: the first given

  folds = []
  for f in families:
    others = [w for w in families if w != f]
    chosen, scores = best(others)
    vs = {}
    for other in [reference] + [b for b in baselines if b != reference]:
      if other == chosen:
        vs[other] = {"diff": 0.0, "ci": [0.0, 0.0], "verdict": "same"}
        continue
      d = draws[f][chosen] - draws[f][other]
      ci = list(mt.percentile_ci(d))
      # "identical": the same KL on every prompt of the family (a rule that by construction
      # selects as the other does there), told apart from a tie within the noise.
      verdict = "identical" if np.all(d == 0) else _verdict(ci)
      vs[other] = {"diff": gap(f, chosen) - gap(f, other), "ci": ci, "verdict": verdict}
    words = {"loses": "loses to", "ties": "only ties", "same": "is the reference",
             "identical": "is identical to", "n/a": "has no interval vs"}
    fails = [words[v["verdict"]] + ("" if v["verdict"] == "same" else f" {other}")
             for other, v in vs.items()
             if v["verdict"] != "wins" and (other == reference
                                            or v["verdict"] not in ("ties", "same", "identical"))]
    # identical to the reference, and no baseline beats it: the fold's one failure is that
    inert = vs[reference]["verdict"] == "identical" and len(fails) == 1
    status = "passes" if not fails else "does not apply" if inert else "fails"
    folds.append({"family": f, "chosen": chosen, "score_others": scores[chosen],
                  "gap": _gap(summary, f, chosen), "reference": _gap(summary, f, reference),
                  "baselines": {b: _gap(summary, f, b) for b in baselines},
                  "vs": vs, "status": status, "passes": status == "passes", "fails": fails})

  adopt, _ = best(families)
  failed = [fo for fo in folds if fo["status"] == "fails"]
  inert = [fo["family"] for fo in folds if fo["status"] == "does not apply"]
  picks = [fo["chosen"] for fo in folds]
  stable = f"the folds chose it {picks.count(adopt)} of {len(folds)} times"
  if adopt == reference:
    reason = f"the reference is the best candidate over all families already; {stable}"
    yes = False
  elif failed:
    reason = "; ".join(f"held out {fo['family']}: {fo['chosen']} " + ", ".join(fo["fails"])
                       for fo in failed) + f"; {stable}"
    yes = False
  elif len(inert) == len(folds):
    reason = (f"every fold's choice is identical to {reference} on the family it did not see; "
              f"{stable}")
    yes = False
  else:
    reason = (f"every fold's choice beats {reference} and wins or ties every baseline on the "
              f"family it did not see" + (f", except on {', '.join(inert)}, where it is identical "
                                         f"to {reference} (it does not act there)" if inert else "")
              + f"; {stable}")
    yes = True
  return {"reference": reference, "baselines": list(baselines), "candidates": usable,
          "skipped": skipped, "folds": folds,
          "adopt": {"label": adopt, "yes": yes, "reason": reason}}


def _pct(s: dict | None) -> str:
  if not s or not np.isfinite(s["mean"]):
    return "n/a"
  return f"{100 * s['mean']:.0f}%"


def _cell(fold: dict, other: str, s: dict | None) -> str:
  v = fold["vs"].get(other)
  if v is None or v["verdict"] == "same":
    return _pct(s) + (" (chosen)" if v else "")
  return f"{_pct(s)} ({v['verdict']}, {100 * v['diff']:+.0f} [{100 * v['ci'][0]:+.0f}, " \
         f"{100 * v['ci'][1]:+.0f}])"


def markdown(result: dict) -> list[str]:
  """The LOFO table and the adoption line, as markdown lines."""
  ref, bases = result["reference"], [b for b in result["baselines"] if b != result["reference"]]
  lines = ["| held-out family | chosen on the others (their mean) | chosen on it [95% CI] | "
           f"{ref} (reference) | " + " | ".join(bases) + " | fold |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in bases) + " | --- |"]
  for fo in result["folds"]:
    g = fo["gap"]
    lines.append(
        f"| {fo['family']} | {fo['chosen']} ({100 * fo['score_others']:.0f}%) | {_pct(g)} "
        f"[{100 * g['ci'][0]:.0f}, {100 * g['ci'][1]:.0f}] | "
        f"{_cell(fo, ref, fo['reference'])} | "
        + " | ".join(_cell(fo, b, fo["baselines"][b]) for b in bases)
        + f" | {fo['status']} |")
  a = result["adopt"]
  lines += ["", f"Cells: the family's gap recovered, then the chosen one's paired difference "
            "(points, 95% CI) and its verdict. A fold passes when its choice wins or ties every "
            "baseline and wins against the reference; it does not apply when its choice is "
            "identical to the reference on every prompt of the family (and wins or ties every "
            "baseline); a candidate is adopted when no fold fails and one passes.", "",
            f"**adopt {a['label']}: {'yes' if a['yes'] else 'no'}** ({a['reason']})."]
  if result["skipped"]:
    lines.append("Candidates not measured on every family, left out: "
                 + ", ".join(f"`{c}`" for c in result["skipped"]) + ".")
  return lines
