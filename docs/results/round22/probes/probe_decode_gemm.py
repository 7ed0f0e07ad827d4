"""Issue 30, round 22: how near the copy rate a decode step's weight GEMMs run at 16 rows, and whether the
weights' layout changes it.

Round 21 measured Qwen3-8B's decode step (batch 16 x 4K) at 1.17x its byte floor and placed most of the
miss in the weight GEMMs (78-81% of the copy rate at 16 rows, if K/V is read at the copy rate). This
probe times only the GEMMs of every layer (no attention, no norms), 16 rows, bf16, random weights,
inside one jitted scan over the stacked layers as the model runs them, in four layouts:

  split        q, k, v, o, gate, up, down as the model holds them today ([in, out])
  fused        q|k|v as one [D, (N + 2K) H] matrix and gate|up as one [D, 2F]: 5 GEMMs a layer, not 7
  split_t      the split weights stored [out, in] (contracting the last dim of both operands)
  fused_t      fused and [out, in]

each against reading the same weight bytes at the copy rate measured in the run (x + 1 over a buffer
of the step's size). Medians of timed loops after a warm-up.

    python probe_decode_gemm.py OUT.json                (any GPU; XLA_FLAGS may pick the GEMM backend)
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timeit  # noqa: E402

SHAPES = {  # name: (layers, D, N heads, K kv heads, H head dim, F ffn)
    "qwen3-8b": (36, 4096, 32, 8, 128, 12288),
    "llama3-8b": (32, 4096, 32, 8, 128, 14336),
}
ROWS = 16




def weights(key, shape, layout):
  l, d, n, k, h, f = shape
  bf = jnp.bfloat16
  mats = {"split": {"wq": (d, n * h), "wk": (d, k * h), "wv": (d, k * h), "wo": (n * h, d),
                    "wg": (d, f), "wu": (d, f), "wd": (f, d)},
          "fused": {"wqkv": (d, (n + 2 * k) * h), "wo": (n * h, d), "wgu": (d, 2 * f), "wd": (f, d)}}
  base = layout.removesuffix("_t")
  keys = jax.random.split(key, len(mats[base]))
  out = {}
  for kk, (name, (i, o)) in zip(keys, mats[base].items()):
    s = (l, o, i) if layout.endswith("_t") else (l, i, o)
    out[name] = (jax.random.normal(kk, s, jnp.float32) * 0.02).astype(bf)
  return out


def step_fn(shape, layout):
  _, d, n, k, h, f = shape
  transposed = layout.endswith("_t")

  def mm(x, w):
    if transposed:
      return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())))
    return x @ w

  def layer(x, w):
    if layout.startswith("fused"):
      qkv = mm(x, w["wqkv"])
      q, kk, v = jnp.split(qkv, [n * h, (n + k) * h], axis=-1)
    else:
      q, kk, v = mm(x, w["wq"]), mm(x, w["wk"]), mm(x, w["wv"])
    # Stand-in for attention: every head reads its group's k and v (keeps all three live).
    a = (q.reshape(ROWS, k, n // k, h) + (kk + v).reshape(ROWS, k, 1, h)).reshape(ROWS, n * h)
    x = x + mm(a, w["wo"])
    if layout.startswith("fused"):
      g, u = jnp.split(mm(x, w["wgu"]), 2, axis=-1)
    else:
      g, u = mm(x, w["wg"]), mm(x, w["wu"])
    x = x + mm(jax.nn.silu(g) * u, w["wd"])
    return x * 0.5, None  # keep the scale bounded over layers

  return jax.jit(lambda x, ws: jax.lax.scan(layer, x, ws)[0])


def main(argv=None) -> int:
  out_path = (argv or sys.argv[1:])[0]
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": ROWS,
         "xla_flags": os.environ.get("XLA_FLAGS", ""), "shapes": {}}
  for name, shape in SHAPES.items():
    entry = res["shapes"].setdefault(name, {})
    x = (jax.random.normal(jax.random.key(1), (ROWS, shape[1]), jnp.float32)).astype(jnp.bfloat16)
    for layout in ("split", "fused", "split_t", "fused_t"):
      ws = weights(jax.random.key(2), shape, layout)
      nbytes = sum(w.nbytes for w in ws.values())
      if "copy_gb_s" not in entry:
        buf = jnp.zeros((nbytes // 2,), jnp.bfloat16)
        copy_ms = timeit(jax.jit(lambda b: b + 1), buf, iters=5)
        entry["copy_gb_s"] = round(2 * nbytes / copy_ms / 1e6, 1)
        entry["weight_gb"] = round(nbytes / 1e9, 3)
        entry["read_ms_at_copy_rate"] = round(nbytes / (entry["copy_gb_s"] * 1e6), 4)
        del buf
      ms = timeit(step_fn(shape, layout), x, ws)
      entry[layout] = {"ms": ms, "vs_read": round(ms / entry["read_ms_at_copy_rate"], 3)}
      print(name, layout, entry[layout], flush=True)
      del ws
    with open(out_path, "w") as fh:
      json.dump(res, fh, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
