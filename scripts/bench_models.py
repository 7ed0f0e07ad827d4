"""The paper's models at their real shapes, random bf16 weights, on a GPU: Qwen3-8B (dense) and
Qwen3-30B-A3B (MoE). Per preset, on bench_ttft's rag workload at each context: the plain jitted
dense prefill (cuDNN attention, no pages), the engine's full prefill and the default reuse rule
(sparsex r=0.15 T=4); then a decode step of the engine (batch 16 x 4K contexts). Every time comes
with its floor, max(FLOPs / matmul peak, bytes / copy bandwidth) with both peaks measured in the
same run (sparsex_jax/research/ttft.py: floors, decode_floor; a mixture of experts counts its
active weights for FLOPs and the experts its tokens reach for bytes). JSON: --out/bench_models.json,
written after every step.

  python scripts/bench_models.py --presets qwen3-8b qwen3-30b-a3b --out $OUT
  python scripts/bench_models.py --smoke --out /tmp/bench_models     (CPU self-check, tiny shapes)

Memory: Qwen3-30B-A3B's weights are 61 GB in bf16; with the pool and a 32K prefill's activations
it is tight on an 80 GB H100 (use an H200, or --contexts 8192).

The experts are grouped matmuls (pallas_kernels/grouped_matmul.py): jax's Mosaic GPU kernel on a
Hopper GPU, in the engine and in the dense anchor alike; XLA's ragged_dot elsewhere (on the GPU it
zero-pads every row over all experts and ran out of memory at 8K, round 11). The JSON's
"grouped_matmul" says which ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax

import sparsex_jax as sx
from models.config import get_config
from pallas_kernels import grouped_matmul as grouped
from pallas_kernels.ops import resolve_backend
from sparsex_jax.research import methods as mth
from sparsex_jax.research.ttft import (DENSE, DeviceTimer, Workload, bench_workload, ceilings,
                                       random_weights, time_decode)

DEFAULT_LABEL = mth.default_label(0.15, 4)  # the default rule, as bench_ttft labels it
METHODS = [DENSE, "full", DEFAULT_LABEL]
PAGE = 16


def grouped_matmul_in_use(cfg, backend: str, dtype) -> str:
  """Which grouped matmul the MoE experts of cfg run here under the attention backend, with
  weights of `dtype` (pallas_kernels/ops.py: grouped_matmul). The weights' dtype, not the
  config's: the presets' configs say float32 and the benchmark casts the weights to bf16 (round
  15 recorded "xla" while the Mosaic kernel ran)."""
  if not cfg.is_moe:
    return "none"
  if resolve_backend(backend) != "pallas":
    return "xla"
  d, f = cfg.d_model, cfg.moe_ffn_dim
  lhs = jax.ShapeDtypeStruct((1, d), dtype)
  ok = all(grouped.supports(lhs, jax.ShapeDtypeStruct((cfg.n_experts, k, n), dtype))
           for k, n in ((d, f), (f, d)))
  return "mosaic" if ok else "xla"


def model_config(preset: str, smoke: bool, longest: int):
  if not smoke:
    cfg = get_config(preset, dtype="bfloat16")
  else:  # the preset's family at tiny shapes, 5 layers (room for T = 4), float32 on CPU
    tiny = "qwen3-moe-tiny" if get_config(preset).is_moe else "qwen3-tiny"
    cfg = get_config(tiny, dtype="float32").replace(n_layers=5, name=f"{preset} (smoke)")
  if cfg.max_seq_len < longest + 1024:  # random weights: any context times the same
    cfg = cfg.replace(max_seq_len=longest + 1024)
  return cfg


def pool_pages(contexts, batch, context, steps) -> int:
  """rag: the passages cached alone plus the request's own pages (2 C, and page rounding);
  decode: batch rows of context + steps tokens."""
  rag = int(1.25 * 2 * max(contexts) / PAGE) + 64
  decode = batch * ((context + steps) // PAGE + 2) + 64
  return max(rag, decode)


def save(results, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "bench_models.json"), "w") as f:
    json.dump(results, f, indent=1)


def bench_preset(results, preset, args, ceil):
  cfg = model_config(preset, args.smoke, max(args.contexts + [args.decode_context]))
  t0 = time.perf_counter()
  params = random_weights(cfg)
  jax.block_until_ready(params)
  engine = sx.Engine(cfg, params, None, page_size=PAGE, attention_backend=args.attention_backend,
                     num_pages=pool_pages(args.contexts, args.decode_batch, args.decode_context,
                                          args.decode_steps), max_batch_size=args.decode_batch)
  info = {"preset": preset, "config": cfg.name, "params_b": cfg.num_params() / 1e9,
          "active_params_b": cfg.num_params(active=True) / 1e9,
          "weights_gb": sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9,
          "pool_gb": engine.layout.num_pages * engine.layout.bytes_per_page / 1e9,
          "grouped_matmul": grouped_matmul_in_use(cfg, args.attention_backend,
                                                  jax.tree.leaves(params)[0].dtype),
          "init_s": time.perf_counter() - t0}
  results["presets"].append(info)
  print(f"{preset}: {info['params_b']:.1f}B params ({info['active_params_b']:.1f}B active), "
        f"{info['weights_gb']:.1f} GB weights, {info['pool_gb']:.1f} GB pool, init "
        f"{info['init_s']:.0f} s", flush=True)
  timer = DeviceTimer(engine)
  for context in args.contexts:
    try:
      bench_workload(results, engine, timer, preset, Workload("rag", cfg, context, args.runs),
                     args.methods, args.runs, ceil)
    except Exception:  # keep what was measured; report the failure
      results["errors"].append(f"{preset} rag {context}: " + traceback.format_exc())
      print(traceback.format_exc(), flush=True)
    save(results, args.out)
  try:
    engine.clear_caches()
    row = time_decode(engine, args.decode_batch, args.decode_context, args.decode_steps, ceil)
    row["preset"] = preset
    results["decode"].append(row)
    print(f"  {preset} decode batch {args.decode_batch} x {args.decode_context}: "
          f"{row['decode_ms_per_step']:.2f} ms/step, floor {row['floor_ms']:.2f} ms "
          f"({100 * row['floor_frac']:.0f}%, {row['bound']})", flush=True)
  except Exception:
    results["errors"].append(f"{preset} decode: " + traceback.format_exc())
    print(traceback.format_exc(), flush=True)
  save(results, args.out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", nargs="+", default=["qwen3-8b", "qwen3-30b-a3b"])
  ap.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768])
  ap.add_argument("--methods", nargs="+", default=METHODS,
                  help=f"bench_ttft method labels (default: {METHODS})")
  ap.add_argument("--runs", type=int, default=5, help="timed runs per method after a warm-up")
  ap.add_argument("--decode-batch", type=int, default=16)
  ap.add_argument("--decode-context", type=int, default=4096)
  ap.add_argument("--decode-steps", type=int, default=32)
  ap.add_argument("--attention-backend", default="auto")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU self-check: each preset's family at tiny shapes, tiny contexts")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  args = ap.parse_args(argv)
  if args.smoke:
    args.contexts, args.runs = [c for c in args.contexts if c <= 512] or [256], 1
    args.decode_batch, args.decode_context, args.decode_steps = 2, 64, 4
  for preset in args.presets:
    get_config(preset)  # an unknown preset fails before any device work
  results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "command": " ".join(["scripts/bench_models.py"] + (sys.argv[1:] if argv is None
                                                                 else list(argv))),
             "labels": mth.LABELS,
             "presets": [], "ttft": [], "decode": [], "errors": []}
  results["ceilings"] = ceilings(args.smoke)
  save(results, args.out)
  for preset in args.presets:
    try:
      bench_preset(results, preset, args, results["ceilings"])
    except Exception:
      results["errors"].append(f"{preset}: " + traceback.format_exc())
      print(traceback.format_exc(), flush=True)
      save(results, args.out)
  print(json.dumps({"errors": len(results["errors"]), "ttft_rows": len(results["ttft"]),
                    "decode_rows": len(results["decode"])}))
  return 1 if results["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
