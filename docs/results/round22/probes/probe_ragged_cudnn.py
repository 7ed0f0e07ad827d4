"""Issue 30, round 22: does this jaxlib lower jax.lax.ragged_dot to cuDNN's grouped matmul on the GPU?

XLA added a cuDNN lowering of ragged_dot (openxla/xla PR 40189) and made it the default on NVIDIA
GPUs with cuDNN >= 9.22 (PR 42313); before it, and where the guard fails, XLA pads every row over
all G groups (what round 21 measured: 4.9 ms at 1,024 tokens). This probe prints the cuDNN version
jax loaded, compiles ragged_dot at Qwen3-30B-A3B's gate shape ([M, 2048] x [128, 2048, 768], random
routing) under the XLA_FLAGS it was started with, says which lowering the compiled HLO holds (a cuDNN
fusion, or a dot over padded operands), and times it against the engine's Mosaic kernel with the
error between the two.

    XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true python probe_ragged_cudnn.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import timeit  # noqa: E402

D, E, F, K_TOP = 2048, 128, 768, 8




def cudnn_version() -> str:
  """The cuDNN jax loaded where it says, else the pip package's version."""
  found = []
  try:
    from jax._src.lib import cuda_versions
    found.append(f"loaded {cuda_versions.cudnn_get_version()}")
  except Exception:  # noqa: BLE001
    pass
  import importlib.metadata as md
  for dist in ("nvidia-cudnn-cu13", "nvidia-cudnn-cu12"):
    try:
      found.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
      pass
  return "; ".join(found) or "unknown"


def main(argv=None) -> int:
  out_path = (argv or sys.argv[1:])[0]
  from pallas_kernels import grouped_matmul as gm
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "cudnn": cudnn_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
  print(json.dumps({k: res[k] for k in ("device", "jax", "cudnn", "xla_flags")}), flush=True)
  key = jax.random.split(jax.random.key(0), 4)
  w = (jax.random.normal(key[0], (E, D, F), jnp.float32) / np.sqrt(D)).astype(jnp.bfloat16)
  router = jax.random.normal(key[1], (D, E), jnp.float32)
  for tokens in (16, 1024, 8192):
    m = tokens * K_TOP
    hx = jax.random.normal(key[2], (tokens, D), jnp.float32)
    sizes = jnp.bincount(jax.lax.top_k(hx @ router, K_TOP)[1].reshape(-1), length=E)
    sizes = sizes.astype(jnp.int32)
    lhs = jax.random.normal(key[3], (m, D), jnp.bfloat16)
    row = {"tokens": tokens, "rows": m}
    ragged = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s))
    try:
      hlo = ragged.lower(lhs, w, sizes).compile().as_text()
      row["cudnn_fusion"] = "__cudnn$fusion" in hlo
      row["ragged_dot_left"] = "ragged-dot(" in hlo
      row["hlo_custom_calls"] = sorted({line.split("custom_call_target=\"")[1].split("\"")[0]
                                        for line in hlo.splitlines()
                                        if "custom_call_target=\"" in line})
      row["ragged_dot_ms"] = timeit(ragged, lhs, w, sizes)
      row["mosaic_ms"] = timeit(gm.grouped_matmul, lhs, w, sizes)
      a = np.asarray(ragged(lhs, w, sizes), np.float32)
      b = np.asarray(gm.grouped_matmul(lhs, w, sizes), np.float32)
      n = int(sizes.sum())
      row["rel_diff"] = float(np.linalg.norm(a[:n] - b[:n]) / np.linalg.norm(b[:n]))
    except Exception as e:  # noqa: BLE001
      row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    res["rows"].append(row)
    print(json.dumps(row), flush=True)
    with open(out_path, "w") as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
