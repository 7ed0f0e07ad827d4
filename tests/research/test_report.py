"""The report's breakdowns (genre, shape, pooled), the leave-one-family-out selection, the
quality-vs-TTFT panels and the results page, on synthetic raw JSON (no model, a few seconds)."""

import json
import os

import numpy as np
import pytest

from sparsex_jax.research import methods as mth
from sparsex_jax.research import report
from sparsex_jax.research import selection

FAMILIES = ("musique", "needle", "chat", "agent")
REFERENCE = "sparsex r=0.15 T=4"
A = "sparsex r=0.30 T=4"  # the best on three families, the worst on agent
B = "sparsex r=0.30 T=2"  # good everywhere
# KL(method) / KL(naive) per family (never 0: full gets a tiny KL too; prefix recomputes all
# but the prefix: near full)
FACTOR = {"full": 0.01, "naive": 1.0, "prefix": 0.02, "cacheblend r=0.15": 0.65,
          "epic r=0.15": 0.6, "random r=0.15 T=4": 0.9, REFERENCE: 0.5, B: 0.35,
          "sparsex r=0.15 T=2": 0.7, "sparsex-attention r=0.15 T=4": 0.6}


def _factor(label, family):
  if label == A:
    return 1.3 if family == "agent" else 0.2
  return FACTOR[label]


def _shape(family, i):
  if family == "chat":  # uneven: a 2-prompt cell prints n/a (2)
    return "edit-middle" if i < 2 else "drop-oldest"
  return ("pipeline", "debate")[i % 2] if family == "agent" else ("short", "long")[i % 2]


