"""Tensor-parallel engine vs the unsharded engine on fake CPU devices (run by test_sharding.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.programs.sharding_check [--tp 1 2 4]

XLA_FLAGS must be set before jax is imported, hence a script in its own process. For each tensor
parallel degree: prefill logits of every reuse policy (at the smallest degree above 1; at the
others, tp 1 and 4: the sparse and prefix ones, see labels_at) equal
the unsharded engine's (float32, rel. error < 1e-5), greedy tokens are equal, every device holds 1/tp of the layer weights and of the KV
pool, the compiled decode step all-reduces exactly twice per layer (after o and after down), and
a segment cache saved from the sharded pool loads into a pool of another degree, and segments
evicted into the host tier load back into the sharded pool. Prints one JSON
line per check and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import sparsex_jax as sx  # noqa: E402
from models import llama  # noqa: E402
from models.config import get_config  # noqa: E402
from sparsex_jax import sharding, step_runner  # noqa: E402
from sparsex_jax.programs.decode import decode_step  # noqa: E402

# 4 KV heads (tp 1, 2, 4), 4 layers so that T = 2 leaves sparse layers, q/k/v biases (Qwen2).
CFG = get_config("tiny").replace(name="tiny-tp", n_layers=4, n_heads=8, n_kv_heads=4,
                                 qkv_bias=True)
NO_UPDATE = dict(update_caches=False)  # every policy sees the same caches
POLICIES = [
    ("full", sx.ReuseConfig("full", **NO_UPDATE)),
    ("naive", sx.ReuseConfig("naive", **NO_UPDATE)),
    ("cacheblend", sx.ReuseConfig("cacheblend", **NO_UPDATE)),
    ("epic", sx.ReuseConfig("epic", **NO_UPDATE)),
    ("sparsex T=2", sx.ReuseConfig("sparsex", layer_threshold=2, **NO_UPDATE)),
    # the default at T = 1 (layer T - 1 alone), the paper's rule at T = 1 and T = 0 (the probe)
    ("sparsex T=1", sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.4,
                                   **NO_UPDATE)),
    ("sparsex-attention T=1", sx.SparseXAttention(layer_threshold=1, recompute_ratio=0.4, **NO_UPDATE)),
    ("sparsex-attention T=0", sx.SparseXAttention(layer_threshold=0, recompute_ratio=0.3, **NO_UPDATE)),
    ("prefix (fills)", sx.ReuseConfig("prefix")),
    ("prefix (hits)", sx.ReuseConfig("prefix")),
]
TOL = 1e-5
FAILED = []


START = time.perf_counter()
COMPILED: list[str] = []  # jit'd function names, as jax reports their backend compiles
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, fun_name="", **__: COMPILED.append(fun_name)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def report(**row):
  row["t"] = round(time.perf_counter() - START, 1)
  ok = row.get("ok", True)
  if not ok:
    FAILED.append(row)
  print(json.dumps(row), flush=True)


def workload():
  rng = np.random.default_rng(0)
  ids = lambda n: [int(i) for i in rng.integers(10, CFG.vocab_size, n)]  # noqa: E731
  docs = [ids(40), ids(29), ids(35)]
  system, question = ids(24), ids(9)
  req = sx.Request([sx.Segment(system), sx.Segment(docs[1]), sx.Segment(docs[0]),
                    sx.Segment(question, cache=False), sx.Segment(docs[2]),
                    sx.Segment(question, cache=False)])
  return docs, req


def make_engine(params, mesh):
  return sx.Engine(CFG, params, page_size=8, num_pages=96, max_batch_size=2, mesh=mesh)


# Every policy runs at the smallest degree above 1 (tp 2: two KV heads per device). At tp 1
# every collective is over one device: the mesh code path is what is checked there; at tp 4
# (one KV head per device) what changes is the head split, not the policy. At both, the sparse
# prefill (with its selection) and the prefix cache (filled, then hit) cover it: each policy's
# program compiles once per degree, the larger part of this script's time.
SUBSET = ("sparsex T=2", "prefix (fills)", "prefix (hits)")


def labels_at(tp, tps):
  """The policies run at degree tp: all of them at the smallest degree above 1, else SUBSET."""
  return None if tp == min([t for t in tps if t > 1], default=None) else SUBSET


def run_policies(engine, docs, req, labels=None):
  engine.cache_segments(docs)
  logits = {label: engine.prefill_logits(req, reuse=reuse) for label, reuse in POLICIES
            if labels is None or label in labels}
  sp = sx.SamplingParams(max_new_tokens=8, ignore_eos=True)  # the prefill compiled above
  tokens = engine.generate([req], sp, reuse=POLICIES[4][1])[0].token_ids
  return logits, tokens


def check_layout(engine, tp):
  """Each device holds 1/tp of every sharded weight and of the pool."""
  total = sharding.nbytes(engine.params)
  per_dev = sharding.memory_per_device(engine.params)
  replicated = sum(x.nbytes for x in jax.tree.leaves(
      {"n": engine.params["final_norm"],
       "l": [engine.params["layers"][m]["norm"] for m in ("attn_in", "attn_out_mlp")]}))
  want = (total - replicated) / tp + replicated
  report(check="weights per device", tp=tp, bytes=sorted(set(per_dev.values())), want=want,
         ok=len(per_dev) == tp and all(b == want for b in per_dev.values()))
  # wqkv [L, D, K, G + 2, H] and bqkv [L, K, G + 2, H] split over KV heads, wo over heads.
  for name in ("wqkv", "bqkv", "wo"):
    leaf = engine.params["layers"]["attn_in" if name != "wo" else "attn_out_mlp"][name]
    shard = leaf.addressable_shards[0].data.shape
    want_shape = list(leaf.shape)
    axis = 2 if name == "wqkv" else 1
    want_shape[axis] //= tp
    report(check=f"{name} shard shape", tp=tp, shard=list(shard), ok=list(shard) == want_shape)
  for name in ("w_gate_up", "w_down"):  # [L, D, 2, F] over F; [L, F, D] over F
    leaf = engine.params["layers"]["attn_out_mlp"][name]
    want_shape = list(leaf.shape)
    want_shape[3 if name == "w_gate_up" else 1] //= tp
    report(check=f"{name} shard shape", tp=tp,
           shard=list(leaf.addressable_shards[0].data.shape),
           ok=list(leaf.addressable_shards[0].data.shape) == want_shape)
  pool = sharding.memory_per_device(engine.pool)
  pool_total = sharding.nbytes(engine.pool)
  report(check="pool per device", tp=tp, bytes=sorted(set(pool.values())),
         want=pool_total / tp, ok=len(pool) == tp and all(b * tp == pool_total
                                                           for b in pool.values()))


def check_decode_program(engine, tp):
  """The compiled decode step: two all-reduces of the residual stream per layer (in the scanned
  body), and arguments of (weights + pool) / tp per device."""
  b, mp = 2, 8
  z = np.zeros(b, np.int32)
  compiled = engine.kv.compile(
      decode_step, engine.params, z, z, np.full(b, engine.layout.sentinel, np.int32),
      np.zeros((b, mp), np.int32), z + 1, np.zeros(b, np.float32), np.ones(b, np.float32),
      np.zeros(b, np.uint32), np.int32(1), cfg=CFG, backend="auto")
  hlo = compiled.as_text()
  d = CFG.d_model
  residual = re.findall(rf"= f32\[{b},1,{d}\]\S* all-reduce(?:-start)?\(", hlo)
  # the layer body is scanned: its collectives appear once in the HLO
  report(check="decode all-reduces of the residual stream per layer", tp=tp,
         n=len(residual), ok=len(residual) == (2 if tp > 1 else 0))
  report(check="decode all-gathers (none of the pool or the weights)", tp=tp,
         gathers=[g for g in re.findall(r"= (\S+) all-gather", hlo)],
         ok=all(_elems(s) <= b * max(CFG.vocab_size, d) for s in
                re.findall(r"= (\S+) all-gather", hlo)))
  mem = compiled.memory_analysis()
  if mem is not None:
    args = getattr(mem, "argument_size_in_bytes", None)
    want = (sharding.nbytes(engine.params) + sharding.nbytes(engine.pool)) / tp
    report(check="decode argument bytes per device", tp=tp, bytes=args, want=want,
           ok=args is None or abs(args - want) / want < 0.05)
    pool = sharding.nbytes(engine.pool) / tp
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    report(check="decode updates the pool in place (aliased, no temp copy)", tp=tp,
           alias=alias, temp=temp, pool=pool, ok=alias >= pool and temp < pool / 2)


def check_compile_ahead(engine, docs, tp):
  """A server's compile thread under a mesh (entrypoints/serve/compiling.py): a prefill and a
  slot-copy width compiled ahead (programs' compile_later) compile nothing when they run, and
  the copy's segment is then cached."""
  policy = sx.ReuseConfig("sparsex", layer_threshold=1).resolve(engine.config)
  rng = np.random.default_rng(1)
  new_segment = [int(i) for i in rng.integers(10, CFG.vocab_size, 33)]  # copies pad to 64
  prompt = engine.tokenize(sx.Request([sx.Segment(docs[0]), sx.Segment(new_segment),
                                       sx.Segment([11, 12, 13], cache=False)]), 4)
  with engine.store.acquire([prompt], policy, [4]) as leases:
    _, prefill_now = step_runner.prefill_compile(engine, [prompt], leases, policy)
    _, copy_now = step_runner.copy_compile(engine, 64)
    start = len(COMPILED)
    prefill_now()
    copy_now()
    ahead = len(COMPILED) - start
    start = len(COMPILED)
    step_runner.prefill_and_commit(engine, [prompt], leases, policy)
    at_run = COMPILED[start:]
  report(check="compiled ahead, nothing compiled at run", tp=tp, ahead=ahead, at_run=at_run,
         cached=engine.store.contains_segment(new_segment),
         ok=ahead == 2 and not at_run and engine.store.contains_segment(new_segment))


def check_host_tier(params, docs, req, ref_logits, tp):
  """The host tier under a mesh: segments evicted from the sharded pool into the tier and loaded
  back for a sparse prefill give the unsharded engine's logits (its segments in the pool), and
  the tier's programs compiled ahead (step_runner.host_tier_compiles) compile nothing when the
  eviction and the load run."""
  engine = sx.Engine(CFG, params, page_size=8, num_pages=96, max_batch_size=2,
                     mesh=sharding.make_mesh(tp), host_cache_bytes=1 << 22)
  label, reuse = POLICIES[4]  # sparsex T=2: the loads copy layers [2, 4)
  policy = reuse.resolve(engine.config)
  engine.host_tier.split_layer = policy.layer_threshold  # as `sparsex serve` sets it
  thunks = step_runner.host_tier_compiles(engine, policy)
  for thunk in thunks:
    thunk()[1]()
  start = len(COMPILED)
  engine.cache_segments(docs)
  engine.store.segment_cache.evict(10**6)
  in_tier = len(engine.host_tier)
  got = engine.prefill_logits(req, reuse=reuse)
  loads = engine.host_tier.stats()["loads"]
  page_programs = [n for n in COMPILED[start:] if "page" in n]
  rel = float(np.linalg.norm(got - ref_logits[label]) / np.linalg.norm(ref_logits[label]))
  report(check="host tier under a mesh", tp=tp, in_tier=in_tier, loads=loads, rel_err=rel,
         compiled_ahead=len(thunks), page_programs_at_run=page_programs,
         ok=in_tier == len(docs) and bool(loads) and rel < TOL and not page_programs)


def _elems(shape: str) -> int:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return int(np.prod([int(x) for x in m.group(1).split(",") if x])) if m else 0


def check_persist(params, docs, req, ref_logits, tps):
  """Saves the segment cache of a sharded pool (tp[-1]); loads it into every other layout."""
  with tempfile.TemporaryDirectory() as d:
    src = make_engine(params, sharding.make_mesh(tps[-1]))
    src.use_cache_dir(d)
    src.cache_segments(docs)
    for tp in [None] + list(tps[-2:-1]):  # unsharded, and the next degree down
      dst = make_engine(params, None if tp is None else sharding.make_mesh(tp))
      dst.use_cache_dir(d, save=False)
      got = dst.prefill_logits(req, reuse=sx.ReuseConfig("naive", **NO_UPDATE))
      want = ref_logits["naive"]
      rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
      report(check="persist: saved at tp=%d, loaded" % tps[-1], tp=tp or 0,
             loaded=dst.disk_cache.loaded, rel_err=rel,
             ok=rel < TOL and dst.disk_cache.loaded == len(docs))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
  args = ap.parse_args()
  params = llama.init_params(CFG, 0)
  docs, req = workload()
  ref_logits, ref_tokens = run_policies(make_engine(params, None), docs, req)
  for tp in args.tp:
    engine = make_engine(params, sharding.make_mesh(tp))
    logits, tokens = run_policies(engine, docs, req, labels_at(tp, args.tp))
    for label in logits:
      rel = float(np.linalg.norm(logits[label] - ref_logits[label])
                  / np.linalg.norm(ref_logits[label]))
      report(check="logits", tp=tp, policy=label, rel_err=rel, ok=rel < TOL)
    report(check="greedy tokens", tp=tp, tokens=tokens, ok=tokens == ref_tokens)
    check_layout(engine, tp)
    check_decode_program(engine, tp)
    if labels_at(tp, args.tp) is None:
      check_compile_ahead(engine, docs, tp)
      check_host_tier(params, docs, req, ref_logits, tp)
  check_persist(params, docs, req, ref_logits, args.tp)
  try:
    sharding.check_model(CFG.replace(n_kv_heads=4, n_heads=8), sharding.make_mesh(3))
    report(check="tp=3 with 4 KV heads raises", ok=False)
  except ValueError as e:
    report(check="tp=3 with 4 KV heads raises", message=str(e), ok="[1, 2, 4]" in str(e))
  print(json.dumps({"failed": len(FAILED)}))
  return 1 if FAILED else 0


if __name__ == "__main__":
  sys.exit(main())
