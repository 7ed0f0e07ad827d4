"""scripts/bench_throughput.py runs end to end on CPU with --smoke, and its report renders."""

import json

import numpy as np
import pytest

from tests.research.scripts import load_script, run_script

bench_throughput = load_script("bench_throughput")


def test_smoke_run_writes_json_and_the_report_renders(tmp_path):
  out = tmp_path / "throughput.json"
  # Warm-up with the job itself (--warmup-requests 0): the timed runs compile nothing. In a
  # process of its own: a cheaper XLA compile (tests/research/scripts.py).
  proc = run_script("bench_throughput", "--smoke", "--out", str(out), "--requests", "10",
                    "--warmup-requests", "0", "--lengths", "loguniform", "--layer-loops",
                    "scan,per_layer", "--micro-batches", "2")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["errors"] == []
  runs = {r["batching"]: r for r in res["job"]["runs"]}
  assert set(runs) == {"static", "continuous"}
  for r in runs.values():
    assert r["errors"] == 0 and r["requests"] == 10 and r["output_tokens"] >= 10 * 2
    assert 0 < r["peak_pages"] <= r["pool_pages"]
  # Every request ran to its own length in both (no stop tokens).
  assert runs["static"]["output_tokens"] == runs["continuous"]["output_tokens"]
  for r in runs.values():
    assert r["compilations_during_job"] == 0 and r["compile_s"] == 0.0
    assert r["warmup"]["requests"] == 10 and r["warmup"]["compilations_during_job"] > 0
    assert r["warmup"]["compile_s"] > 0
  for r in runs.values():  # the first token of each request comes from its prefill
    ph = r["phases"]
    assert ph["decode_tokens"] == r["output_tokens"] - r["requests"]
    assert 0 < ph["occupancy"] <= 1 and ph["decode_steps"] > 0
  cont = runs["continuous"]
  assert cont["speedup"] == cont["output_tokens_per_s"] / runs["static"]["output_tokens_per_s"]
  # Hiding prefill can only help: the prefill-free bound is above the every-row-busy one.
  assert cont["bound_prefill_free"] > cont["bound_every_row_busy"] > 0
  loops = {r["layer_loop"]: r for r in res["decode_step"]}
  # Separate per-layer arrays: no slice of the stack to copy (on CPU, XLA still copies wo into
  # the dot's layout; the scan also copies the MLP weights and more).
  assert loops["per_layer"]["weight_sized_buffers"] < loops["scan"]["weight_sized_buffers"]
  assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in res["decode_step"])
  assert [r["steps_per_visit"] for r in res["engine_decode"]] == [1, 4]
  md = tmp_path / "throughput.md"
  bench_throughput.report(str(out), str(md))
  text = md.read_text()
  assert "| continuous |" in text and "byte floor" in text and "(loguniform)" in text
  assert (tmp_path / "throughput.png").stat().st_size > 0


def test_output_lengths_stay_in_range_and_loguniform_favours_short_ones():
  rng = np.random.default_rng(0)
  draws = {d: np.array([bench_throughput.output_length(rng, 16, 256, d) for _ in range(4000)])
           for d in bench_throughput.LENGTHS}
  for d, x in draws.items():
    assert x.min() == 16 and x.max() == 256, d
  # uniform: mean (16 + 256) / 2; log-uniform: (257 - 16) / ln(257 / 16) = 86.8, each doubling
  # equally likely (16..32 as often as 128..256).
  assert abs(draws["uniform"].mean() - 136) < 4
  assert abs(draws["loguniform"].mean() - 86.8) < 4
  low, high = (draws["loguniform"] < 32).mean(), (draws["loguniform"] >= 128).mean()
  assert abs(low - high) < 0.04 and abs(low - 0.25) < 0.03
  with pytest.raises(ValueError, match="--lengths"):
    bench_throughput.output_length(rng, 16, 256, "zipf")


def test_static_batching_gives_the_engines_tokens_and_isolates_a_request_too_big():
  import sparsex_jax as sx
  from sparsex_jax.research import baselines
  from tests.engine.test_engine import _engine, _ids
  eng = _engine(num_pages=12, max_batch_size=2, steps_per_visit=2)  # 11 pages of 4 tokens
  lengths = [5, 1, 3, 2]
  reqs = [sx.Request([sx.Segment(_ids(n, n))], id=n, sampling=sx.SamplingParams(
      max_new_tokens=k, temperature=0.8, seed=n, ignore_eos=True))
      for n, k in zip((9, 60, 13, 7), lengths)]
  seen = []
  static = baselines.generate_static(eng, reqs, reuse=sx.ReuseConfig("full"), on_error="return",
                                     on_output=lambda i, out: seen.append(i))
  assert [o.finish_reason for o in static] == ["length", "error", "length", "length"]
  assert "pool too small" in static[1].error
  assert seen == [0, 1, 2, 3]  # [9] alone (9 + 60 does not fit), 60 fails, then [13, 7]
  continuous = eng.generate(reqs, reuse=sx.ReuseConfig("full"), on_error="return")
  for i in (0, 2, 3):
    assert static[i].token_ids == continuous[i].token_ids and len(static[i].token_ids) == \
        lengths[i]
  assert not eng.store._live and eng.store.allocator.num_used == 0
