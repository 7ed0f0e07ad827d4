"""Does any jitted engine step hold a second copy of the KV pool? (compiled memory analysis)

For two pool sizes, compiles the prefill, the decode step and the decode loop (the engine's decode
program: a while_loop carrying the pool) and prints their temporary memory:
a temp size that grows with the pool means a program copies the pool instead of updating it in
place. Runs anywhere (reference path on CPU, Pallas kernels on GPU).

  python scripts/check_pool_aliasing.py [--tp N]     (--tp: the tensor-parallel programs, per device)
"""

import sys

import jax
import numpy as np

import sparsex_jax as sx
from models import llama
from models.config import get_config
from sparsex_jax import planner
from sparsex_jax.batching import RunningBatch
from sparsex_jax.programs.decode import decode_loop, decode_step
from sparsex_jax.programs.prefill import prefill
from sparsex_jax.prompt import Prompt


PREFILLS = [  # (label, reuse): full prefill, naive reuse, and both SparseX rules at T = 1 (the
    # default writes layer T's fresh K/V into the pool, the paper's rule does not)
    ("full", sx.Full()),
    ("naive", sx.Naive(update_caches=False)),
    ("sparsex T=1", sx.SparseX(layer_threshold=1, update_caches=False)),
    ("sparsex-attention T=1", sx.SparseXAttention(layer_threshold=1, update_caches=False)),
]


def main():
  tp = int(sys.argv[sys.argv.index("--tp") + 1]) if "--tp" in sys.argv else None
  cfg = get_config("llama3-1b", dtype="bfloat16").replace(n_layers=2)
  params = llama.init_params(cfg, 0)
  for pages in (2048, 16384):
    eng = sx.Engine(cfg, params, page_size=16, num_pages=pages, mesh=sx.mesh_for(tp))
    pool_mb = eng.pool["k"].nbytes / 1e6 / (tp or 1)  # per device
    docs = [np.arange(5 + 300 * i, 305 + 300 * i, dtype=np.int32) for i in range(2)]
    eng.cache_segments([d.tolist() for d in docs])
    # Reused segments (cached alone above) and a new question: every reuse path of the prefill.
    prompt = Prompt((docs[0], docs[1], np.arange(900, 920, dtype=np.int32)), (True, True, False))
    for label, reuse in PREFILLS:
      policy = reuse.resolve(cfg)
      with eng.store.acquire([prompt], policy, max_new_tokens=4) as leases:
        plans = [planner.plan_request(prompt, leases[0], policy, eng.layout)]
        batch, spec = planner.plan_batch(plans, policy, cfg, eng.layout)
        m = eng.kv.compile(prefill, eng.params, batch, cfg=cfg, spec=spec).memory_analysis()
      print(f"{jax.default_backend()} prefill {label:18s} pages {pages:6d}: pool K {pool_mb:8.1f} "
            f"MB, temp {m.temp_size_in_bytes / 1e6:8.1f} MB, aliased "
            f"{m.alias_size_in_bytes / 1e6:8.1f} MB", flush=True)
    b = 4
    z = np.zeros(b, np.int32)
    m = eng.kv.compile(
        decode_step, eng.params, z, z, z, np.zeros((b, 32), np.int32), z + 1,
        np.zeros(b, np.float32), np.ones(b, np.float32), z.astype(np.uint32), np.int32(1),
        cfg=cfg).memory_analysis()
    print(f"{jax.default_backend()} decode        pages {pages:6d}: pool K {pool_mb:8.1f} MB, temp "
          f"{m.temp_size_in_bytes / 1e6:8.1f} MB, aliased {m.alias_size_in_bytes / 1e6:8.1f} MB",
          flush=True)
    rows = RunningBatch(b, 32, 1, eng.layout)
    rows.done[:] = False
    rows.page_table[:] = np.arange(1, 1 + b * 32).reshape(b, 32)
    m = decode_loop.lower(eng.pool, eng.params, rows.device_rows(), np.int32(1), cfg=cfg,
                          steps=8).compile().memory_analysis()
    print(f"{jax.default_backend()} decode_loop   pages {pages:6d}: pool K {pool_mb:8.1f} MB, temp "
          f"{m.temp_size_in_bytes / 1e6:8.1f} MB, aliased {m.alias_size_in_bytes / 1e6:8.1f} MB",
          flush=True)


if __name__ == "__main__":
  main()
