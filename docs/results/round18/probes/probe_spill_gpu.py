"""Round 18, on a GPU: evicted pages read straight into pinned host memory (KVPool.read_pages_into)
and continuations copied back from the host tier, checked against a pool that never evicted, and
the engine-loop time of an eviction (a dispatch) against a blocking read to numpy.

Llama-3-8B's layer shapes with 4 layers (random bf16 weights), page 16, T = 2.

    python probe_spill_gpu.py OUT.json [--smoke]     (--smoke: the tiny model, on any device)
"""

import json
import sys
import time

import jax
import numpy as np

import sparsex_jax as sx
from models import llama
from models.config import get_config

cfg = get_config("llama3-8b", dtype="bfloat16").replace(n_layers=4, max_seq_len=16384)
if "--smoke" in sys.argv:
  cfg = get_config("tiny", dtype="float32").replace(n_layers=4, max_seq_len=16384)
params = llama.init_params(cfg, 0)
rng = np.random.default_rng(0)
ids = lambda n: [int(i) for i in rng.integers(3, cfg.vocab_size, n)]  # noqa: E731
passages = [ids(512) for _ in range(8)]
system, q1, q2 = ids(40), ids(30), ids(20)
reuse = sx.ReuseConfig("sparsex", layer_threshold=2)
out = {"device": str(jax.devices()[0]), "jax": jax.__version__}


def engine(host):
  eng = sx.Engine(cfg, params, None, page_size=16, num_pages=4096,
                  host_cache_bytes=(8 << 30) if host else None)
  if host:
    eng.host_tier.split_layer = 2
  eng.cache_segments(passages)
  return eng


def first_turn():
  return sx.Request([sx.Segment(system)] + [sx.Segment(p) for p in passages]
                    + [sx.Segment(q1, cache=False)])


results = {}
for host in (False, True):
  eng = engine(host)
  answer = eng.generate([first_turn()], sx.SamplingParams(max_new_tokens=8, ignore_eos=True),
                        reuse=reuse)[0]
  turn = sx.Request(first_turn().segments + (sx.Segment(answer.token_ids[:-1], cache=False),
                                             sx.Segment(q2, cache=False)))
  if host:
    tier = eng.host_tier
    out["memory"] = tier.stats()["memory"]
    t0 = time.perf_counter()
    eng.store.continuation_cache.evict(10**6)
    out["evict_continuations_ms"] = 1e3 * (time.perf_counter() - t0)
    keys = [k for k in tier.keys() if k.startswith("run:")]
    arrays = [x for k in keys for x in tier.get(k).k.values + tier.get(k).v.values]
    out["run_memory_kinds"] = sorted({getattr(getattr(x, "sharding", None), "memory_kind",
                                              "numpy") for x in arrays})
    out["run_bytes"] = int(sum(x.nbytes for x in arrays))
    t0 = time.perf_counter()
    jax.block_until_ready(arrays)
    out["copies_done_after_ms"] = 1e3 * (time.perf_counter() - t0)
    entries = list(eng.store.segment_cache._entries.values())  # pylint: disable=protected-access
    pages = np.concatenate([e.pages for e in entries])
    t0 = time.perf_counter()
    eng.kv.read_pages(pages)
    out["blocking_read_ms"] = 1e3 * (time.perf_counter() - t0)
    out["blocking_read_bytes"] = int(pages.size * eng.layout.bytes_per_page)
  logits = eng.prefill_logits(turn, reuse)
  results[host] = logits
  if host:
    out["host_tier"] = eng.stats()["host_tier"]
diff = np.abs(results[True] - results[False])
out["max_abs_logit_diff"] = float(diff.max())
out["identical"] = bool(np.array_equal(results[True], results[False]))
print(json.dumps({k: v for k, v in out.items() if k != "host_tier"}, indent=1))
with open(sys.argv[1], "w") as f:
  json.dump(out, f, indent=1, default=str)
