"""scripts/bench_throughput.py runs end to end on CPU with --smoke, and its report renders."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_throughput  # noqa: E402


def test_smoke_run_writes_json_and_the_report_renders(tmp_path):
  out = tmp_path / "throughput.json"
  bench_throughput.main(["--smoke", "--out", str(out), "--requests", "10", "--warmup-requests",
                         "4", "--layer-loops", "scan,per_layer", "--micro-batches", "2"])
  res = json.loads(out.read_text())
  assert res["errors"] == []
  runs = {r["batching"]: r for r in res["job"]["runs"]}
  assert set(runs) == {"static", "continuous"}
  for r in runs.values():
    assert r["errors"] == 0 and r["requests"] == 10 and r["output_tokens"] >= 10 * 2
    assert 0 < r["peak_pages"] <= r["pool_pages"]
  # Every request ran to its own length in both (no stop tokens).
  assert runs["static"]["output_tokens"] == runs["continuous"]["output_tokens"]
  loops = {r["layer_loop"]: r for r in res["decode_step"]}
  # Separate per-layer arrays: no slice of the stack to copy (on CPU, XLA still copies wo into
  # the dot's layout; the scan also copies the MLP weights and more).
  assert loops["per_layer"]["weight_sized_buffers"] < loops["scan"]["weight_sized_buffers"]
  assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in res["decode_step"])
  assert [r["steps_per_visit"] for r in res["engine_decode"]] == [1, 4]
  md = tmp_path / "throughput.md"
  bench_throughput.report(str(out), str(md))
  text = md.read_text()
  assert "| continuous |" in text and "byte floor" in text
  assert (tmp_path / "throughput.png").stat().st_size > 0
