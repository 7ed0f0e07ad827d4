"""Issue 30: where a decode step's time goes, Qwen3-8B against Llama-3-8B (random bf16 weights,
batch 16 x 4K, the engine's device loop), with each one's byte floor measured in the same run."""
import json, os, shutil, sys, time
import jax, numpy as np
import sparsex_jax as sx
from models.config import get_config
from sparsex_jax.research.ttft import random_weights, time_decode, ceilings, random_ids
from sparsex_jax.research.profiling import kernel_times
out_dir = os.environ.get("PROBE_OUT", "/tmp/o/decode_profile"); os.makedirs(out_dir, exist_ok=True)
res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
ceil = ceilings(False); res["ceilings"] = ceil
batch, context, steps = 16, 4096, 32
for preset in sys.argv[1:] or ["llama3-8b", "qwen3-8b"]:
  cfg = get_config(preset, dtype="bfloat16")
  params = random_weights(cfg); jax.block_until_ready(params)
  eng = sx.Engine(cfg, params, None, page_size=16, num_pages=batch * ((context + steps) // 16 + 2) + 64,
                  max_batch_size=batch)
  row = time_decode(eng, batch, context, steps, ceil)
  rng = np.random.default_rng(2)
  reqs = [sx.Request([sx.Segment(random_ids(rng, context, cfg.vocab_size))]) for _ in range(batch)]
  sp = sx.SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
  eng.generate(reqs, sp, reuse=sx.Full())
  tdir = f"/tmp/trace_{preset}"; shutil.rmtree(tdir, ignore_errors=True)
  with jax.profiler.trace(tdir):
    eng.generate(reqs, sp, reuse=sx.Full())
  totals, example = kernel_times(tdir)
  top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
  row["kernels_us"] = [{"name": n[:120], "us_per_step": t / steps, "count": example[n].get("count") if n in example else None,
                        "hlo_op": example.get(n, {}).get("hlo_op", "")} for n, t in top]
  row["total_us_per_step"] = sum(totals.values()) / steps
  res["rows"].append(row)
  print(json.dumps({k: v for k, v in row.items() if k != "kernels_us"}), flush=True)
  for k in row["kernels_us"][:12]:
    print(f"  {k['us_per_step']:8.1f} us  {k['count']}  {k['name'][:70]}  {k['hlo_op'][:40]}", flush=True)
  json.dump(res, open(os.path.join(out_dir, "profile_decode.json"), "w"), indent=1)
  del eng, params
