"""Issue 30, round 19: the experts' grouped matmul when groups are small (a decode step), the
engine's Mosaic kernel against XLA's ragged_dot, at Qwen3-30B-A3B's shapes (D 2048, 128 experts of
F 768, k 8; bf16, random weights, routing from a random router).

Why: the round-15 decode profile put 57 ms of a 67 ms step in the Mosaic kernel, which computes a
64-row block per group when groups hold about one row. XLA lowers ragged_dot by zero-padding each
row over all G groups: 2*M*G*K*N FLOPs, but it reads each expert's weights once. At M rows that
is bandwidth-bound while M < peak FLOP/s / (bytes/s / 2 bytes per weight), about 240 on an H100,
so for a decode step (M = batch x k = 128 at batch 16) it should run near the time of reading
every expert once. Rows: M in 128, 256, 512, 1024, 8192 (a 1K prefill), gate/up shape
[M, 2048] x [128, 2048, 768] and down shape [M, 768] x [128, 768, 2048]; medians of timed loops
after a warm-up; each against reading all of rhs once at the copy rate measured in the run.

    python probe_moe_small_groups.py OUT.json          (Hopper GPU)
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

D, E, F, K_TOP = 2048, 128, 768, 8


def timeit(fn, *args, iters=20, runs=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return round(statistics.median(times), 4)


def main(argv=None) -> int:
  out_path = (argv or sys.argv[1:])[0]
  from pallas_kernels import grouped_matmul as gm
  key = jax.random.split(jax.random.key(0), 6)
  bf = jnp.bfloat16
  w_gate = jax.random.normal(key[0], (E, D, F), bf)
  w_down = jax.random.normal(key[1], (E, F, D), bf)
  router = jax.random.normal(key[2], (D, E), jnp.float32)
  copy = jax.jit(lambda x: x + 1)
  buf = jnp.zeros((512 * 2**20,), bf)  # 1 GiB
  copy_ms = timeit(copy, buf, iters=5)
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "copy_gb_s": round(2 * buf.nbytes / copy_ms / 1e6, 1), "rows": []}
  for tokens in (16, 32, 64, 128, 1024):
    m = tokens * K_TOP
    hx = jax.random.normal(key[3], (tokens, D), jnp.float32)
    experts = jax.lax.top_k(hx @ router, K_TOP)[1].reshape(-1)
    order = jnp.argsort(experts, stable=True)
    sizes = jnp.bincount(experts, length=E).astype(jnp.int32)
    row = {"tokens": tokens, "rows": m, "experts_hit": int(jnp.sum(sizes > 0))}
    for name, (lhs, rhs) in (("gate", (jax.random.normal(key[4], (m, D), bf), w_gate)),
                             ("down", (jax.random.normal(key[5], (m, F), bf), w_down))):
      read_ms = rhs.nbytes / (res["copy_gb_s"] * 1e6)
      cell = {"read_all_experts_ms": round(read_ms, 4)}
      for impl, fn in (("mosaic", gm.grouped_matmul),
                       ("xla", jax.jit(gm.grouped_matmul_reference))):
        try:
          cell[impl] = timeit(fn, lhs, rhs, sizes)
        except Exception as e:  # noqa: BLE001
          cell[impl] = f"{type(e).__name__}: {str(e)[:160]}"
      row[name] = cell
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
