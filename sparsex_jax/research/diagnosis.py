"""Where the reuse error comes from: the oracle study's per-token features, by token class.

Reads the `_features.npz` that scripts/oracle_selection.py writes beside its JSON (per reused
token: its K/V deviation from full prefill at every layer, the Sparse-Q attention at the probed
layers, its offset in its segment, the segment's length, whether the segment was cached alone,
whether it sits within 16 positions of a new token, and the greedy oracle's choice) and splits
them by token class:

  head      the first 2 tokens of a reused segment (the default always recomputes them);
  start     the rest of the first ceil(0.15 * len) tokens (EPIC's set at r = 0.15);
  boundary  other tokens within 16 positions of a new token (the paper's overflow blocks);
  interior  everything else.

For each workload family, cache state (segment cached alone or in context) and class: the share
of tokens, of the K/V deviation at layer T and summed over the sparse layers, of the first-order
error (attention x deviation) at layer T and at the deepest probed layer, and of the greedy
oracle's picks.

    python -m sparsex_jax.research.diagnosis docs/results/oracle_round10 [--threshold 4]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys

import numpy as np

CLASSES = ("head", "start", "boundary", "interior")


def token_class(in_segment: np.ndarray, segment_length: np.ndarray, next_to_new: np.ndarray,
                ratio: float = 0.15, heads: int = 2) -> np.ndarray:
  """The class index (into CLASSES) of every reused token."""
  start_len = np.ceil(np.round(ratio * segment_length, 9)).astype(np.int64)
  out = np.full(in_segment.shape, 3, np.int8)
  out[next_to_new] = 2
  out[in_segment < start_len] = 1
  out[in_segment < heads] = 0
  return out


def _shares(values: np.ndarray, classes: np.ndarray) -> list[float]:
  total = float(values.sum())
  return [float(values[classes == c].sum()) / total if total > 0 else math.nan
          for c in range(len(CLASSES))]


def analyse(prefix: str, threshold: int) -> dict:
  """{(workload, state): {measure: [share per class]}} over the study's prompts."""
  with open(prefix + ".json") as f:
    data = json.load(f)
  probe = data["meta"]["probe_layers"]
  feats = np.load(prefix + "_features.npz")
  acc = collections.defaultdict(lambda: collections.defaultdict(list))
  for p in data["prompts"]:
    key = p["key"]
    get = lambda name: feats[f"{key}/{name}"]  # noqa: E731
    if f"{key}/segment_length" not in feats:
      continue  # a study written before the class features
    dev = get("deviation").astype(np.float64)  # [L, n]
    attn = get("attention").astype(np.float64)  # [P, n]
    cls = token_class(get("in_segment"), get("segment_length"), get("next_to_new"))
    alone = get("cached_alone")
    deep = probe[-1]
    a_t = attn[probe.index(threshold - 1)] + (attn[probe.index(threshold)]
                                              if threshold >= 2 and threshold in probe else 0)
    rows = {
        "tokens": np.ones(cls.size),
        "deviation@T": dev[threshold],
        "deviation>=T": dev[threshold:].sum(0),
        "error@T": a_t * dev[threshold],
        f"error@{deep}": attn[-1] * dev[deep],
    }
    if f"{key}/greedy_chosen" in feats:
      rows["oracle picks"] = get("greedy_chosen").astype(np.float64)
    for state, mask in (("alone", alone), ("in context", ~alone)):
      if not mask.any():
        continue
      for name, v in rows.items():
        acc[(p["workload"], state)][name].append(_shares(v[mask], cls[mask]))
  return {k: {m: np.nanmean(np.array(v), axis=0).tolist() for m, v in d.items()}
          for k, d in acc.items()}


def markdown(result: dict) -> str:
  lines = ["| family | segments | measure | " + " | ".join(CLASSES) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in CLASSES) + " |"]
  for (w, state), measures in sorted(result.items()):
    for name, shares in measures.items():
      lines.append(f"| {w} | {state} | {name} | "
                   + " | ".join(f"{100 * x:.0f}%" for x in shares) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("prefix", help="the oracle study's output prefix (PREFIX.json, "
                  "PREFIX_features.npz)")
  ap.add_argument("--threshold", type=int, default=4)
  args = ap.parse_args(argv)
  print(markdown(analyse(args.prefix, args.threshold)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
