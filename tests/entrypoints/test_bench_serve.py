"""scripts/bench_serve.py --smoke: the load benchmark end to end on CPU (the tiny random model, two
`sparsex serve` subprocesses, the official openai client): its JSON has the percentiles,
throughput and hit rates of both configurations, and only sparsex reuse hits segments."""

import json

import pytest

from tests.research.scripts import run_script


def test_bench_serve_smoke_writes_both_configurations_and_only_sparsex_hits_segments(tmp_path):
  out = tmp_path / "bench"
  # A cheaper XLA CPU compile in the script and the servers it starts (tests/research/scripts.py).
  proc = run_script("bench_serve", "--smoke", "--rate", "8", "--out", str(out), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "bench_serve.json").read_text())
  assert (out / "bench_serve.png").stat().st_size > 0
  for key in ("command", "date", "device", "jax", "config", "workload", "comparison"):
    assert key in report, key
  n = report["workload"]["requests"]
  for reuse in ("sparsex", "prefix"):
    res = report["results"][reuse]
    assert res["reuse"] == reuse and res["requests"] == n and not res["errors"]
    for metric in ("ttft_s", "tpot_s", "e2e_s"):
      p = res[metric]
      assert 0 < p["p50"] <= p["p90"] <= p["p99"], (reuse, metric, p)
    assert res["throughput"]["output_tokens_per_s"] > 0
    assert res["compile_ahead_wait_s"] >= 0  # the clock ran after the compile thread's list
    assert res["cut_at_time_limit"] is False and res["unanswered"] == 0
    assert res["server_metrics"]["generation_tokens_total"] == sum(
        r["output_tokens"] for r in res["records"])
  sparsex, prefix = (report["results"][r]["server_metrics"] for r in ("sparsex", "prefix"))
  assert sparsex["segment_cache_hit_rate"] > 0 and sparsex["reused_tokens_total"] > 0
  assert prefix["segment_cache_hit_rate"] == 0 and prefix["reused_tokens_total"] == 0
  assert prefix["exact_tokens_total"] > 0  # later turns resend earlier ones: prefix hits
  assert set(report["comparison"]) >= {"p50_ttft_cut", "p50_tpot_ratio", "target_met"}
  # prefill work in full-token units: prefix-only's is its tokens not served exact
  res = report["results"]
  assert res["prefix"]["prefill_work_tokens"] == (
      prefix["prompt_tokens_total"] - prefix["exact_tokens_total"])
  assert 0 < res["sparsex"]["prefill_work_tokens"] < sparsex["prompt_tokens_total"]
  assert report["comparison"]["prefill_work_cut"] == pytest.approx(
      res["prefix"]["prefill_work_tokens"] / res["sparsex"]["prefill_work_tokens"])

  # --merge: the run split in two (one configuration each, as two device calls would make it)
  # merges back into the same comparison; runs of different loads refuse to merge.
  halves = []
  for reuse in ("prefix", "sparsex"):
    half = dict(report, results={reuse: report["results"][reuse]})
    half.pop("comparison")
    halves.append(tmp_path / f"{reuse}.json")
    halves[-1].write_text(json.dumps(half))
  merged_dir = tmp_path / "merged"
  proc = run_script("bench_serve", "--merge", *map(str, halves), "--out", str(merged_dir),
                    timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  merged = json.loads((merged_dir / "bench_serve.json").read_text())
  assert merged["comparison"] == report["comparison"]
  assert [m["path"] for m in merged["merged_from"]] == list(map(str, halves))
  other = json.loads(halves[1].read_text())
  other["config"]["rate"] = 99.0
  halves[1].write_text(json.dumps(other))
  proc = run_script("bench_serve", "--merge", *map(str, halves), "--out", str(merged_dir),
                    timeout=120)
  assert proc.returncode != 0 and "config rate 99.0 differs" in proc.stderr, proc.stderr[-2000:]


def test_bench_serve_cuts_a_run_at_its_time_limit_and_still_reports_it(tmp_path):
  """--time-limit: what a configuration's timed run has not answered by then is cancelled, and
  the report is written with the requests answered, marked cut (round 22's GPU run stalled and
  was killed by the machine's time limit with nothing written)."""
  out = tmp_path / "bench"
  proc = run_script("bench_serve", "--smoke", "--rate", "8", "--reuses", "sparsex",
                    "--time-limit", "1", "--out", str(out), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cut at the time limit" in proc.stdout
  res = json.loads((out / "bench_serve.json").read_text())["results"]["sparsex"]
  n = json.loads((out / "bench_serve.json").read_text())["workload"]["requests"]
  assert res["cut_at_time_limit"] is True
  assert res["unanswered"] > 0 and res["requests"] + res["unanswered"] + len(res["errors"]) >= n
  assert 1 <= res["elapsed_s"] < 30