def _synthetic(path, n=16, seed=0):
  rng = np.random.default_rng(seed)
  methods = mth.method_grid(["prefix", "naive", "cacheblend", "epic", "random", "sparsex",
                             "sparsex-attention"], 30, [0.15, 0.30], [2, 4])
  methods = [m for m in methods if not m.label.startswith("sparsex-attention")
             or m.label == "sparsex-attention r=0.15 T=4"]
  meta = {"device": "cpu", "platform": "cpu", "jax": "0.x", "python": "3", "date": "2026-01-01",
          "command": "sparsex eval --synthetic", "model": "m", "model_name": "tiny",
          "dtype": "float32", "split": "test", "workloads": list(FAMILIES),
          "default_label": REFERENCE, "labels": mth.LABELS, "max_new_tokens": 32,
          "methods": [{"label": m.label, "family": m.family, "ratio": m.ratio,
                       "threshold": m.threshold} for m in methods],
          "complete": True, "elapsed_s": 1.0, "notes": [], "code_rev": "abc1234"}
  prompts = []
  for w in FAMILIES:
    for i in range(n):
      base = rng.exponential(0.2) + 0.01
      res = {}
      for m in methods:
        f = _factor(m.label, w)
        res[m.label] = {"kl": base * f * rng.uniform(0.9, 1.1), "top1": True, "em": f < 0.6,
                        "match_len": 3, "task": float(rng.uniform() > f), "text": "x",
                        "n_generated": 3, "n_exact": 0, "n_reused": 100, "n_new": 10,
                        "n_recomputed": 15, "frac_recomputed": 0.15, "ttft_s": 0.01,
                        "prefill_s": 0.01}
      prompts.append({"key": f"{w}/test/{i}", "workload": w, "split": "test", "index": i,
                      "item": "", "n_prompt": 1000, "task_metric": "contains",
                      "answers": ["a"], "results": res,
                      "info": {"genre": ("essays", "news")[i // 2 % 2], "shape": _shape(w, i)}})
  with open(path, "w") as f:
    json.dump({"meta": meta, "prompts": prompts}, f)
  return prompts


def _ttft(path):
  ms = {"full": 250.0, "prefix": 250.0, "naive": 47.0, "cacheblend r=0.15": 77.0,
        "epic r=0.15": 60.0, "random r=0.15 T=4": 90.0, REFERENCE: 95.0, A: 120.0, B: 100.0,
        "sparsex r=0.15 T=2": 80.0, "sparsex-attention r=0.15 T=4": 94.0}
  with open(path, "w") as f:
    json.dump({"device": "H100", "labels": mth.LABELS, "ttft": [
        {"policy": k, "ttft_ms_median": v, "preset": "llama3-8b", "n_prompt": 7968}
        for k, v in ms.items()]}, f)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  d = tmp_path_factory.mktemp("report")
  raw, ttft = str(d / "raw.json"), str(d / "ttft.json")
  prompts = _synthetic(raw)
  _ttft(ttft)
  out = str(d / "eval_test")
  summary = report.render([raw], out, [ttft], n_boot=200, candidates=f"{A};{B}")
  return prompts, summary, out, ttft


def _kl(ps, label):
  return np.array([p["results"][label]["kl"] for p in ps])


def test_breakdown_and_pooled_match_numpy(rendered):
  prompts, summary, out, _ = rendered
  bd = summary["breakdown"]
  for w in FAMILIES:
    for key in ("genre", "shape"):
      values = sorted({p["info"][key] for p in prompts if p["workload"] == w})
      assert sorted(bd[w][key]) == values and len(values) == 2
      for v in values:
        ps = [p for p in prompts if p["workload"] == w and p["info"][key] == v]
        cell = bd[w][key][v]
        assert cell["n"] == len(ps)
        for label in (REFERENCE, A, "epic r=0.15"):
          want = 1 - _kl(ps, label).mean() / _kl(ps, "naive").mean()
          assert cell["methods"][label]["mean"] == pytest.approx(want, rel=1e-12)
          lo, hi = cell["methods"][label]["ci"]
          assert lo <= want <= hi
  for label in (REFERENCE, A, "prefix"):
    want = 1 - _kl(prompts, label).mean() / _kl(prompts, "naive").mean()
    pooled = summary["pooled"][label]
    assert pooled["n"] == len(prompts)
    assert pooled["gap_recovered"]["mean"] == pytest.approx(want, rel=1e-12)
    lo, hi = pooled["gap_recovered"]["ci"]
    assert lo <= want <= hi
  md = open(out + ".md").read()
  assert "## Gap recovered by genre and shape, per workload" in md
  assert "shape: edit-middle (n=2)" in md and "n/a (2)" in md
  assert "genre: news (n=8)" in md and "pooled over prompts" in md
  # key methods only: the baselines, each rule's default cell and the candidates
  section = md[md.index("## Gap recovered by genre"):md.index("## musique:")]
  rows = {line.split(" | ")[0][2:] for line in section.splitlines() if line.startswith("| ")}
  assert {REFERENCE, A, B, "sparsex-attention r=0.15 T=4", "epic r=0.15", "prefix"} <= rows
  assert "sparsex r=0.15 T=2" not in rows and "naive" not in rows and "full" not in rows
  saved = json.load(open(out + ".json"))["summary"]
  assert "_draws" not in saved and "breakdown" in saved and "lofo" in saved


def test_leave_one_family_out_holds_the_choice_to_the_family_it_did_not_see(rendered):
  _, summary, out, _ = rendered
  lofo = summary["lofo"]
  folds = {f["family"]: f for f in lofo["folds"]}
  assert list(folds) == list(FAMILIES)
  # A is best on the other three when agent is held out, and loses there to everything
  # full and prefix reach full prefill's quality at its cost: no bar for a reuse method
  assert lofo["baselines"] == ["naive", "cacheblend r=0.15", "epic r=0.15", "random r=0.15 T=4"]
  agent = folds["agent"]
  assert agent["chosen"] == A and agent["score_others"] == pytest.approx(0.8, abs=0.05)
  assert agent["gap"]["mean"] < 0
  assert agent["vs"][REFERENCE]["verdict"] == "loses" and not agent["passes"]
  assert agent["vs"]["epic r=0.15"]["verdict"] == "loses"
  # any other fold sees agent, where A is bad: B is chosen and beats everything
  for w in ("musique", "needle", "chat"):
    assert folds[w]["chosen"] == B and folds[w]["passes"], folds[w]["fails"]
    assert folds[w]["vs"][REFERENCE]["verdict"] == "wins"
  # the choice on every family is B (mean 65% vs A's 52%), not adopted: the agent fold failed
  assert lofo["adopt"]["label"] == B and not lofo["adopt"]["yes"]
  assert "held out agent" in lofo["adopt"]["reason"]
  md = open(out + ".md").read()
  assert "## Leave-one-family-out selection" in md
  assert f"**adopt {B}: no**" in md
  row = next(line for line in md.splitlines() if line.startswith("| agent | "))
  assert A in row and "loses" in row and row.endswith("fails |")
  # B alone: every fold chooses it, it beats the reference and every baseline everywhere
  only_b = selection.leave_one_family_out(summary, [B], REFERENCE, lofo["baselines"])
  assert only_b["adopt"] == {"label": B, "yes": True, "reason": only_b["adopt"]["reason"]}
  assert all(f["passes"] for f in only_b["folds"])
  # a candidate with the reference's KL on every prompt of a family is "identical" there, not a
  # tie within the noise (and still not a win)
  import copy
  twin = copy.deepcopy(summary)
  for w in FAMILIES:
    twin["_draws"][w][B] = twin["_draws"][w][REFERENCE].copy()
    twin["workloads"][w]["methods"][B] = twin["workloads"][w]["methods"][REFERENCE]
  same = selection.leave_one_family_out(twin, [B], REFERENCE, [])
  assert all(f["vs"][REFERENCE]["verdict"] == "identical" for f in same["folds"])
  assert all(f["status"] == "does not apply" for f in same["folds"])
  assert not same["adopt"]["yes"] and "identical to" in same["adopt"]["reason"]
  # identical on two families (it does not act there), a win on the other two: the families it
  # acts on confirm it and none refutes it, so it is adopted
  local = copy.deepcopy(summary)
  for w in ("musique", "needle"):
    local["_draws"][w][B] = local["_draws"][w][REFERENCE].copy()
    local["workloads"][w]["methods"][B] = local["workloads"][w]["methods"][REFERENCE]
  part = selection.leave_one_family_out(local, [B], REFERENCE, [])
  status = {f["family"]: f["status"] for f in part["folds"]}
  assert status == {"musique": "does not apply", "needle": "does not apply",
                    "chat": "passes", "agent": "passes"}, status
  assert part["adopt"]["yes"] and "except on musique, needle" in part["adopt"]["reason"]
  # ... but a fold where it is identical to the reference and loses to a baseline fails
  local["_draws"]["needle"]["epic r=0.15"] = local["_draws"]["needle"][REFERENCE] + 0.3
  worse = selection.leave_one_family_out(local, [B], REFERENCE, ["epic r=0.15"])
  needle = next(f for f in worse["folds"] if f["family"] == "needle")
  assert needle["status"] == "fails" and needle["vs"]["epic r=0.15"]["verdict"] == "loses"
  assert not worse["adopt"]["yes"] and "held out needle" in worse["adopt"]["reason"]
  # the reference as the only candidate is never adopted over itself
  assert not selection.leave_one_family_out(summary, [REFERENCE], REFERENCE, [])["adopt"]["yes"]
  assert selection.parse_labels(f" {A} ;{B};") == [A, B]


def test_quality_ttft_plane_has_a_panel_per_family_and_the_mean(rendered):
  prompts, summary, out, ttft_path = rendered
  assert os.path.getsize(out + "_ttft.png") > 0
  metas, _ = report.load_runs([out + ".json"])
  meta = report.merged_meta(metas)
  ttft = report.load_ttft([ttft_path])
  fig = report.quality_ttft_figure(meta, summary, ttft, [A, B])
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == list(FAMILIES) + ["mean over families"]
  texts = [t.get_text() for t in fig.legends[0].get_texts()]
  assert f"default: {REFERENCE}" in texts and f"candidate: {A}" in texts
  assert any(t.startswith("sparsex: Pareto front") for t in texts) and "epic r=0.15" in texts
  import matplotlib.pyplot as plt
  plt.close(fig)
  pts = [(1.0, 0.1, "a"), (2.0, 0.05, "b"), (2.0, 0.5, "c"), (3.0, 0.4, "d"), (4.0, 0.9, "e")]
  assert [p[2] for p in report.pareto_front(pts)] == ["a", "c", "e"]


def test_results_page(rendered):
  _, summary, out, _ = rendered
  page = open(out + "_page.md").read()
  for w in FAMILIES:
    assert f" {w} |" in page.splitlines()[2]
  assert "planted fact found (needle)" in page and "TTFT at 8K (ms)" in page
  assert f"**{REFERENCE}** (default)" in page and "| 95.0 |" in page
  assert "eval_test_ttft.png" in page and "sparsex eval --synthetic" in page
  assert "abc1234" in page


def test_old_files_without_genre_or_shape_and_bad_labels(tmp_path):
  raw = str(tmp_path / "raw.json")
  _synthetic(raw, n=6)
  data = json.load(open(raw))
  for p in data["prompts"]:
    p["info"] = {}
  json.dump(data, open(raw, "w"))
  summary = report.render([raw], str(tmp_path / "old"), [], n_boot=50)
  assert all(not v for v in summary["breakdown"].values())
  assert "no breakdown" in open(str(tmp_path / "old.md")).read()
  assert os.path.exists(str(tmp_path / "old_page.md"))
  with pytest.raises(ValueError, match="no method of these runs"):
    report.render([raw], str(tmp_path / "bad"), [], n_boot=50, candidates="sparsex r=0.99 T=4")
