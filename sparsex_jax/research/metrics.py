"""Per-prompt metrics and the statistics over prompts (numpy, float64, on the host).

Per prompt, a method is compared with full prefill on the same prompt: KL(full || method) of the
first output token's distribution, top-1 agreement, exact match of the greedy continuation, and the
task score (SQuAD token F1 or answer-in-output). Over prompts: means with percentile bootstrap
intervals, paired bootstrap intervals for differences between methods, and the share of the
naive -> full KL gap a method recovers, 1 - mean KL(method) / mean KL(naive): a ratio of MEANS
(per workload), because per-prompt ratios explode on prompts where naive reuse is already
harmless (KL(naive) near 0).
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np


# ------------------------------------------------------------------------------------------------
# Per prompt
# ------------------------------------------------------------------------------------------------

def log_softmax(logits: np.ndarray) -> np.ndarray:
  x = np.asarray(logits, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
  """KL(p || q) in nats between the softmaxes of two logit vectors [V], computed in float64."""
  p_logits, q_logits = np.asarray(p_logits), np.asarray(q_logits)
  if p_logits.shape != q_logits.shape or p_logits.ndim != 1:
    raise ValueError(f"kl_divergence needs two logit vectors of one shape [V], got "
                     f"{p_logits.shape} and {q_logits.shape}")
  if not (np.all(np.isfinite(p_logits)) and np.all(np.isfinite(q_logits))):
    raise ValueError("kl_divergence: logits contain NaN or inf")
  lp, lq = log_softmax(p_logits), log_softmax(q_logits)
  # Clamp at 0: rounding can leave a tiny negative value for identical distributions.
  return max(0.0, float(np.sum(np.exp(lp) * (lp - lq))))


def top1_agree(p_logits: np.ndarray, q_logits: np.ndarray) -> bool:
  return bool(np.argmax(p_logits) == np.argmax(q_logits))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  """Length of the common prefix of two token sequences."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def exact_match(reference: Sequence[int], other: Sequence[int], n: int) -> bool:
  """Whether the first n generated tokens agree (both stop early at the same place counts)."""
  return list(reference[:n]) == list(other[:n])


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
  """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, squash spaces."""
  s = s.lower()
  s = "".join(ch for ch in s if ch not in _PUNCT)
  s = _ARTICLES.sub(" ", s)
  return " ".join(s.split())


def token_f1(prediction: str, gold: str) -> float:
  """SQuAD token F1 between a prediction and one gold answer (after normalize_answer)."""
  pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if not pred or not ref:
    return float(pred == ref)
  common = collections.Counter(pred) & collections.Counter(ref)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def best_f1(prediction: str, answers: Sequence[str]) -> float:
  if not answers:
    raise ValueError("best_f1 needs at least one gold answer")
  return max(token_f1(prediction, a) for a in answers)


def answer_line(output: str) -> str:
  """The model's answer: the first non-empty line (small models keep talking after it)."""
  for line in output.strip().splitlines():
    if line.strip():
      return line.strip()
  return ""


def contains_answer(output: str, answers: Sequence[str]) -> float:
  """1.0 if any gold answer appears in the output (case-insensitive), else 0.0."""
  low = output.lower()
  return float(any(a.lower() in low for a in answers))


def task_score(metric: str, output: str, answers: Sequence[str]) -> float:
  if metric == "f1":
    return best_f1(answer_line(output), answers)
  if metric == "contains":
    return contains_answer(output, answers)
  raise ValueError(f"unknown task metric {metric!r} (f1 or contains)")


# ------------------------------------------------------------------------------------------------
# Over prompts: bootstrap
# ------------------------------------------------------------------------------------------------

def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
  """[n_boot, n] resampled prompt indices. Pass the same array to every method of a workload
  to get paired intervals."""
  if n < 1:
    raise ValueError("bootstrap needs at least one value")
  return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_ci(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  draws = np.asarray(draws, np.float64)
  draws = draws[np.isfinite(draws)]
  if draws.size == 0:
    return float("nan"), float("nan")
  a = (1 - level) / 2
  lo, hi = np.quantile(draws, [a, 1 - a])
  return float(lo), float(hi)


def mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95,
            idx: np.ndarray | None = None) -> dict:
  """Mean, median and a percentile bootstrap interval of the mean."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    return {"n": 0, "mean": float("nan"), "median": float("nan"), "ci": [float("nan")] * 2}
  idx = bootstrap_indices(x.size, n_boot, seed) if idx is None else idx
  lo, hi = percentile_ci(x[idx].mean(axis=1), level)
  return {"n": int(x.size), "mean": float(x.mean()), "median": float(np.median(x)),
          "ci": [lo, hi]}


def gap_recovered(kl_method: Sequence[float], kl_naive: Sequence[float]) -> float:
  """1 - mean KL(method) / mean KL(naive) over the same prompts: 1 is full prefill's quality, 0
  naive reuse's, below 0 worse than naive."""
  m, n = np.asarray(kl_method, np.float64), np.asarray(kl_naive, np.float64)
  if m.shape != n.shape:
    raise ValueError(f"gap_recovered needs paired values, got {m.shape} and {n.shape}")
  denom = n.mean() if n.size else 0.0
  if not denom > 0:
    return float("nan")  # naive reuse already matches full: no gap to recover
  return float(1.0 - m.mean() / denom)


def gap_recovered_draws(kl_method: np.ndarray, kl_naive: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Bootstrap draws [n_boot] of gap_recovered, prompts resampled jointly (paired)."""
  m, n = np.asarray(kl_method, np.float64)[idx], np.asarray(kl_naive, np.float64)[idx]
  denom = n.mean(axis=1)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(denom > 0, 1.0 - m.mean(axis=1) / denom, np.nan)


def diff_verdict(ci: Sequence[float], higher_is_better: bool = True) -> str:
  """'better' / 'worse' when the interval of (a - b) excludes 0, else 'tie'."""
  lo, hi = ci
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return "n/a"
  if lo > 0:
    return "better" if higher_is_better else "worse"
  if hi < 0:
    return "worse" if higher_is_better else "better"
  return "tie"
