"""The evaluation suite's parts: metrics against float64 numpy, bootstrap coverage, the workload
builders' invariants, the method grid and the report (no model weights needed)."""

import json
import math
import os

import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax.entrypoints import cli
from sparsex_jax.research import methods as mth
from sparsex_jax.research import metrics as mt
from sparsex_jax.research import report
from sparsex_jax.research import text as txt
from sparsex_jax.research import workloads as wl


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------

def _kl_reference(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  p = np.exp(a - a.max())
  p /= p.sum()
  q = np.exp(b - b.max())
  q /= q.sum()
  return float(np.sum(p * (np.log(p) - np.log(q))))


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])
def test_kl_matches_float64_numpy_on_random_logits(scale):
  rng = np.random.default_rng(int(scale * 10))
  for _ in range(5):
    a = (scale * rng.standard_normal(4096)).astype(np.float32)
    b = (a + 0.5 * scale * rng.standard_normal(4096)).astype(np.float32)
    assert mt.kl_divergence(a, b) == pytest.approx(_kl_reference(a, b), rel=1e-9, abs=1e-12)
    assert mt.kl_divergence(a, a) == 0.0
    assert mt.kl_divergence(a + 3.0, b) == pytest.approx(mt.kl_divergence(a, b), rel=1e-6)
    assert mt.kl_divergence(a, b) > 0


def test_kl_rejects_bad_input():
  with pytest.raises(ValueError, match="shape"):
    mt.kl_divergence(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="NaN"):
    mt.kl_divergence(np.array([0.0, np.nan]), np.zeros(2))


def test_top1_exact_match_and_prefix():
  assert mt.top1_agree(np.array([0.0, 2.0, 1.0]), np.array([0.0, 5.0, 1.0]))
  assert not mt.top1_agree(np.array([0.0, 2.0, 1.0]), np.array([3.0, 2.0, 1.0]))
  assert mt.exact_match([1, 2, 3], [1, 2, 3], 32) and not mt.exact_match([1, 2, 3], [1, 2], 32)
  assert mt.exact_match([1, 2, 3, 4], [1, 2, 3, 9], 3)  # only the first n count
  assert mt.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_squad_normalisation_and_f1():
  assert mt.normalize_answer("  The Exeter   College! ") == "exeter college"
  assert mt.normalize_answer("an apple, a pear") == "apple pear"
  assert mt.token_f1("Exeter College", "exeter college.") == 1.0
  # 2 common tokens, precision 2/3, recall 1: F1 = 0.8
  assert mt.token_f1("Exeter College Oxford", "Exeter College") == pytest.approx(0.8)
  assert mt.token_f1("Oxford", "Exeter College") == 0.0
  assert mt.token_f1("the", "a") == 1.0  # both normalise to nothing
  assert mt.best_f1("Charles County", ["Prince George", "Charles County"]) == 1.0
  assert mt.task_score("f1", "Charles County\nIt is in Maryland.", ["Charles County"]) == 1.0
  assert mt.task_score("contains", "The code is 4821.", ["4821"]) == 1.0
  assert mt.task_score("contains", "I don't know", ["4821"]) == 0.0
  with pytest.raises(ValueError, match="metric"):
    mt.task_score("bleu", "x", ["x"])


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
  rng = np.random.default_rng(0)
  trials, hits = 300, 0
  for t in range(trials):
    x = rng.exponential(1.0, size=60)  # skewed, like per-prompt KL; true mean 1
    lo, hi = mt.mean_ci(x, n_boot=600, seed=t)["ci"]
    hits += lo <= 1.0 <= hi
  # Percentile intervals under-cover a little on skewed data at n = 60.
  assert 0.88 <= hits / trials <= 0.99


def test_gap_recovered_and_paired_verdicts():
  rng = np.random.default_rng(1)
  naive = rng.exponential(0.2, size=40)
  assert mt.gap_recovered(naive, naive) == pytest.approx(0.0)
  assert mt.gap_recovered(np.zeros(40), naive) == pytest.approx(1.0)
  half = naive * 0.5
  assert mt.gap_recovered(half, naive) == pytest.approx(0.5)
  assert math.isnan(mt.gap_recovered(np.zeros(3), np.zeros(3)))
  idx = mt.bootstrap_indices(40, 500, 0)
  d = mt.gap_recovered_draws(half, naive, idx)
  assert np.allclose(d, 0.5)  # paired resampling: an exact ratio stays exact
  assert mt.diff_verdict((0.1, 0.3)) == "better" and mt.diff_verdict((-0.3, -0.1)) == "worse"
  assert mt.diff_verdict((-0.1, 0.2)) == "tie"
  assert mt.diff_verdict((0.1, 0.3), higher_is_better=False) == "worse"


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------

