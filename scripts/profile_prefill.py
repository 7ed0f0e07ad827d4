"""Where a prefill's device time goes: GPU kernels by total time, per method (jax.profiler).

Runs bench_ttft's workload (random weights at a preset's shapes) for each method label, traces a
few prefills after the warm-up, and prints the kernels that take the most device time (summed
over the traced runs, divided by the runs), with their share of the method's total. JSON under --out.

  python scripts/profile_prefill.py --preset llama3-8b --context 8192 --methods naive \
      "sparsex r=0.15 T=4" --out $OUT/profile
  python scripts/profile_prefill.py --preset llama3-8b --context 32768 --methods "dense prefill" \
      full --out $OUT/profile32k          ("dense prefill": bench_ttft's anchor, same prompt length)
  python scripts/profile_prefill.py --preset llama3-8b --context 32768 --memory --methods \
      "sparsex-attention r=0.15 T=4" "sparsex r=0.15 T=4" --out $OUT/mem
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax

from sparsex_jax.research import ttft as bt  # bench_ttft's workloads, engine and method table
from sparsex_jax.research.profiling import kernel_times, prefill_temp_gib


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--context", type=int, default=8192)
  ap.add_argument("--workload", default="rag", choices=bt.WORKLOADS)
  ap.add_argument("--methods", nargs="+", required=True)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--top", type=int, default=15)
  ap.add_argument("--verbose", action="store_true", help="print each kernel's HLO op")
  ap.add_argument("--memory", action="store_true",
                  help="only compile each method's prefill and print its temporary memory "
                       "(a temp that grows with the pool means a copy of the pool)")
  ap.add_argument("--out", default=os.environ.get("OUT", "profile_out"))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  engine = bt.make_engine(args.preset, [args.context], smoke=False)
  wl = bt.Workload(args.workload, engine.config, args.context, args.runs)
  policies = dict(bt.POLICIES)
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "command": " ".join(sys.argv), "methods": {}}
  if args.memory:
    report["temp_gib"] = {label: prefill_temp_gib(engine, wl, policies[label])
                          for label in args.methods}
    for label, gib in report["temp_gib"].items():
      print(f"{label}: temp {gib:.2f} GiB (pool K {engine.kv.arrays['k'].nbytes / 2**30:.2f} GiB)",
            flush=True)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
      json.dump(report, f, indent=1)
    return
  for label in args.methods:
    if label == bt.DENSE:  # the anchor: bench_ttft's plain dense prefill of the same length
      ids = [t for seg in wl.request(0).segments for t in seg.content]
      tokens = jax.numpy.asarray([ids], jax.numpy.int32)
      impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
      run = lambda i: jax.block_until_ready(bt.dense_prefill(  # noqa: E731
          engine.params, tokens, cfg=engine.config, impl=impl))
    else:
      reuse = policies[label]
      wl.setup(engine)
      run = lambda i: engine.prefill_logits(wl.request(i), reuse=reuse)  # noqa: E731
    run(-1)  # compile and warm up
    for i in range(args.runs):  # every shape bucket compiled before tracing
      run(i)
    trace_dir = os.path.join(args.out, "".join(c if c.isalnum() or c in "=._" else "_"
                                               for c in label))
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for i in range(args.runs):
        run(i)
    totals, example = kernel_times(trace_dir)
    per_run = {k: v / args.runs / 1e3 for k, v in totals.items()}  # ms per prefill
    total = sum(per_run.values())
    top = sorted(per_run.items(), key=lambda kv: -kv[1])[:args.top]
    report["methods"][label] = {"device_ms_per_run": total, "top_ms": top,
                                "top_args": {name: example[name] for name, _ in top}}
    print(f"{label}: {total:.1f} ms of GPU kernels per prefill", flush=True)
    for name, ms in top:
      print(f"  {ms:8.2f} ms {100 * ms / total:5.1f}%  {name[:110]}  x{example[name]['count']}",
            flush=True)
      if args.verbose:
        print(f"      {example[name]}", flush=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  main()
