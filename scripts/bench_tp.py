"""Tensor parallelism: TTFT and decode step time of one preset, unsharded and on 1..N devices.

Random weights at the preset's real shapes (optionally fewer layers, so a large model fits the
devices at hand: every layer has the real shapes). For each layout (`none` = no mesh, the plain
single-device engine; `N` = a ("data", "tensor") mesh of N devices):

  ttft    a RAG prompt (a system prompt, --passages passages precomputed alone with
          cache_segments, a new question; the passages rotate so only the system prompt is a
          prefix hit), per policy (default: the default sparsex rule and full prefill), timed
          --repeats times after a warm-up (compile) run; medians.
  decode  --decode-batch prompts of --decode-context tokens, --decode-steps greedy steps, engine
          end to end (host loop included), per step.
  check   the first-token logits of every policy against the first layout's (bfloat16 on GPU:
          a loose check that the sharded programs compute the same thing).
  memory  weights and KV pool bytes per device.

  python scripts/bench_tp.py --preset llama3-8b --tp none 1 --out $OUT          (one GPU)
  python scripts/bench_tp.py --preset llama3-70b --layers 20 --tp none 1 2 4 8  (8 GPUs)
  python scripts/bench_tp.py --smoke --out /tmp/x      (CPU, tiny model; 2 fake devices:
      XLA_FLAGS=--xla_force_host_platform_device_count=2)

Writes OUT/bench_tp.json (after every layout, so a failure keeps what was measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import jax
import numpy as np

import sparsex_jax as sx
from models.config import get_config
from sparsex_jax import sharding

POLICIES = {
    "sparsex": sx.ReuseConfig("sparsex", update_caches=False),  # the default rule, r=0.15, T=4
    "full": sx.ReuseConfig("full", update_caches=False),
    "naive": sx.ReuseConfig("naive", update_caches=False),
    "cacheblend": sx.ReuseConfig("cacheblend", update_caches=False),
    "epic": sx.ReuseConfig("epic", update_caches=False),
}


def _ids(rng, n, vocab):
  return [int(i) for i in rng.integers(10, vocab, size=n)]


def _layouts(names, cfg):
  out = []
  for name in names:
    if name == "none":
      out.append(("none", None))
      continue
    tp = int(name)
    if tp > len(jax.devices()):
      print(f"tp={tp}: skipped, {len(jax.devices())} devices", flush=True)
      continue
    if tp not in sharding.valid_tp(cfg):
      print(f"tp={tp}: skipped, {cfg.name} supports {sharding.valid_tp(cfg)}", flush=True)
      continue
    out.append((name, tp))
  return out


def bench_layout(args, cfg, label, tp, results, ref_logits):
  rng = np.random.default_rng(1)
  v = cfg.vocab_size
  passages = [_ids(rng, args.passage_len, v) for _ in range(args.passages)]
  system = _ids(rng, args.system_len, v)
  n_prompt = len(system) + args.passages * args.passage_len + args.question_len
  pages_ttft = (n_prompt // 16 + 8) * (args.passages + 4)
  pages_decode = args.decode_batch * ((args.decode_context + args.decode_steps) // 16 + 2) + 64
  mesh = None if tp is None else sharding.make_mesh(tp)
  t0 = time.perf_counter()
  engine = sx.Engine.random(cfg, seed=0, page_size=16, num_pages=max(pages_ttft, pages_decode),
                            max_batch_size=args.decode_batch, mesh=mesh)
  jax.block_until_ready(engine.params)
  init_s = time.perf_counter() - t0
  weights = sharding.memory_per_device(engine.params)
  pool = sharding.memory_per_device(engine.pool)
  row = {"layout": label, "tp": tp, "devices": 1 if tp is None else tp, "init_s": init_s,
         "weights_gb_per_device": max(weights.values()) / 1e9,
         "pool_gb_per_device": max(pool.values()) / 1e9, "n_prompt": n_prompt, "ttft": {},
         "checks": {}}
  results["layouts"].append(row)
  t0 = time.perf_counter()
  engine.cache_segments(passages, batch_size=2)
  row["cache_segments_s"] = time.perf_counter() - t0

  def request(i):  # each run starts with another passage: only the system prompt is a prefix hit
    order = (np.arange(args.passages) + i) % args.passages
    question = _ids(np.random.default_rng(200 + i), args.question_len, v)
    return sx.Request([sx.Segment(system)] + [sx.Segment(passages[j]) for j in order]
                      + [sx.Segment(question, cache=False)])

  for name in args.policies:
    reuse = POLICIES[name]
    t0 = time.perf_counter()
    logits = engine.prefill_logits(request(-1), reuse=reuse)  # compile
    compile_s = time.perf_counter() - t0
    if name in ref_logits:
      ref = ref_logits[name]
      rel = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
      row["checks"][name] = {"rel_err_vs_" + results["layouts"][0]["layout"]: rel,
                             "argmax_equal": int(np.argmax(logits)) == int(np.argmax(ref))}
    else:
      ref_logits[name] = logits
    times, plan = [], None
    for i in range(args.repeats):
      t0 = time.perf_counter()
      _, plan = engine.prefill_logits(request(i), reuse=reuse, return_plan=True)
      times.append(time.perf_counter() - t0)
    row["ttft"][name] = {"ms_median": 1e3 * float(np.median(times)),
                         "ms_all": [1e3 * t for t in times], "compile_s": compile_s,
                         "n_reused": int(plan.reused_positions.size),
                         "n_recomputed": int(plan.selected_positions.size)}
    print(f"  [{label}] {name:8s} ttft {row['ttft'][name]['ms_median']:8.1f} ms "
          f"(compile {compile_s:.1f} s) {row['checks'].get(name, '')}", flush=True)

  if args.decode_steps > 0:
    rng = np.random.default_rng(2)
    reqs = [sx.Request([sx.Segment(_ids(rng, args.decode_context, v))])
            for _ in range(args.decode_batch)]
    sp = sx.SamplingParams(max_new_tokens=args.decode_steps + 1, ignore_eos=True)
    full = sx.ReuseConfig("full", update_caches=False)
    engine.generate(reqs, sp, reuse=full)  # compile
    t0 = time.perf_counter()
    outs = engine.generate(reqs, sp, reuse=full)
    wall = time.perf_counter() - t0
    row["decode"] = {"batch": args.decode_batch, "context": args.decode_context,
                     "steps": args.decode_steps,
                     "ms_per_step": 1e3 * (wall - outs[0].stats.ttft_s) / args.decode_steps,
                     "prefill_ms": 1e3 * outs[0].stats.ttft_s}
    tokens = [o.token_ids for o in outs]
    if "decode_tokens" in results:
      row["checks"]["decode_tokens_equal"] = tokens == results["decode_tokens"]
    else:
      results["decode_tokens"] = tokens
    print(f"  [{label}] decode {row['decode']['ms_per_step']:.2f} ms/step (batch "
          f"{args.decode_batch} x {args.decode_context})", flush=True)
  del engine
  gc.collect()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--layers", type=int, default=None,
                  help="override n_layers (real per-layer shapes, a model that fits)")
  ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
  ap.add_argument("--tp", nargs="+", default=None,
                  help="layouts: 'none' (no mesh) and tensor-parallel degrees (default: none "
                       "and every degree the devices and the model's KV heads allow)")
  ap.add_argument("--policies", nargs="+", default=["sparsex", "full"], choices=list(POLICIES))
  ap.add_argument("--passages", type=int, default=6)
  ap.add_argument("--passage-len", type=int, default=512)
  ap.add_argument("--system-len", type=int, default=256)
  ap.add_argument("--question-len", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--decode-batch", type=int, default=8)
  ap.add_argument("--decode-context", type=int, default=2048)
  ap.add_argument("--decode-steps", type=int, default=32)
  ap.add_argument("--smoke", action="store_true",
                  help="tiny model and sizes (CPU tests): every code path in seconds")
  args = ap.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
  if args.smoke:
    cfg = get_config("tiny", dtype=dtype).replace(n_layers=5)
    args.passages, args.passage_len, args.system_len, args.question_len = 3, 40, 16, 8
    args.repeats, args.decode_batch, args.decode_context, args.decode_steps = 1, 2, 24, 3
  else:
    cfg = get_config(args.preset, dtype=dtype)
  if args.layers:
    cfg = cfg.replace(n_layers=args.layers)
  names = args.tp or ["none"] + [str(d) for d in sharding.valid_tp(cfg)
                                 if d <= len(jax.devices())]
  results = {"device": str(jax.devices()[0].device_kind), "n_devices": len(jax.devices()),
             "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
             "command": " ".join(sys.argv), "preset": cfg.name, "config": {
                 "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
                 "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim, "dtype": cfg.dtype,
                 "params_b": cfg.num_params() / 1e9}, "layouts": [], "errors": []}
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "bench_tp.json")
  ref_logits: dict = {}
  print(f"{cfg.name}: {cfg.n_layers} layers, {cfg.num_params() / 1e9:.1f}B params, {cfg.dtype}, "
        f"{len(jax.devices())} x {results['device']}", flush=True)
  for label, tp in _layouts(names, cfg):
    try:
      bench_layout(args, cfg, label, tp, results, ref_logits)
    except Exception:  # keep what was measured; report the failure
      results["errors"].append(f"layout {label}: " + traceback.format_exc())
      print(traceback.format_exc(), flush=True)
    with open(path, "w") as f:
      json.dump({k: v for k, v in results.items() if k != "decode_tokens"}, f, indent=1)
  print(f"wrote {path}", flush=True)
  return 1 if results["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