def _ntok(tok, seg):
  return len(tok.encode(seg.content))


@pytest.fixture(scope="module")
def texts_test(real_tokenizer):
  return wl.Texts(real_tokenizer, "test")


def test_every_genre_loads_from_its_pip_package_and_splits_disjoint(real_tokenizer, texts_test):
  for genre in txt.GENRES:
    docs = txt.load_documents(genre)
    assert len(docs) >= 40 and all(text.strip() for _, text in docs)
    assert sum(len(text) for _, text in docs) > 200_000
    dev = wl.TextCorpus(real_tokenizer, genre, "dev")
    test = texts_test.corpus(genre)
    assert dev.names and test.names and not set(dev.names) & set(test.names)
  # the reference genre is prose: no grammar rules or code lines survive
  assert not any("::=" in s for s in texts_test.corpus("reference").sentences)
  assert [i for i in range(6) if txt.split_of(i, "dev")] == [0, 2, 4]
  with pytest.raises(ValueError, match="split"):
    txt.split_of(0, "train")
  with pytest.raises(ValueError, match="unknown genre"):
    txt.load_documents("poetry")


def test_needle_fact_is_inside_one_cached_passage_at_its_depth(real_tokenizer, texts_test):
  tok = real_tokenizer
  sizes = wl.Sizes(needle_contexts=(2048,), needle_depths=(0.1, 0.5, 0.9))
  prompts = wl.needle_prompts(tok, texts_test, "test", 9, sizes, seed=0)
  # prompt i: genre i % 3, depth i // 3
  assert [p.info["genre"] for p in prompts[:3]] == list(txt.GENRES)
  for i, p in enumerate(prompts):
    depth = sizes.needle_depths[i // 3]
    segs = p.request.segments
    passages = segs[1:-1]
    holding = [s for s in passages if p.info["fact"] in s.content]
    assert len(holding) == 1
    # The passages are exactly what the warm-up caches alone; the question is never cached.
    cached = {s.content for st in p.warm if st.kind == "segments" for s in st.segments}
    assert cached == {s.content for s in passages}
    assert not segs[-1].cache and p.info["question"] in segs[-1].content
    assert p.answers[0] in p.info["fact"]
    assert abs(sum(_ntok(tok, s) for s in passages) - 2048) < 200
    assert abs(p.info["fact_token_depth"] - depth) < 0.1
    assert p.info["passage_tokens"] in sizes.needle_passage_tokens
    assert all(_ntok(tok, s) <= p.info["passage_tokens"] + 400 for s in passages)


def test_chat_shapes_drop_or_cut_turns_and_move_the_kept_ones(real_tokenizer, texts_test):
  tok = real_tokenizer
  n = 3 * len(wl.CHAT_SHAPES)
  prompts = wl.chat_prompts(tok, texts_test, "test", n, wl.Sizes(), seed=0)
  assert {(p.info["genre"], p.info["shape"]) for p in prompts} == {
      (g, s.name) for g in txt.GENRES for s in wl.CHAT_SHAPES}
  for p in prompts:
    shape = next(s for s in wl.CHAT_SHAPES if s.name == p.info["shape"])
    earlier = [s.content for st in p.warm for s in st.segments]
    if shape.warm == "context":
      assert [st.kind for st in p.warm] == ["context"]
    else:  # the system prompt is a prefix hit; every other message was cached alone
      assert [st.kind for st in p.warm] == ["prefix", "segments"]
    now = [s.content for s in p.request.segments]
    d, cut = p.info["dropped_turns"], p.info["cut"]
    assert shape.drop[0] <= d <= shape.drop[1]
    assert now[0] == earlier[0]  # the system prompt stays first
    gone = earlier[1 + 2 * cut:1 + 2 * (cut + d)]
    assert now[1:-1] == earlier[1:1 + 2 * cut] + earlier[1 + 2 * (cut + d):]
    assert not any(t in now for t in gone)  # the dropped turns are gone
    # The turns after the cut start earlier than when they were computed, by the dropped text.
    shift = [o - n for o, n in zip(p.info["kept_old_starts"], p.info["kept_new_starts"])]
    dropped_tokens = sum(len(tok.encode(t)) for t in gone)
    assert shift == [0] * (2 * cut) + [dropped_tokens] * (len(shift) - 2 * cut)
    assert (cut == 0) == (shape.edit == "oldest")
    # The fact is in a kept user turn; the question is new; one Segment per message.
    assert any(p.info["fact"] in t for t in now[1:-1])
    assert not p.request.segments[-1].cache and p.info["question"] in now[-1]
    assert all(t.startswith("<|im_start|>") for t in now)
    assert 1060 <= sum(_ntok(tok, s) for s in p.request.segments) <= 1280  # the token band


def test_agent_shapes_share_messages_at_other_positions(real_tokenizer, texts_test):
  tok = real_tokenizer
  n = 3 * len(wl.AGENT_SHAPES)
  prompts = wl.agent_prompts(tok, texts_test, "test", n, wl.Sizes(), seed=0)
  assert {(p.info["genre"], p.info["shape"]) for p in prompts} == {
      (g, s.name) for g in txt.GENRES for s in wl.AGENT_SHAPES}
  for p in prompts:
    contexts = [st for st in p.warm if st.kind == "context"]
    alone = {s.content for st in p.warm if st.kind == "segments" for s in st.segments}
    assert len(contexts) == 2
    now = p.request.segments
    systems = {contexts[0].segments[0].content, contexts[1].segments[0].content, now[0].content}
    assert len(systems) == 3  # three agents, three system prompts
    starts_now = dict(zip((s.content for s in now), wl.segment_starts(tok, now)))
    seen_before = {}
    for step in contexts:
      for s, start in zip(step.segments, wl.segment_starts(tok, step.segments)):
        seen_before.setdefault(s.content, start)
    shared = [s.content for s in now[1:-1]]
    tools = [t for t in shared if t.startswith("<|im_start|>tool")]
    assert len(tools) == p.info["tools"] and sum(p.info["fact"] in t for t in tools) == 1
    if p.info["shape"] == "tool-cache":
      assert alone == set(tools)  # the results come from the tool cache, computed alone
      assert not set(tools) & set(seen_before)
    else:
      assert not alone
    for text in shared:
      if text in alone:
        continue
      assert text in seen_before, "a shared message was never computed before"
      assert starts_now[text] != seen_before[text], "a shared message did not move"
    if p.info["shape"] == "debate":  # the debaters quote each other and the results
      a, b = [t for t in shared if "[debater" in t]
      assert "[debater A]" in a and a.split('"')[1] in b
    assert not now[-1].cache
    assert 1300 <= sum(_ntok(tok, s) for s in now) <= 1520  # the token band


def test_musique_prompts_without_the_data_file(real_tokenizer):
  items = [{"question": f"Who wrote book {i}?", "answers": [f"Author {i}"],
            "ctxs": [{"title": "", "text": f"passage {j} of item {i}. " * 80} for j in range(8)]}
           for i in range(6)]
  sizes = wl.Sizes(musique_context_tokens=700)
  prompts = wl.musique_prompts(real_tokenizer, items, "test", 5, sizes)
  assert [p.item for p in prompts] == ["musique[1]", "musique[3]", "musique[5]"]  # odd: test
  for p in prompts:
    passages = p.request.segments[1:-1]
    assert all(s.cache for s in passages) and not p.request.segments[-1].cache
    assert p.info["context_tokens"] <= 700
    assert {s.content for s in p.warm[1].segments} == {s.content for s in passages}
    assert p.task_metric == "f1"


def test_workloads_are_deterministic_and_splits_disjoint(real_tokenizer):
  tok = real_tokenizer
  q = wl.Sizes.quick()
  a = wl.build(tok, ["needle", "chat", "agent"], "dev", 2, q, seed=3)
  b = wl.build(tok, ["needle", "chat", "agent"], "dev", 2, q, seed=3)
  c = wl.build(tok, ["needle", "chat", "agent"], "test", 2, q, seed=3)
  for w in a:
    assert [p.request for p in a[w]] == [p.request for p in b[w]]
    # Segments carrying essay text (templated ones, like the planner's plan, may recur).
    dev_text = {s.content for p in a[w] for s in p.request.segments[1:-1] if len(s.content) > 300}
    test_text = {s.content for p in c[w] for s in p.request.segments[1:-1]
                 if len(s.content) > 300}
    assert dev_text and test_text and not dev_text & test_text


def test_bad_inputs_fail_clearly(tmp_path, real_tokenizer):
  with pytest.raises(FileNotFoundError, match="--data"):
    txt.load_musique(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text('[{"question": "q", "answers": ["a"]}]')
  with pytest.raises(ValueError, match="item 0"):
    txt.load_musique(str(bad))
  bad.write_text("[1, 2,")
  with pytest.raises(ValueError, match="bad.json:1"):
    txt.load_musique(str(bad))
  with pytest.raises(ValueError, match="unknown workload"):
    wl.build(real_tokenizer, ["rag"], "test", 1)
  with pytest.raises(ValueError, match="--data"):
    wl.build(real_tokenizer, ["musique"], "test", 1)
  assert cli.main(["eval", "--workloads", "nope"]) == 2
  assert cli.main(["eval", "--data", str(tmp_path / "missing.json")]) == 2


# ------------------------------------------------------------------------------------------------
# Methods and report
# ------------------------------------------------------------------------------------------------

def by_label_of(grid, label):
  return next(m for m in grid if m.label == label)


def test_method_grid_has_every_baseline_and_every_rules_grid():
  grid = mth.method_grid(mth.FAMILIES, 30)
  labels = [m.label for m in grid]
  # full, 5 baselines and each rule's 5 x 5 grid (each rule's default is one of its points, the
  # paper's at T = round(0.15 * 30) = 5 besides)
  assert labels[0] == "full" and len(labels) == len(set(labels)) == 6 + len(mth.RULES) * 25 + 1
  assert {"prefix", "naive", "cacheblend r=0.15", "epic r=0.15", "random r=0.15 T=4",
          "sparsex r=0.15 T=4", "sparsex r=0.30 T=8", "sparsex r=0.05 T=0",
          "sparsex-attention r=0.15 T=4", "sparsex-attention r=0.10 T=1",
          "sparsex-paper r=0.15 T=5", "sparsex-paper r=0.10 T=1"} <= set(labels)
  assert by_label_of(grid, "sparsex-paper r=0.10 T=1").config == sx.SparseXPaper(
      recompute_ratio=0.10, layer_threshold=1, update_caches=False)
  by_label = {m.label: m for m in grid}
  assert by_label["sparsex r=0.10 T=1"].config == sx.SparseX(
      recompute_ratio=0.10, layer_threshold=1, update_caches=False)
  assert by_label["sparsex-attention r=0.20 T=2"].config == sx.SparseXAttention(
      recompute_ratio=0.20, layer_threshold=2, update_caches=False)
  assert by_label["random r=0.15 T=4"].config == sx.Random(
      recompute_ratio=0.15, layer_threshold=4, update_caches=False)
  assert by_label["sparsex-attention r=0.05 T=8"].family == "sparsex-attention"
  assert all(not m.config.update_caches for m in grid)
  # the default families leave the paper's rule out; each rule's default comes first
  assert len(mth.method_grid(mth.DEFAULT_FAMILIES, 30)) == 6 + 25
  assert [m.label for m in mth.method_grid(["sparsex-attention", "sparsex"], 30, [0.1], [1, 2])] == [
      "full", "sparsex r=0.15 T=4", "sparsex r=0.10 T=1", "sparsex r=0.10 T=2",
      "sparsex-attention r=0.15 T=4", "sparsex-attention r=0.10 T=1", "sparsex-attention r=0.10 T=2"]
  assert mth.default_label(0.1, 1) == "sparsex r=0.10 T=1"
  assert mth.default_method(30).label == "sparsex r=0.15 T=4"
  assert mth.default_method(30).config == sx.SparseX(update_caches=False, layer_threshold=4)
  assert [m.label for m in mth.method_grid(["naive", "sparsex"], 3, [0.1], [2, 8])] == [
      "full", "naive", "sparsex r=0.15 T=3", "sparsex r=0.10 T=2"]  # T=8 > depth: dropped
  with pytest.raises(ValueError, match="unknown method"):
    mth.method_grid(["magic"], 30)
  with pytest.raises(ValueError, match="unknown method"):
    mth.method_grid(["sparsex[axn+heads2]"], 30)


def _fake_run(path, n=12, seed=0, max_new_tokens=32):
  """A raw eval JSON with made-up numbers: naive KL ~ 0.2, sparsex halves it, epic better."""
  rng = np.random.default_rng(seed)
  methods = mth.method_grid(["naive", "epic", "sparsex", "sparsex-attention"], 30, [0.15, 0.3],
                            [2, 4])
  meta = {"device": "cpu", "platform": "cpu", "jax": "x", "python": "3", "date": "d",
          "command": "sparsex eval --fake", "model": "m", "model_name": "m", "dtype": "float32",
          "split": "test", "workloads": ["needle", "chat"], "default_label": "sparsex r=0.15 T=4",
          "labels": mth.LABELS,
          "max_new_tokens": max_new_tokens,
          "methods": [{"label": m.label, "family": m.family, "ratio": m.ratio,
                       "threshold": m.threshold} for m in methods], "complete": True,
          "elapsed_s": 1.0, "notes": []}
  # the paper's rule a little worse than the default
  factor = {"full": 0.0, "naive": 1.0, "epic r=0.15": 0.3}
  factor |= {m.label: (0.6 if m.threshold == 4 else 0.9) for m in methods
             if m.family == "sparsex-attention"}
  prompts = []
  for w in ("needle", "chat"):
    for i in range(n):
      base = rng.exponential(0.2)
      res = {}
      for m in methods:
        f = factor.get(m.label, 0.5 if m.threshold == 4 else 0.8)
        res[m.label] = {"kl": base * f * rng.uniform(0.9, 1.1), "top1": True, "em": f < 0.6,
                        "match_len": 3, "task": float(f < 0.9), "text": "x", "n_generated": 3,
                        "n_exact": 0, "n_reused": 100, "n_new": 10, "n_recomputed": 15,
                        "frac_recomputed": 0.15, "ttft_s": 0.01, "prefill_s": 0.01}
      prompts.append({"key": f"{w}/test/{i}", "workload": w, "split": "test", "index": i,
                      "item": "", "n_prompt": 110, "task_metric": "contains", "answers": ["a"],
                      "info": {}, "results": res})
  with open(path, "w") as f:
    json.dump({"meta": meta, "prompts": prompts}, f)


def test_report_summaries_tables_and_plots(tmp_path):
  raw = str(tmp_path / "raw.json")
  _fake_run(raw)
  ttft = tmp_path / "ttft.json"
  ttft.write_text(json.dumps({"device": "H100", "labels": mth.LABELS, "ttft": [
      {"policy": "full", "ttft_ms_median": 250.0, "preset": "llama3-8b", "n_prompt": 8000},
      {"policy": "naive", "ttft_ms_median": 45.0, "preset": "llama3-8b", "n_prompt": 8000},
      {"policy": "sparsex r=0.15 T=4", "ttft_ms_median": 95.0, "preset": "llama3-8b",
       "n_prompt": 8000}]}))
  out = str(tmp_path / "eval_test")
  summary = report.render([raw], out, [str(ttft)], n_boot=300)
  for w in ("needle", "chat"):
    gr = summary["workloads"][w]["methods"]
    assert gr["naive"]["gap_recovered"]["mean"] == pytest.approx(0.0)
    assert gr["full"]["gap_recovered"]["mean"] == pytest.approx(1.0)
    assert 0.4 < gr["sparsex r=0.15 T=4"]["gap_recovered"]["mean"] < 0.6
  o = summary["overall"]["epic r=0.15"]["gap_recovered"]
  assert 0.6 < o["mean"] < 0.8 and o["ci"][0] <= o["mean"] <= o["ci"][1]
  verdicts = {(c["method"], c["vs"]): c["verdict"] for c in summary["comparisons"]}
  assert verdicts[("epic r=0.15", "sparsex r=0.15 T=4")] == "better"
  assert verdicts[("naive", "sparsex r=0.15 T=4")] == "worse"
  assert verdicts[("sparsex-attention r=0.15 T=4", "sparsex r=0.15 T=4")] == "worse"
  paper = summary["overall"]["sparsex-attention r=0.15 T=4"]["gap_recovered"]["mean"]
  assert 0.3 < paper < 0.5
  assert "epic r=0.15" in summary["ttft_missing"] and "naive" not in summary["ttft_missing"]
  assert summary["ttft"]["sparsex r=0.15 T=4"]["ttft_ms"] == 95.0
  for suffix in (".md", ".json", "_heatmap.png", "_ttft.png"):
    assert os.path.getsize(out + suffix) > 0
  md = open(out + ".md").read()
  assert "sparsex eval --fake" in md and "left out of the plot" in md
  # one grid table per rule (rows T = 2, 4; columns r = 0.15, 0.30), the heatmap with the first
  assert md.count("| T \\ r | 0.15 | 0.30 |") == 2 and md.count("_heatmap.png") == 1
  assert md.index("## Grid of sparsex (") < md.index("_heatmap.png") < md.index(
      "## Grid of sparsex-attention (")
  assert "| exact 32 | task | task - full |" in md and "KL-only" not in md
  # A KL-only run has no answers: its tables say so instead of showing task scores of 0.
  kl_only = str(tmp_path / "kl_only.json")
  _fake_run(kl_only, max_new_tokens=1)
  report.render([kl_only], str(tmp_path / "kl_only"), [], n_boot=100)
  md = open(str(tmp_path / "kl_only.md")).read()
  assert "KL-only run" in md and "| task |" not in md and "| exact" not in md
  rows = [line for line in md.splitlines() if line.startswith("| naive |")]
  assert rows and all(row.count("|") == 8 for row in rows[1:])  # 7 cells per workload row
  # Re-rendering the merged output (and merging two runs) works from JSON alone.
  raw2 = str(tmp_path / "raw2.json")
  _fake_run(raw2, seed=1)
  report.render([out + ".json", raw2], str(tmp_path / "merged"), [], n_boot=100)
  assert "sparsex eval --fake" in open(str(tmp_path / "merged.md")).read()


def test_report_joins_runs_that_split_the_methods(tmp_path):
  """Two runs on the same prompts join into one report: every method of both, the shared ones
  (full, naive, the default rule's cells both ran) from the later run; each rule keeps its grid."""
  old, new = str(tmp_path / "old.json"), str(tmp_path / "new.json")
  _fake_run(old, n=8, seed=2)
  _fake_run(new, n=8, seed=3)
  kept = {"sparsex r=0.15 T=4", "sparsex r=0.30 T=2"}
  data = json.load(open(new))  # the newer run: the default rule at two cells, plus the baselines
  data["meta"]["methods"] = [m for m in data["meta"]["methods"]
                             if m["label"] in kept or m["family"] not in mth.RULES]
  for p in data["prompts"]:
    p["results"] = {k: v for k, v in p["results"].items()
                    if k in kept or not k.startswith("sparsex")}
  json.dump(data, open(new, "w"))
  metas, prompts = report.load_runs([old, new])
  assert len(prompts) == 16
  by_key = {p["key"]: p for p in prompts}
  old_prompt = json.load(open(old))["prompts"][0]
  joined = by_key[old_prompt["key"]]["results"]
  assert joined["sparsex-attention r=0.15 T=4"] == old_prompt["results"]["sparsex-attention r=0.15 T=4"]
  assert joined["sparsex r=0.30 T=4"] == old_prompt["results"]["sparsex r=0.30 T=4"]
  for label in ("naive", "sparsex r=0.15 T=4"):  # the later run's
    assert joined[label] == data["prompts"][0]["results"][label]
    assert joined[label] != old_prompt["results"][label]
  summary = report.render([old, new], str(tmp_path / "joined"), [], n_boot=100)
  assert summary["default_label"] == "sparsex r=0.15 T=4"
  meta = report.merged_meta(metas)
  assert [m["label"] for m in meta["methods"]].count("sparsex r=0.15 T=4") == 1
  cell = lambda label: summary["overall"][label]["gap_recovered"]["mean"]  # noqa: E731
  for family in ("sparsex", "sparsex-attention"):  # the rules these runs have
    ts, rs, g = report._grid(meta, summary, family)
    assert ts == [2, 4] and rs == [0.15, 0.30]
    for t in ts:
      for r in rs:
        assert g[ts.index(t), rs.index(r)] == cell(mth.label(family, r, t))


def test_result_files_of_the_old_labels_are_read_in_todays(tmp_path):
  """Before "labels", "sparsex r=.." was the paper's rule and the default rule was named by its
  options: eval JSON and bench_ttft JSON are read in today's labels, so they join the right
  method (the removed rules keep their names, each its own family)."""
  raw = str(tmp_path / "raw.json")
  _fake_run(raw, n=6)
  data = json.load(open(raw))
  before = {"sparsex-attention r=0.15 T=4": "sparsex r=0.15 T=4",
            "sparsex r=0.15 T=4": "sparsex[axn+heads2+fresh+attn2] r=0.15 T=4",
            "sparsex r=0.15 T=2": "sparsex[axn+heads2+fresh+attn2] r=0.15 T=2"}
  keep = {"full", "naive", "epic r=0.15"} | set(before)
  data["meta"] = {**{k: v for k, v in data["meta"].items() if k != "labels"},
                  "default_label": before["sparsex r=0.15 T=4"], "methods": [
                      {**m, "label": before.get(m["label"], m["label"]), "family": "sparsex"
                       if m["label"] in before else m["family"]}
                      for m in data["meta"]["methods"] if m["label"] in keep]}
  data["meta"]["methods"].append({"label": "sparsex[axn+heads2] r=0.15 T=4", "family": "sparsex",
                                  "ratio": 0.15, "threshold": 4})
  for p in data["prompts"]:
    res = {before.get(k, k): v for k, v in p["results"].items() if k in keep}
    p["results"] = res | {"sparsex[axn+heads2] r=0.15 T=4": dict(res["naive"])}
  json.dump(data, open(raw, "w"))
  metas, prompts = report.load_runs([raw])
  (meta,) = metas
  assert meta["default_label"] == "sparsex r=0.15 T=4" and meta["labels"] == mth.LABELS
  assert {m["label"]: m["family"] for m in meta["methods"]} == {
      "full": "full", "naive": "naive", "epic r=0.15": "epic",
      "sparsex-attention r=0.15 T=4": "sparsex-attention", "sparsex r=0.15 T=4": "sparsex",
      "sparsex r=0.15 T=2": "sparsex", "sparsex[axn+heads2] r=0.15 T=4": "sparsex[axn+heads2]"}
  original = json.load(open(raw))["prompts"][0]["results"]
  assert prompts[0]["results"]["sparsex-attention r=0.15 T=4"] == original["sparsex r=0.15 T=4"]
  summary = report.render([raw], str(tmp_path / "out"), [], n_boot=100)
  ts, rs, g = report._grid(meta, summary, "sparsex")
  assert (ts, rs) == ([2, 4], [0.15])  # the removed rule is no cell of the default's grid
  assert mth.current_label("sparsex[axn+heads2+fresh] r=0.10 T=1") == "sparsex r=0.10 T=1"
  assert mth.current_label("sparsex[axn+heads2+fresh] r=0.10 T=4") == (
      "sparsex[axn+heads2+fresh] r=0.10 T=4")  # not the default at T >= 2
  assert mth.current_label("epic r=0.15") == "epic r=0.15"
  # the TTFT file `sparsex eval` joins by default was written before "labels"
  ttft = report.load_ttft([os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "docs", "results", "ttft_h100_thresholds.json")])
  assert {"sparsex-attention r=0.15 T=4", "sparsex-attention r=0.30 T=2", "naive"} <= set(ttft)
  assert not any(k.startswith("sparsex ") for k in ttft)


def test_report_refuses_to_merge_splits(tmp_path):
  a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
  _fake_run(a)
  _fake_run(b)
  data = json.load(open(b))
  data["meta"]["split"] = "dev"
  json.dump(data, open(b, "w"))
  with pytest.raises(ValueError, match="splits"):
    report.load_runs([a, b])


def test_public_api_only():
  """The suite must keep working while engine internals move: no private imports (the studies
  beside it, oracle.py and the rest, read the engine's pools on purpose)."""
  import sparsex_jax.research as ev
  folder = os.path.dirname(ev.__file__)
  for name in ("methods.py", "metrics.py", "report.py", "runner.py", "selection.py", "text.py",
               "workloads.py"):
    src = open(os.path.join(folder, name)).read()
    for banned in ("sparsex_jax.engine", "sparsex_jax.planner", "sparsex_jax.prefill",
                   "engine._", "from models"):
      assert banned not in src, f"{name} uses {banned}"
  assert sx.ReuseConfig(update_caches=False).update_caches is False


def test_one_greedy_token_is_the_token_generate_gives(real_tokenizer, texts_test):
  """A KL-only run (--max-new-tokens 1) takes its token from the prefill's logits instead of a
  second prefill: it must be the token `generate` gives, method by method (random weights at
  SmolLM2's shapes, 4 layers: the sparse path runs from T = 2, over two layers)."""
  from models import llama
  from models.config import get_config
  from sparsex_jax.research import runner
  cfg = get_config("smollm2-135m", dtype="float32").replace(n_layers=4)
  engine = sx.Engine(cfg, llama.init_params(cfg, 3), real_tokenizer, num_pages=160)
  prompt = wl.chat_prompts(real_tokenizer, texts_test, "test", 1, wl.Sizes.quick())[0]
  methods = mth.method_grid(["naive", "epic", "sparsex", "sparsex-attention"], cfg.n_layers,
                            ratios=(0.15,), thresholds=(2,))
  one = sx.SamplingParams(max_new_tokens=1, temperature=0.0)
  rec = runner.evaluate_prompt(engine, prompt, methods, one)
  naive = rec["results"]["naive"]
  assert naive["n_reused"] > 0 and naive["kl"] > 0
  for m in methods:
    engine.clear_caches()
    for step in prompt.warm:
      runner.apply_warm(engine, step)
    out = engine.generate([prompt.request], one, reuse=m.config)[0]
    got = rec["results"][m.label]
    assert (got["text"], got["n_generated"]) == (out.text, len(out.token_ids)), m.label


def test_far_tier_round_trip_gives_back_what_an_int8_tier_holds(real_tokenizer, texts_test):
  """--far-tier int8: every cached segment's K/V become an integer multiple of s = max|x| / 127 per
  token and head, the nearest one to x (numpy here, independently of kv/host_tier.py; ties may
  round either way in float32); the reuse then reads them, so naive reuse's KL moves, but by
  little against what reuse itself costs."""
  from models import llama
  from models.config import get_config
  from sparsex_jax.research import runner
  cfg = get_config("smollm2-135m", dtype="float32").replace(n_layers=3)
  engine = sx.Engine(cfg, llama.init_params(cfg, 5), real_tokenizer, num_pages=160)
  prompt = wl.chat_prompts(real_tokenizer, texts_test, "test", 1, wl.Sizes.quick())[0]
  engine.clear_caches()
  for step in prompt.warm:
    runner.apply_warm(engine, step)
  store = engine.store
  keys = store.segment_cache.keys()
  before = {key: store.page_io.read_pages(store.segment_cache.get(key).pages) for key in keys}
  assert runner.round_trip_segments(engine, "int8") == len(keys) > 0
  for key in keys:
    after = store.page_io.read_pages(store.segment_cache.get(key).pages)
    for x, y in zip(before[key], after):
      x = x.astype(np.float64)
      s = np.abs(x).max(axis=-1, keepdims=True) / 127.0
      q = y / np.where(s > 0, s, 1.0)
      np.testing.assert_allclose(q, np.rint(q), atol=1e-3)  # on the grid of s
      assert np.all(np.abs(y - x) <= s * (0.5 + 1e-3) + 1e-7)  # the nearest point of it
      assert np.mean(np.abs(y - x)) > 0.1 * np.mean(s)  # it did change the values
  naive = mth.method_grid(["naive"], cfg.n_layers, ratios=(0.15,), thresholds=(1,))
  one = sx.SamplingParams(max_new_tokens=1, temperature=0.0)
  native = runner.evaluate_prompt(engine, prompt, naive, one)["results"]["naive"]["kl"]
  int8 = runner.evaluate_prompt(engine, prompt, naive, one, "int8")["results"]["naive"]["kl"]
  assert native > 0 and int8 != native and abs(int8 - native) < 0.2 * native
