"""scripts/bench_replicas.py: the smoke job end to end on Ray (one replica, then two with affinity;
round-robin against affinity is tests/batch/test_replicas.py's), and its GPU-utilization sampler
against a stand-in nvidia-smi."""

import json
import os
import stat

from tests.research.scripts import load_script, run_script


def test_bench_replicas_smoke_writes_both_runs_with_affinity_tokens(tmp_path):
  out = tmp_path / "br"
  proc = run_script("bench_replicas", "--smoke", "--no-round-robin", "--out", str(out),
                    timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((out / "bench_replicas.json").read_text())
  one, two = report["runs"]
  assert [r["label"] for r in (one, two)] == ["one", "two"]
  n = report["config"]["requests"]
  for r in (one, two):
    assert r["done"] == n and r["failed"] == 0 and r["requests_per_s"] > 0
    assert sum(p["requests"] for p in r["per_replica"]) == n
    assert r["gpu_utilization"] is None  # no nvidia-smi here
  assert two["tokens_computed"] <= 1.1 * one["tokens_computed"]  # each passage on one replica
  assert report["tokens_ratio"] == round(two["tokens_computed"] / one["tokens_computed"], 3)
  assert report["identical_outputs_one_vs_two"] == 1.0  # greedy, float32 on the CPU


def test_gpu_utilization_reads_nvidia_smi_samples(tmp_path, monkeypatch):
  fake = tmp_path / "nvidia-smi"
  # Prints the samples nvidia-smi's -lms loop would, then waits to be terminated.
  fake.write_text("#!/bin/sh\nprintf '97\\n12\\n100\\n3\\n'\nexec sleep 30\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  bench = load_script("bench_replicas")
  with bench.GpuUtilization() as util:
    import time
    time.sleep(0.5)
  assert util.summary() == {"mean_pct": 53.0, "p50_pct": 54.5, "idle_share": 0.5, "samples": 4}
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  with bench.GpuUtilization() as util:
    pass
  assert util.summary() is None
