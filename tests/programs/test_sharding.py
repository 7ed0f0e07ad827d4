"""Tensor parallelism on 4 fake CPU devices (tests/programs/sharding_check.py, in its own process: the
device count must be set before jax is imported). About 2 minutes on 2 CPU cores. Expert
parallelism of Qwen3 MoE on 2 (tests/programs/qwen3_sharding_check.py, about 25 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.research.scripts import CHEAP_XLA_FLAGS

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Fake devices, and a cheaper XLA CPU compile: the check compiles about 40 small programs.
_XLA_FLAGS = "--xla_force_host_platform_device_count=4 " + CHEAP_XLA_FLAGS


def _run(*args: str, timeout: int = 600, devices: int = 4) -> subprocess.CompletedProcess:
  flags = _XLA_FLAGS.replace("device_count=4", f"device_count={devices}")
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=_ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_sharded_engine_matches_unsharded_on_1_2_4_devices():
  proc = _run("-m", "tests.programs.sharding_check", "--tp", "1", "2", "4")
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  failed = [r for r in rows if not r.get("ok", True)]
  assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
  checks = {r.get("check") for r in rows}
  assert {"logits", "greedy tokens", "weights per device", "pool per device",
          "decode all-reduces of the residual stream per layer",
          "compiled ahead, nothing compiled at run", "host tier under a mesh"} <= checks
  policies = {tp: sum(r.get("check") == "logits" and r["tp"] == tp for r in rows)
              for tp in (1, 2, 4)}
  assert policies == {1: 3, 2: 10, 4: 3}, policies  # every policy at 2, three at 1 and 4


def test_qwen3_moe_experts_split_over_2_devices_match_one_device():
  """Expert parallelism (tests/programs/qwen3_sharding_check.py, about 25 s)."""
  proc = _run("-m", "tests.programs.qwen3_sharding_check", devices=2)
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  failed = [r for r in rows if not r.get("ok", True)]
  assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
  checks = [r.get("check") for r in rows]
  assert checks.count("logits") == 2 and {
      "greedy tokens", "expert_gate split by experts", "router replicated",
      "decode all-reduces of the residual stream per layer"} <= set(checks)


def test_bench_tp_smoke_on_2_fake_devices(tmp_path):
  proc = _run("scripts/bench_tp.py", "--smoke", "--tp", "none", "2", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads((tmp_path / "bench_tp.json").read_text())
  assert [r["layout"] for r in res["layouts"]] == ["none", "2"] and not res["errors"]
  sharded = res["layouts"][1]
  assert set(sharded["ttft"]) == {"sparsex", "full"} and sharded["decode"]["ms_per_step"] > 0
  assert all(c["rel_err_vs_none"] < 1e-5 for name, c in sharded["checks"].items()
             if name in ("sparsex", "full"))
  assert sharded["checks"]["decode_tokens_equal"]
  assert abs(sharded["pool_gb_per_device"] * 2 / res["layouts"][0]["pool_gb_per_device"] - 1) < 1e-9


def test_cli_tp_flag(tmp_path):
  req = tmp_path / "req.jsonl"
  req.write_text("".join(json.dumps({"id": f"r{i}", "max_new_tokens": 3, "segments": [
      {"tokens": list(range(10, 50))}, {"tokens": list(range(100 + i, 110 + i)),
                                        "cache": False}]}) + "\n" for i in range(2)))
  outs = {}
  for tp in ("2", "4"):  # tiny has 2 KV heads: tp 4 is refused, naming the degrees that work
    out = tmp_path / f"out{tp}.jsonl"
    proc = _run("-m", "sparsex_jax.entrypoints.cli", "generate", "--model", "random:tiny", "--tp", tp,
                "--input", str(req), "--output", str(out), "--no-progress", "--pool-gib", "0.01")
    outs[tp] = (proc, out)
  proc, out = outs["2"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [json.loads(line)["finish_reason"] for line in out.read_text().splitlines()] == [
      "length", "length"]
  proc, _ = outs["4"]
  assert proc.returncode == 2 and "degrees that work: [1, 2]" in proc.stderr
