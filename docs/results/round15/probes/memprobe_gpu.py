"""Issue 29's remat warning: each program's memory analysis with a replica's share of the GPU
(45%) and a pool of 60% of the free memory, SmolLM2 shapes, batch 64 (as bench_replicas)."""
import json, os, sys
frac = sys.argv[1] if len(sys.argv) > 1 else "0.45"
pool_fraction = float(sys.argv[2]) if len(sys.argv) > 2 else 0.6
os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = frac
import jax, numpy as np
import sparsex_jax as sx
from sparsex_jax import programs
from models.config import get_config
from models import llama
cfg = get_config("smollm2-135m", dtype=os.environ.get("PROBE_DTYPE", "bfloat16"))
params = llama.init_params(cfg, 0)
stats = jax.devices()[0].memory_stats() or {"bytes_limit": 1 << 28}
pool_bytes = int(pool_fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
n_req = int(sys.argv[3]) if len(sys.argv) > 3 else 128
seen = {}
call = programs.KVPool._call
def probe(self, program, args, static):
  key = program.__name__ + str(sorted(static.items()))
  if key not in seen:
    pool = sum(a.nbytes for a in self.arrays.values())
    try:
      m = self.compile(program, *args, **static).memory_analysis()
      seen[key] = {n: getattr(m, n) / 1e9 for n in ("argument_size_in_bytes", "output_size_in_bytes",
                   "alias_size_in_bytes", "temp_size_in_bytes")}
      seen[key]["pool_gb"] = pool / 1e9
    except Exception as e:
      seen[key] = repr(e)[:300]
    print(key[:60], seen[key], flush=True)
  return call(self, program, args, static)
programs.KVPool._call = probe
eng = sx.Engine(cfg, params, page_size=16, kv_pool_bytes=pool_bytes, max_batch_size=64)
rng = np.random.default_rng(0)
ids = lambda n: [int(i) for i in rng.integers(3, cfg.vocab_size, n)]
passages = [ids(400) for _ in range(16)]
reqs = [sx.Request([sx.Segment(ids(20)), sx.Segment(passages[q % 16]), sx.Segment(ids(30), cache=False)])
        for q in range(n_req)]
eng.generate(reqs, sx.SamplingParams(max_new_tokens=32))
out = {"mem_fraction": frac, "bytes_limit": stats["bytes_limit"], "pool_bytes": pool_bytes, "programs": seen}
os.makedirs("/tmp/o", exist_ok=True)
json.dump(out, open(f"/tmp/o/memprobe_{frac}.json", "w"), indent=1)
