"""Round 19: what an 8-bit host tier does to a chat's history (TIERS.md listed it as unmeasured).

A history continued from the host tier is read by every layer of the next turn, where a reused
segment's stored K/V is read only above T; so its quantisation error reaches more of the prompt.
Per conversation (real SmolLM2-135M in float32, text of three genres from pip packages):
passages cached alone, a first turn (system, three passages, a question) answered with the
sparsex default (16 tokens, greedy), then the next turn (the first, the answer, a new question),
whose history is continued from
  pool        the continuation cache in the pool (nothing left the device)
  native      the host tier in the pool's dtype (bit-identical to the pool: a check)
  int8, fp8   the 8-bit host tiers
and, as the cost of having no history at all,
  re-blend    the same turn on an engine that never saw the first (its passages reused anew).
Reported: first-token KL of the next turn from full prefill of the same tokens, mean over
conversations, and each tier against the pool.

    PYTHONPATH=. python docs/results/round19/probes/study_history_8bit.py OUT.json [--n 12]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import sparsex_jax as sx
from models.loaders import load_model
from sparsex_jax.research import text as texts

HOST = 1 << 28
REUSE = sx.SparseX()  # the default: r = 0.15, T = 4, two segment heads
GENRES = ("essays", "news", "reference")


def kl(p_logits, q_logits) -> float:
  p = jax.nn.log_softmax(np.asarray(p_logits, np.float64))
  q = jax.nn.log_softmax(np.asarray(q_logits, np.float64))
  return float(np.sum(np.exp(p) * (p - q)))


def conversation(rng, genre_docs, tok):
  doc = genre_docs[int(rng.integers(len(genre_docs)))][1]
  sents = texts.split_sentences(doc)
  start = int(rng.integers(max(1, len(sents) - 30)))
  chunks = [" ".join(sents[start + 8 * i:start + 8 * i + 8]) for i in range(3)]
  passages = [tok.encode(" " + c) for c in chunks]
  system = tok.encode("You answer questions about the passages below.")
  q1 = tok.encode(" Question: what is the main point of these passages? Answer:")
  q2 = tok.encode(" Question: and what follows from it? Answer:")
  return passages, system, q1, q2


def main(argv=None) -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("out")
  ap.add_argument("--n", type=int, default=12, help="conversations per genre")
  args = ap.parse_args(argv)
  loaded = load_model("smollm2-135m", dtype="float32")
  cfg, params, tok = loaded.config, loaded.params, loaded.tokenizer
  rng = np.random.default_rng(19)
  rows = []
  t0 = time.time()
  for genre in GENRES:
    docs = texts.load_documents(genre)
    for i in range(args.n):
      passages, system, q1, q2 = conversation(rng, docs, tok)
      first = sx.Request([sx.Segment(system)] + [sx.Segment(p) for p in passages]
                         + [sx.Segment(q1, cache=False)])
      row = {"genre": genre, "i": i}
      answer = None
      for variant in ("pool", "native", "int8", "fp8", "re-blend"):
        host = variant in ("native", "int8", "fp8")
        eng = sx.Engine(cfg, params, tok, page_size=16, num_pages=1024,
                        host_cache_bytes=HOST if host else None,
                        host_cache_dtype=variant if variant in ("int8", "fp8") else "native")
        eng.cache_segments(passages)
        if variant != "re-blend":
          out = eng.generate([first], sx.SamplingParams(max_new_tokens=16, ignore_eos=True),
                             reuse=REUSE)[0]
          assert answer is None or out.token_ids == answer, variant  # the same first turn
          answer = out.token_ids
        if host:
          eng.store.continuation_cache.evict(10**6)
          eng.store.prefix_cache.evict(10**6)
        turn = sx.Request(first.segments + (sx.Segment(answer + q2, cache=False),))
        logits, plan = eng.prefill_logits(turn, REUSE, return_plan=True)
        if variant == "pool":
          full = sx.Engine(cfg, params, tok, page_size=16, num_pages=1024).prefill_logits(
              turn, sx.ReuseConfig("full"))
          row["tokens"] = int(plan.labels.size)
        row[variant] = kl(full, logits)
        row[f"{variant}_reused"] = int(np.sum(plan.labels == 1))
      rows.append(row)
      print(json.dumps(row), f"{time.time() - t0:.0f} s", flush=True)
  summary = {}
  for v in ("pool", "native", "int8", "fp8", "re-blend"):
    vals = np.array([r[v] for r in rows])
    pool = np.array([r["pool"] for r in rows])
    diff = vals - pool  # paired: the same conversation's next turn
    boot = np.random.default_rng(0).choice(diff, (2000, diff.size)).mean(axis=1)
    summary[v] = {"mean_kl": float(vals.mean()), "vs_pool": float(vals.mean() / pool.mean()),
                  "paired_diff": float(diff.mean()),
                  "paired_diff_ci95": [float(np.percentile(boot, 2.5)),
                                       float(np.percentile(boot, 97.5))]}
  print(json.dumps(summary, indent=1))
  with open(args.out, "w") as f:
    json.dump({"command": "study_history_8bit.py " + " ".join(argv or []), "jax": jax.__version__,
               "device": jax.devices()[0].device_kind, "summary": summary, "rows": rows}, f,
              indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
