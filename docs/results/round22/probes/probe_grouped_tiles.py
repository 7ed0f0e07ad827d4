"""Issue 30, round 22: the grouped-matmul candidate that skips empty tiles (grouped_tiles.py, beside
this file) against the engine's kernel (jax's ragged_dot_mgpu through pallas_kernels/grouped_matmul.py),
at Qwen3-30B-A3B's expert shapes (D 2048, 128 experts of F 768, k 8; bf16, random weights, routing
from a random router): decode batches of 16-128 tokens and prefills of 1K and 8K tokens, the gate/up
shape [M, 2048] x [128, 2048, 768] and the down shape [M, 768] x [128, 768, 2048].

Per size: experts hit, tiles with rows (the candidate's table) against the static grid, each
kernel's time (median of timed loops after a warm-up) and its error against a float32 numpy loop
over the groups (relative L2 over the routed rows), and reading all 128 experts' weights at the
copy rate measured in the run.

    python probe_grouped_tiles.py OUT.json          (Hopper GPU)
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import grouped_tiles as gt  # noqa: E402
from _timing import timeit  # noqa: E402

D, E, F, K_TOP = 2048, 128, 768, 8




def rel_err(got, lhs, rhs, sizes):
  got, lhs, rhs = (np.asarray(a, np.float32) for a in (got, lhs, rhs))
  want = np.zeros_like(got)
  start = 0
  for g, size in enumerate(np.asarray(sizes)):
    want[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return float(np.linalg.norm(got[:start] - want[:start]) / np.linalg.norm(want[:start]))


def main(argv=None) -> int:
  out_path = (argv or sys.argv[1:])[0]
  from pallas_kernels import grouped_matmul as gm
  key = jax.random.split(jax.random.key(0), 6)
  bf = jnp.bfloat16
  w_gate = (jax.random.normal(key[0], (E, D, F), jnp.float32) / np.sqrt(D)).astype(bf)
  w_down = (jax.random.normal(key[1], (E, F, D), jnp.float32) / np.sqrt(F)).astype(bf)
  router = jax.random.normal(key[2], (D, E), jnp.float32)
  buf = jnp.zeros((512 * 2**20,), bf)  # 1 GiB
  copy_ms = timeit(jax.jit(lambda x: x + 1), buf, iters=5)
  del buf
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "sms": gt._num_sms(), "copy_gb_s": round(2 * 2**30 / copy_ms / 1e6, 1), "rows": []}
  for tokens in (16, 32, 64, 128, 1024, 8192):
    m = tokens * K_TOP
    hx = jax.random.normal(key[3], (tokens, D), jnp.float32)
    experts = jax.lax.top_k(hx @ router, K_TOP)[1].reshape(-1)
    sizes = jnp.bincount(experts, length=E).astype(jnp.int32)
    block_m = gm.block_rows(m, E)
    table = np.asarray(gt.tile_table(sizes, -(-m // block_m) * block_m, block_m))
    row = {"tokens": tokens, "rows": m, "experts_hit": int(jnp.sum(sizes > 0)), "block_m": block_m,
           "tiles_with_rows": int((table[3] > 0).sum()), "tiles_static": int(table.shape[1])}
    for name, (lhs, rhs) in (("gate", (jax.random.normal(key[4], (m, D), bf), w_gate)),
                             ("down", (jax.random.normal(key[5], (m, F), bf), w_down))):
      cell = {"read_all_experts_ms": round(rhs.nbytes / (res["copy_gb_s"] * 1e6), 4)}
      padded = -(-m // block_m) * block_m
      lhs_p = jnp.pad(lhs, ((0, padded - m), (0, 0)))
      impls = {"engine": lambda a, b, s: gm.grouped_matmul(a, b, s),
               "skip_empty": lambda a, b, s, bm=block_m: gt.grouped_matmul(a, b, s, block_m=bm)}
      if block_m == 128:
        impls["skip_empty_m64"] = lambda a, b, s: gt.grouped_matmul(a, b, s, block_m=64)
      for impl, fn in impls.items():
        try:
          fn = jax.jit(fn)
          out = fn(lhs_p if impl != "engine" else lhs, rhs, sizes)
          cell[impl] = {"ms": timeit(fn, lhs_p if impl != "engine" else lhs, rhs, sizes),
                        "rel_err": round(rel_err(out[:m], lhs, rhs, sizes), 5)}
        except Exception as e:  # noqa: BLE001
          cell[impl] = f"{type(e).__name__}: {str(e)[:300]}"
      if block_m == 128:
        # Each group's rows start at a multiple of 128 (zero rows between): no tile straddles two
        # groups, so the candidate computes sum(ceil(size / 128)) tiles, not cdiv(M, 128) + G - 1.
        sz = np.asarray(sizes)
        whole = -(-sz // block_m) * block_m
        src = np.concatenate([np.arange(a, a + n) for a, n in zip(np.cumsum(sz) - sz, sz)])
        dst = np.concatenate([np.arange(a, a + n) for a, n in zip(np.cumsum(whole) - whole, sz)])
        rows_pad = -(-(m + E * block_m) // block_m) * block_m
        lhs_w = jnp.zeros((rows_pad, lhs.shape[1]), bf).at[dst].set(lhs[src])
        whole_j = jnp.asarray(whole, jnp.int32)
        try:
          fn = jax.jit(lambda a, b, s: gt.grouped_matmul(a, b, s, block_m=128))
          out = np.asarray(fn(lhs_w, rhs, whole_j), np.float32)[dst]
          cell["skip_empty_whole_blocks"] = {
              "ms": timeit(fn, lhs_w, rhs, whole_j), "tiles": int(whole.sum() // block_m),
              "rel_err": round(rel_err(out, lhs, rhs, sizes), 5)}
        except Exception as e:  # noqa: BLE001
          cell["skip_empty_whole_blocks"] = f"{type(e).__name__}: {str(e)[:300]}"
      row[name] = cell
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
