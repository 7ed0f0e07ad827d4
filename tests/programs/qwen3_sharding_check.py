"""Qwen3 MoE with its experts split over 2 fake CPU devices vs one device (run by
test_sharding.py, in its own process: the device count must be set before jax is imported).

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m tests.programs.qwen3_sharding_check

Checks, float32: prefill logits of the full prefill and of the default reuse rule equal the
unsharded engine's (rel. error < 1e-5), greedy tokens of the decode loop are equal, each device
holds half of every expert (and of the attention weights, the router replicated), and the compiled
decode step sums the expert shares with one all-reduce per layer (beside the one after o) and
gathers no weights. Prints one JSON line per check; exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import re
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import numpy as np  # noqa: E402

import sparsex_jax as sx  # noqa: E402
from models.config import get_config  # noqa: E402
from sparsex_jax import sharding  # noqa: E402
from sparsex_jax.programs.decode import decode_step  # noqa: E402
from tests.models.test_qwen3 import random_params  # noqa: E402

# 6 layers: the default rule (T = 4) has sparse layers; 8 experts, 4 per device; 2 KV heads.
CFG = get_config("qwen3-moe-tiny").replace(n_layers=6)
TP, TOL = 2, 1e-5
FAILED = []


def report(**row):
  if not row.get("ok", True):
    FAILED.append(row)
  print(json.dumps(row), flush=True)


def run(engine, docs, req):
  engine.cache_segments(docs)
  no_update = dict(update_caches=False)
  logits = {"full": engine.prefill_logits(req, reuse=sx.Full()),
            "sparsex": engine.prefill_logits(req, reuse=sx.SparseX(**no_update))}
  sp = sx.SamplingParams(max_new_tokens=8, ignore_eos=True)
  tokens = engine.generate([req], sp, reuse=sx.SparseX(**no_update))[0].token_ids
  return logits, tokens


def check_layout(engine):
  mlp = engine.params["layers"]["attn_out_mlp"]
  for name in ("expert_gate", "expert_up", "expert_down"):
    leaf = mlp[name]
    want = list(leaf.shape)
    want[1] //= TP
    shards = {tuple(s.data.shape) for s in leaf.addressable_shards}
    report(check=f"{name} split by experts", shards=sorted(shards), ok=shards == {tuple(want)}
           and len(leaf.addressable_shards) == TP)
  router = mlp["router"].addressable_shards[0].data.shape
  report(check="router replicated", shard=list(router), ok=tuple(router) == mlp["router"].shape)


def check_decode_program(engine):
  b, mp, d = 2, 8, CFG.d_model
  z = np.zeros(b, np.int32)
  hlo = engine.kv.compile(
      decode_step, engine.params, z, z, np.full(b, engine.layout.sentinel, np.int32),
      np.zeros((b, mp), np.int32), z + 1, np.zeros(b, np.float32), np.ones(b, np.float32),
      np.zeros(b, np.uint32), np.int32(1), cfg=CFG, backend="auto").as_text()
  residual = re.findall(rf"= f32\[{b},1,{d}\]\S* all-reduce(?:-start)?\(", hlo)
  # the layer body is a loop: its collectives appear once in the HLO (o's, then the experts')
  report(check="decode all-reduces of the residual stream per layer", n=len(residual),
         ok=len(residual) == 2)
  gathers = re.findall(r"= (\S+) all-gather", hlo)
  too_big = [g for g in gathers if _elems(g) > b * max(CFG.vocab_size, d)]
  report(check="decode gathers no weights", gathers=gathers, ok=not too_big)


def _elems(shape: str) -> int:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return int(np.prod([int(x) for x in m.group(1).split(",") if x])) if m else 0


def main():
  params = random_params(CFG, seed=21, scale=0.25)
  rng = np.random.default_rng(22)
  ids = lambda n: [int(i) for i in rng.integers(3, CFG.vocab_size, n)]  # noqa: E731
  docs = [ids(27), ids(19)]
  req = sx.Request([sx.Segment(ids(11), cache=False), sx.Segment(docs[1]), sx.Segment(docs[0]),
                    sx.Segment(ids(6), cache=False)])
  make = lambda mesh: sx.Engine(CFG, params, page_size=4, num_pages=96,  # noqa: E731
                                max_batch_size=1, mesh=mesh)
  ref_logits, ref_tokens = run(make(None), docs, req)
  engine = make(sharding.make_mesh(TP))
  logits, tokens = run(engine, docs, req)
  for label, want in ref_logits.items():
    rel = float(np.linalg.norm(logits[label] - want) / np.linalg.norm(want))
    report(check="logits", policy=label, rel_err=rel, ok=rel < TOL)
  report(check="greedy tokens", tokens=tokens, want=ref_tokens,
         ok=tokens == ref_tokens and len(set(tokens)) > 1)
  check_layout(engine)
  check_decode_program(engine)
  try:
    sharding.check_model(CFG.replace(n_experts=5), sharding.make_mesh(TP))
    report(check="5 experts at tp 2 raises", ok=False)
  except ValueError as e:
    report(check="5 experts at tp 2 raises", message=str(e), ok="n_experts=5" in str(e))
  print(json.dumps({"failed": len(FAILED)}))
  return 1 if FAILED else 0


if __name__ == "__main__":
  sys.exit(main())
