"""Study: could the cache predict which reused tokens deep layers read?

The oracle of quality.md (round 5) gains its +6 points over the runtime rule by knowing the
attention the new tokens pay each reused token in deep layers; the runtime sees only the last full
layer (T - 1). A statistic stored with the K/V when a segment is cached would be free at reuse
time. This study compares, on the real model with a plain float32 forward (CPU), how well each
candidate predicts the new rows' attention summed over layers >= T in full prefill ("deep"):

  runtime         the new rows' attention at layer T - 1 in full prefill (what the rule reads)
  received        attention the token received from the later tokens of its own segment, summed
                  over layers >= T, when the segment was computed alone (storable at cache time)
  received/later  the same divided by the number of later tokens (early tokens are visible to
                  more rows)

Metrics per prompt over the reused tokens that are not segment heads (the first 2 tokens of each
segment, which the rule always selects): Spearman correlation with "deep", and the share of the
top 15% by "deep" that each candidate's top 15% finds. Segments cached alone (needle, MuSiQue).

    python scripts/study_deep_attention.py --data ../shared/data/musique_s.json --prompts 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparsex_jax as sx
from models import llama
from sparsex_jax.research import text as txt
from sparsex_jax.research import workloads as wl
from sparsex_jax.research.residual_carry import layer_params, segment_layout


def attention_probs(q, k, sm_scale):
  """Causal softmax probabilities [N, T, T] (heads x queries x keys) of one sequence."""
  t, n, h = q.shape[1:]
  g = n // k.shape[2]
  kk = jnp.repeat(k[0], g, axis=1)  # [T, N, H]
  s = jnp.einsum("TNH,SNH->NTS", q[0].astype(jnp.float32), kk.astype(jnp.float32)) * sm_scale
  mask = jnp.tril(jnp.ones((t, t), bool))
  return jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)


def forward_probs(params, cfg, tokens):
  """Per layer, the causal attention probabilities summed over heads [L, T, T]."""
  t = tokens.size
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  x = llama.embed(params, jnp.asarray(tokens)[None])
  out = []
  for i in range(cfg.n_layers):
    lp = layer_params(params, i)
    q, k, v = llama.layer_qkv(lp, cfg, x, pos)
    p = attention_probs(q, k, cfg.sm_scale)
    out.append(np.asarray(p.sum(0)))
    attn = llama.dense_attention(q, k, v, pos, jnp.array([t], jnp.int32), cfg.sm_scale)
    x = llama.layer_output(lp, cfg, x, attn)
  return np.stack(out)


def _spearman(a, b):
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def _top_share(pred, target, frac=0.15):
  k = max(1, int(np.ceil(frac * target.size)))
  return len(set(np.argsort(-pred)[:k]) & set(np.argsort(-target)[:k])) / k


def study(engine, prompt, threshold: int) -> dict:
  params, cfg = engine.params, engine.config
  segs, tokens, starts, reused, n_ctx = segment_layout(engine, prompt)
  probs = forward_probs(params, cfg, tokens)  # [L, T, T]
  rows = np.arange(n_ctx, tokens.size)  # the new rows (question and generation prompt)
  from_new = probs[:, rows].sum(1)  # [L, T]: attention the new rows pay each key
  deep = from_new[threshold:].sum(0)
  runtime = from_new[threshold - 1]
  received = np.zeros(tokens.size)
  later = np.ones(tokens.size)
  keep = []
  for i in reused:
    a, b = int(starts[i]), int(starts[i + 1])
    pa = forward_probs(params, cfg, segs[i])  # the segment alone
    col = pa[threshold:].sum(0)  # [n, n], queries x keys
    received[a:b] = col.sum(0) - np.diagonal(col)  # from the later tokens only
    later[a:b] = np.maximum(np.arange(b - a)[::-1], 1)
    keep.extend(range(a + 2, b))  # not the 2 segment heads
  keep = np.asarray(keep)
  cands = {"runtime": runtime, "received": received, "received/later": received / later}
  return {"key": prompt.key, "n_prompt": int(tokens.size), "n_scored": int(keep.size),
          "spearman": {k: _spearman(v[keep], deep[keep]) for k, v in cands.items()},
          "top15_found": {k: _top_share(v[keep], deep[keep]) for k, v in cands.items()}}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data", help="musique_s.json (without it only the needle workload runs)")
  ap.add_argument("--model", default="smollm2-135m")
  ap.add_argument("--split", default="dev", choices=("dev", "test"))
  ap.add_argument("--prompts", type=int, default=5)
  ap.add_argument("--threshold", type=int, default=4)
  ap.add_argument("--out", default="/tmp/study_deep_attention.json")
  args = ap.parse_args(argv)
  engine = sx.Engine.from_pretrained(args.model, dtype="float32", num_pages=64)
  workloads = ["needle"] + (["musique"] if args.data else [])
  items = txt.load_musique(args.data) if args.data else None
  prompts = wl.build(engine.tokenizer, workloads, args.split, args.prompts, wl.Sizes.quick(), 0,
                     items)
  results, t0 = [], time.perf_counter()
  for w in workloads:
    for prompt in prompts[w]:
      r = study(engine, prompt, args.threshold)
      r["workload"] = w
      results.append(r)
      print(f"[{prompt.key}] {time.perf_counter() - t0:.0f} s: spearman "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["spearman"].items()) + "; top15 "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["top15_found"].items()), flush=True)
  summary = {w: {m: {k: float(np.mean([r[m][k] for r in results
                                        if w in ("all", r["workload"])]))
                     for k in results[0][m]} for m in ("spearman", "top15_found")}
             for w in workloads + ["all"]}
  with open(args.out, "w") as f:
    json.dump({"command": "python scripts/study_deep_attention.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "threshold": args.threshold,
        "summary": summary, "prompts": results}, f, indent=1)
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
