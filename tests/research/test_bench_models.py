"""scripts/bench_models.py runs end to end on CPU with --smoke (a Qwen3 MoE at tiny shapes), and the
floors count a mixture of experts' weights as a token and a batch read them."""

import json

from models.config import get_config
from sparsex_jax.research import ttft
from tests.research.scripts import run_script


def test_moe_floors_count_the_experts_tokens_reach():
  cfg = get_config("qwen3-30b-a3b")
  d, fe = cfg.d_model, cfg.moe_ffn_dim
  attention = ttft.layer_params(cfg) - cfg.ffn_params(active=True)
  # FLOPs: a token multiplies by the router and its 8 experts, not all 128.
  assert ttft.layer_params(cfg) == attention + d * 128 + 8 * 3 * d * fe
  # Bytes: one token reads its 8 experts; thousands read every expert.
  assert ttft.layer_weights_read(cfg, 1) == attention + d * 128 + 8 * 3 * d * fe
  assert abs(ttft.layer_weights_read(cfg, 8192) - (attention + d * 128 + 128 * 3 * d * fe)) < 1
  dense = get_config("qwen3-8b")
  assert ttft.layer_weights_read(dense, 1) == ttft.layer_params(dense)
  ceil = {"matmul_tflops": 800.0, "copy_gbps": 3000.0}
  small, large = (ttft.decode_floor(cfg, b, 4096, ceil) for b in (1, 16))
  assert small["bound"] == "bytes" and large["bytes"] > small["bytes"]


def test_smoke_run_writes_json(tmp_path):
  # In a process of its own: a cheaper XLA compile (tests/research/scripts.py).
  proc = run_script("bench_models", "--smoke", "--presets", "qwen3-30b-a3b", "--out", str(tmp_path))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads((tmp_path / "bench_models.json").read_text())
  assert res["errors"] == []
  assert [p["preset"] for p in res["presets"]] == ["qwen3-30b-a3b"]
  assert res["presets"][0]["grouped_matmul"] == "xla"  # the CPU: no Mosaic GPU kernel
  assert {r["policy"] for r in res["ttft"]} == {"dense prefill", "full", "sparsex r=0.15 T=4"}
  for row in res["ttft"] + res["decode"]:
    assert row["floor_ms"] > 0 and row["bound"] in ("flops", "bytes")
  assert res["decode"][0]["decode_ms_per_step"] > 0 and res["decode"][0]["batch"] == 2
