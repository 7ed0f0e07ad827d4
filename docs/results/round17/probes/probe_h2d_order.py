"""Issue 31, round 17: does a small host input of a program wait behind large host-to-device
copies issued before it?

Round 16's engine issued a host-tier load's copies (layers [T, L) of every reused segment, from
pinned host memory) and then dispatched the prefill's full layers with their batch given as numpy
arrays, which jit copies to the device at dispatch. Round 16's probe showed the copies hide behind
compute dispatched after them when that compute's inputs are already on the device, yet the engine
hid only part of them (8K) or none (32K). If host-to-device copies run in the order issued, the
batch's small copy waits for every segment, and the full layers with it.

Scenarios (each the median of 5 runs after a warm-up; 15 or 61 segments of 2 arrays [28, 8, 32,
16, 128] bf16, Llama-3-8B's layers [4, 32) of a 512-token segment; a ~25 ms matmul load):
  copy_alone        the copies, issued and waited for.
  compute_alone     the compute, its small input already on the device.
  device_input      copies issued, then the compute with a device input: max(copy, compute) if
                    they overlap.
  numpy_input       copies issued, then the compute with a numpy input (the round 16 engine).
  input_first       the numpy input put on the device (uncommitted) first, then the copies, then
                    the compute (the round 17 engine).

    python probe_h2d_order.py OUT.json [--segments 15 61] [--small]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

RUNS = 5


@functools.partial(jax.jit, static_argnames=("steps",))
def compute(x, w, tokens, steps):
  """steps chained bf16 matmuls that depend on the small input `tokens` (as the full layers
  depend on the batch's token ids)."""
  x = x + tokens[0].astype(x.dtype) * 0  # x * 0 is not folded for floats (NaN semantics)
  return jax.lax.fori_loop(0, steps, lambda i, y: (y @ w).astype(y.dtype), x)


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("out")
  p.add_argument("--segments", type=int, nargs="+", default=[15, 61])
  p.add_argument("--small", action="store_true", help="CPU check: small sizes")
  args = p.parse_args(argv)
  dev = jax.devices()[0]
  kinds = {m.kind for m in dev.addressable_memories()}
  host = (jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
          if "pinned_host" in kinds else None)
  shape = (3, 2, 4, 16, 32) if args.small else (28, 8, 32, 16, 128)
  d = 256 if args.small else 4096
  rng = np.random.default_rng(0)
  base = rng.standard_normal(shape, np.float32).astype(jnp.bfloat16)
  x = jax.device_put(jax.random.normal(jax.random.key(0), (d, d), jnp.bfloat16), dev)
  w = jax.device_put(jax.random.normal(jax.random.key(1), (d, d), jnp.bfloat16) / np.sqrt(d),
                     dev)
  tokens_np = rng.integers(0, 1000, 8192, dtype=np.int32)
  tokens_dev = jax.device_put(tokens_np)
  # calibrate ~25 ms
  compute(x, w, tokens_dev, steps=8).block_until_ready()
  t0 = time.perf_counter()
  compute(x, w, tokens_dev, steps=8).block_until_ready()
  steps = max(1, round(0.025 / ((time.perf_counter() - t0) / 8)))
  compute(x, w, tokens_dev, steps=steps).block_until_ready()
  compute(x, w, tokens_np, steps=steps).block_until_ready()
  result = {"device": str(dev.device_kind), "jax": jax.__version__, "host_memory": sorted(kinds),
            "steps": steps, "rows": []}

  for n_segments in args.segments:
    segments = [[np.array(base), np.array(base)] for _ in range(n_segments)]
    if host is not None:
      segments = [jax.device_put(seg, host) for seg in segments]
    jax.block_until_ready(segments)
    nbytes = n_segments * 2 * base.nbytes

    def run(scenario):
      times = []
      for i in range(RUNS + 1):
        t0 = time.perf_counter()
        if scenario == "compute_alone":
          out = compute(x, w, tokens_dev, steps=steps)
        elif scenario == "input_first":
          tokens = jax.device_put(tokens_np)
          copies = [jax.device_put(seg, x.sharding) for seg in segments]
          out = (copies, compute(x, w, tokens, steps=steps))
        else:
          copies = [jax.device_put(seg, x.sharding) for seg in segments]
          out = copies if scenario == "copy_alone" else (copies, compute(
              x, w, tokens_dev if scenario == "device_input" else tokens_np, steps=steps))
        jax.block_until_ready(out)
        if i:
          times.append((time.perf_counter() - t0) * 1e3)
        del out
      return {"median_ms": round(statistics.median(times), 3),
              "runs_ms": [round(t, 3) for t in times]}

    row = {"segments": n_segments, "bytes": nbytes}
    for scenario in ("copy_alone", "compute_alone", "device_input", "numpy_input", "input_first"):
      row[scenario] = run(scenario)
    row["copy_GBps"] = round(nbytes / row["copy_alone"]["median_ms"] / 1e6, 1)
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    del segments
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
