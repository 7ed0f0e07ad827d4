"""Issue 28, round 17: eviction policies of the KV store under pool pressure, at the store level
(no device: acquire, plan, commit and release as the engine does them, tests/kv's `_run`).

A workload shaped like scripts/bench_serve.py's: chat sessions (a system message, one of a few
shared documents, then turns of a question and a 64-token answer, each later turn resending the
history) and agent pipelines (a shared tool output, each agent seeing the earlier agents'
answers), in rounds: turn k of every session and pipeline, then turn k + 1 (the cyclic order
of a server whose sessions each wait for their answer). Sparsex policy (r = 0.15, T = 4 of 32).

Per pool size and policy: tokens continued (no compute), exact, reused (approximate: full layers
and r of the sparse layers) and computed; `effective` = computed + reused x (T/L + r (L-T)/L),
the prefill work in full-token units.

`from_host` (store policy only): tokens after each prompt's exact and continued ones whose
continuation blocks were evicted earlier and would still be in a host tier of unbounded size:
what spilling continuations to host memory could serve as continued instead.

Policies:
  store        the KV store's own eviction (whatever the checked-out commit does)
  unhit_first  prefix blocks, then segment copies never hit, then continuations, then the rest
               of the segments (implemented here)

    python sim_eviction.py OUT.json [--pages 1000 1500 2000 2500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

from sparsex_jax.kv import KVStore, PoolExhausted, PoolLayout
from sparsex_jax.kv.store import continuation_namespace
from sparsex_jax.prompt import Prompt
from tests.kv.test_kv_store import CFG, POLICIES, _run

T, L, R = 4, 32, 0.15


def unhit_first(store):
  seg, hits = store.segment_cache, set()
  lookup = seg.lookup

  def counting(token_ids, pin=False, namespace=""):
    entry = lookup(token_ids, pin=pin, namespace=namespace)
    if entry is not None:
      hits.add(entry.key)
    return entry

  def evict_unhit(n):
    freed = 0
    for entry in list(seg._entries.values()):  # pylint: disable=protected-access
      if freed >= n:
        break
      if entry.key not in hits and seg._evictable(entry):  # pylint: disable=protected-access
        freed += seg._drop(entry)  # pylint: disable=protected-access
    return freed

  def evict(n):
    freed = 0
    for step in (store.prefix_cache.evict, evict_unhit, store.continuation_cache.evict,
                 seg.evict):
      if freed < n:
        freed += step(n - freed)
    return freed

  seg.lookup = counting
  store.allocator._evictors = [(evict, None)]  # pylint: disable=protected-access


def simulate(policy: str, num_pages: int, sessions=24, turns=4, docs=4, doc_len=400,
             pipelines=8, agents=4, seed=0, live_pages=0) -> dict:
  rng = np.random.default_rng(seed)
  tok = lambda n: rng.integers(100, 30000, n).astype(np.int32)  # noqa: E731
  store = KVStore(PoolLayout.for_model(CFG, page_size=16, num_pages=num_pages))
  if policy == "unhit_first":
    unhit_first(store)
  store.allocator.allocate(live_pages)  # what the running batch holds (never released here)
  spilled: set[bytes] = set()  # continuation blocks evicted so far (an unbounded host tier)
  cont = store.continuation_cache
  on_remove = cont.on_remove

  def note(block):
    spilled.add(block.key)
    on_remove(block)

  cont.on_remove = note
  namespace = continuation_namespace("", POLICIES["sparsex"])
  shared = [tok(doc_len) for _ in range(docs)]
  chats = [[tok(20), shared[rng.integers(docs)], tok(5)] for _ in range(sessions)]
  pipes = [{"tool": tok(doc_len), "systems": [tok(20) for _ in range(agents)], "answers": []}
           for _ in range(pipelines)]
  out = {"continued": 0, "exact": 0, "reused": 0, "prompt": 0, "failed": 0, "from_host": 0}
  for k in range(turns):
    order = [("chat", s) for s in range(sessions)] + [("agent", p) for p in range(pipelines)]
    for kind, i in order:
      if kind == "chat":
        msgs = chats[i] + [tok(60)]
      elif k < agents:
        msgs = [pipes[i]["systems"][k], pipes[i]["tool"]] + pipes[i]["answers"] + [tok(60)]
      else:
        continue
      prompt = Prompt(tuple(msgs), tuple([True] * len(msgs)))
      try:
        (plan,) = _run(store, [prompt], POLICIES["sparsex"])
      except PoolExhausted:
        out["failed"] += 1
        continue
      size = store.layout.page_size
      last = (plan.n - 1) // size  # the last token is always computed
      keys = cont.block_keys(prompt.token_ids, namespace)  # (private until round 18)
      for b, key in enumerate(keys):
        if b < plan.n_exact // size:
          continue
        if b >= last or key not in spilled:
          break
        out["from_host"] += size
      out["prompt"] += plan.n
      out["continued"] += plan.n_continued
      out["exact"] += plan.n_exact - plan.n_continued
      out["reused"] += plan.n_reused
      if kind == "chat":
        chats[i] = msgs + [tok(64)]
      else:
        pipes[i]["answers"].append(tok(64))
  out["computed"] = out["prompt"] - out["exact"] - out["continued"] - out["reused"]
  out["effective"] = round(out["computed"] + out["reused"] * (T / L + R * (L - T) / L))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("out")
  p.add_argument("--pages", type=int, nargs="+", default=[1000, 1500, 2000, 2500])
  p.add_argument("--gpu-shape", action="store_true",
                 help="bench_serve's H100 run: 48 sessions, 16 pipelines, 4,000-token documents "
                      "and tool outputs, 8 documents; pages of 16 tokens, 32 running requests' "
                      "pages held (--pages: the whole pool)")
  args = p.parse_args(argv)
  shape = {}
  if args.gpu_shape:
    shape = {"sessions": 48, "pipelines": 16, "docs": 8, "doc_len": 4000,
             "live_pages": 32 * 4600 // 16}
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
  rows = []
  for pages in args.pages:
    for policy in ("store", "unhit_first"):
      row = {"pages": pages, "policy": policy} | shape | simulate(policy, pages, **shape)
      rows.append(row)
      print(json.dumps(row), flush=True)
  with open(args.out, "w") as f:
    json.dump({"commit": commit, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
