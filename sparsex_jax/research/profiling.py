"""Where a prefill's device time and memory go: GPU kernel times from a jax.profiler trace, and
the compiled prefill's temporary memory (scripts/profile_prefill.py, bench_throughput.py)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os


def kernel_times(trace_dir: str) -> tuple[dict[str, float], dict[str, dict]]:
  """Total duration (us) per event name on the GPU's streams, from the perfetto trace, and one
  event's arguments per name (the HLO op behind a kernel)."""
  root = glob.escape(trace_dir)
  path = sorted(glob.glob(os.path.join(root, "**", "*.trace.json.gz"), recursive=True)
                + glob.glob(os.path.join(root, "**", "perfetto_trace.json.gz"),
                            recursive=True))[-1]
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {pid for pid, n in names.items() if "GPU" in n or "/device:" in n}
  totals: dict[str, float] = collections.defaultdict(float)
  counts: dict[str, int] = collections.defaultdict(int)
  example: dict[str, dict] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
      name = e["name"]
      if name.startswith("Memcpy"):  # copies apart by HLO op and size: a 4-byte copy is not a
        a = e.get("args", {})        # copy of the pool
        size = next((w for w in a.get("memcpy_details", "").split() if w.startswith("size:")),
                    "")
        name = f"{name} {a.get('hlo_op', '')} {size}"
      e = dict(e, name=name)
      totals[name] += float(e["dur"])
      counts[e["name"]] += 1
      example.setdefault(e["name"], {k: str(v)[:160] for k, v in e.get("args", {}).items()})
  for name in example:
    example[name]["count"] = counts[name]
  return dict(totals), example


def prefill_temp_gib(engine, wl, reuse) -> float:
  """Temporary memory (GiB) of the compiled prefill of the workload's first request."""
  from sparsex_jax import planner  # the engine's internals, read on purpose
  from sparsex_jax.programs.prefill import prefill
  from sparsex_jax.prompt import tokenize
  wl.setup(engine)
  policy = reuse.resolve(engine.config)
  prompt = tokenize(wl.request(0), None, engine.config, 0)
  with engine.store.acquire([prompt], policy, max_new_tokens=1) as leases:
    plans = [planner.plan_request(prompt, leases[0], policy, engine.layout)]
    batch, spec = planner.plan_batch(plans, policy, engine.config, engine.layout)
    compiled = engine.kv.compile(prefill, engine.params, batch, cfg=engine.config, spec=spec)
  return compiled.memory_analysis().temp_size_in_bytes / 2**30
