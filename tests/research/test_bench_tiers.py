"""scripts/bench_tiers.py runs end to end on CPU with --smoke (the tiny model): every scenario is
timed, the host-tier scenarios move layers [T, L) only and run the prefill in its two halves, and
the JSON and plot are written."""

import json

from tests.research.scripts import run_script


def test_smoke_run_times_every_tier_and_moves_layers_from_t(tmp_path):
  proc = run_script("bench_tiers", "--smoke", "--runs", "2", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads((tmp_path / "tiers.json").read_text())
  (row,) = res["rows"]
  assert res["preset"] == "tiny" and "bench_tiers.py --smoke" in res["command"]
  for name in ("dense", "full", "pool", "host", "host-serial", "host-inputs-after", "host-int8",
               "disk"):
    assert row[name]["ttft_ms"] > 0 and len(row[name]["runs_ms"]) == 2
  t, n_layers = row["layer_threshold"], row["n_layers"]
  assert 0 < t < n_layers and row["expected_moved_fraction"] == (n_layers - t) / n_layers
  for name in ("host", "host-serial", "host-inputs-after", "host-int8"):
    assert row[name]["moved_fraction"] == row["expected_moved_fraction"]
    assert {"prefill_full_layers", "prefill_rest", "write_page_layers"} <= set(
        row[name]["programs"])
    assert row[name]["tier_stats"]["loads"] == 3 * row["n_passages"]  # warm-up + 2 runs
    if name != "host-serial":  # its copies are written before the prefill: not timed
      assert row[name]["tier_stats"]["loads_timed"] == 3  # one per request, warm-up included
      assert 0 <= row[name]["exposed_ms_per_request"] <= row[name]["copy_ms_per_request"]
  # 8-bit values and a float32 scale per row of head_dim values move instead of 32-bit ones
  assert row["host-int8"]["bytes_moved"] < row["host"]["bytes_moved"] / 2
  assert (tmp_path / "tiers.png").stat().st_size > 0
