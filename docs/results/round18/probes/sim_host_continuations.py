"""Issue 28, round 18: what the host tier's continuations serve at the store level (no device:
acquire, plan, commit and release as the engine does them, with a stand-in for the pool's pages).

The workload is round 17's (docs/results/round17/probes/sim_eviction.py): chat sessions (a
system message, one of a few shared documents, then turns of a question and a 64-token answer,
each later turn resending the history) and agent pipelines (a shared tool output, each agent
seeing the earlier agents' answers), in rounds (turn k of every session and pipeline, then
turn k + 1). Sparsex policy (r = 0.15, T = 4 of 32 for the work estimate).

Per pool size and host budget (in pool pages; 0: no host tier): tokens continued from the pool
and from the host tier (no compute; the host ones cost a copy), exact, reused (approximate:
full layers and r of the sparse layers) and computed; `effective` = computed + reused x
(T/L + r (L-T)/L), the prefill work in full-token units; turns that found no pages.

    python sim_host_continuations.py OUT.json [--gpu-shape] [--pages 20000 24000] [--host 0 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

from sparsex_jax import planner
from sparsex_jax.kv import KVStore, PoolExhausted, PoolLayout
from sparsex_jax.kv.host_tier import HostTier
from sparsex_jax.kv.segment_cache import segment_key
from sparsex_jax.prompt import Prompt
from tests.kv.test_kv_store import CFG, POLICIES

T, L, R = 4, 32, 0.15


class Pages:
  """The pool's page reads, as zeros of the right shape (the sim counts, it does not compute)."""

  def __init__(self, layout):
    self.shape = (CFG.n_layers, CFG.n_kv_heads, 0, layout.page_size, CFG.head_dim)

  def read_pages(self, pages):
    shape = self.shape[:2] + (len(pages),) + self.shape[3:]
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def simulate(num_pages: int, host_pages: int, sessions=24, turns=4, docs=4, doc_len=400,
             pipelines=8, agents=4, seed=0, live_pages=0, second_sight=False) -> dict:
  """second_sight: a segment computed in context is copied into the segment cache only the
  second time a prompt holds it (a chat message is read again only by its own conversation,
  which continues it; an agent's answer is read by the agents after it)."""
  rng = np.random.default_rng(seed)
  tok = lambda n: rng.integers(100, 30000, n).astype(np.int32)  # noqa: E731
  layout = PoolLayout.for_model(CFG, page_size=16, num_pages=num_pages)
  tier = HostTier(host_pages * layout.bytes_per_page) if host_pages else None
  store = KVStore(layout, tier)
  store.page_io = Pages(layout)
  store.allocator.allocate(live_pages)  # what the running batch holds (never released here)
  policy = POLICIES["sparsex"]
  shared = [tok(doc_len) for _ in range(docs)]
  chats = [[tok(20), shared[rng.integers(docs)], tok(5)] for _ in range(sessions)]
  pipes = [{"tool": tok(doc_len), "systems": [tok(20) for _ in range(agents)], "answers": []}
           for _ in range(pipelines)]
  seen: set[str] = set()
  out = {"continued": 0, "from_host": 0, "exact": 0, "reused": 0, "prompt": 0, "failed": 0}
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
        with store.acquire([prompt], policy, max_new_tokens=2) as leases:
          lease = leases[0]
          plan = planner.plan_request(prompt, lease, policy, store.layout)
          from_host = sum(int(np.count_nonzero(load.pages >= 0)) for load in lease.run_loads)
          kept = prompt
          if second_sight:
            keys = [segment_key(ids) for ids in prompt.segments]
            kept = Prompt(prompt.segments, tuple(c and key in seen for c, key in
                                                 zip(prompt.cacheable, keys)))
            seen.update(keys)
          with store.commit([kept], [plan], policy):
            pass
      except PoolExhausted:
        out["failed"] += 1
        continue
      out["from_host"] += from_host * layout.page_size
      out["prompt"] += plan.n
      out["continued"] += plan.n_continued
      out["exact"] += plan.n_exact - plan.n_continued
      out["reused"] += plan.n_reused
      if kind == "chat":
        chats[i] = msgs + [tok(64)]
      else:
        pipes[i]["answers"].append(tok(64))
  if not live_pages:  # (the running batch's pages are held outside the store)
    store.check_invariants()
  out["computed"] = out["prompt"] - out["exact"] - out["continued"] - out["reused"]
  out["effective"] = round(out["computed"] + out["reused"] * (T / L + R * (L - T) / L))
  if tier is not None:
    stats = tier.stats()
    out["host_blocks_dropped"] = stats["continuation_blocks_dropped"]
    out["host_segments_dropped"] = stats["dropped"]
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser()
  p.add_argument("out")
  p.add_argument("--pages", type=int, nargs="+", default=[1000, 1500, 2000, 2500])
  p.add_argument("--host", type=int, nargs="+", default=[0, 4000],
                 help="host budgets in pool pages (0: no host tier)")
  p.add_argument("--second-sight", action="store_true",
                 help="also each row with segments copied only at their second sight")
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
    for host in args.host:
      for sight in (False, True) if args.second_sight else (False,):
        row = {"pages": pages, "host_pages": host, "second_sight": sight} | shape | simulate(
            pages, host, second_sight=sight, **shape)
        rows.append(row)
        print(json.dumps(row), flush=True)
  with open(args.out, "w") as f:
    json.dump({"commit": commit, "command": " ".join(sys.argv), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
