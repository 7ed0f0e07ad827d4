"""`sparsex eval --quick` end to end on CPU with the real model (about 1.5 minutes on 2 cores):
one prompt per essay workload (MuSiQue is skipped without --data), three methods, 4 tokens."""

import json
import os

from sparsex_jax.entrypoints import cli

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TTFT = os.path.join(_ROOT, "docs", "results", "ttft_h100_thresholds.json")


def test_eval_quick_runs_end_to_end(tmp_path, capsys):
  out = str(tmp_path / "eval_quick")
  argv = ["eval", "--quick", "--prompts", "1", "--methods", "full,naive,sparsex",
          "--max-new-tokens", "4", "--out", out, "--ttft", _TTFT, "--bootstrap", "200"]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert "musique workload skipped" in printed
  data = json.load(open(out + ".json"))
  meta = data["meta"]
  for key in ("device", "jax", "date", "command", "platform"):
    assert meta[key]
  assert meta["command"].startswith("sparsex eval --quick") and meta["complete"]
  assert meta["workloads"] == ["needle", "chat", "agent"]
  labels = [m["label"] for m in meta["methods"]]
  assert labels == ["full", "naive", "sparsex r=0.15 T=4"]
  assert len(data["prompts"]) == 3
  for p in data["prompts"]:
    full = p["results"]["full"]
    assert full["kl"] == 0.0 and full["em"] and full["n_reused"] == 0
    naive = p["results"]["naive"]
    assert naive["n_reused"] > 0 and naive["n_recomputed"] == 0 and naive["kl"] >= 0
    sparsex = p["results"]["sparsex r=0.15 T=4"]
    assert sparsex["n_recomputed"] == -(-15 * sparsex["n_reused"] // 100)  # ceil(0.15 n)
    assert 0 < sparsex["frac_recomputed"] < 0.2
  summary = data["summary"]
  assert set(summary["workloads"]) == {"needle", "chat", "agent"}
  assert "sparsex r=0.15 T=4" in summary["overall"]
  for suffix in (".md", "_heatmap.png", "_ttft.png"):
    assert os.path.getsize(out + suffix) > 0
  assert "musique workload skipped" in open(out + ".md").read()
