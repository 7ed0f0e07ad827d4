"""Host side planning: label a request's tokens and pad a batch of plans into prefill arrays.

Plain numpy, no jax: the planner runs before every prefill and must stay out of jit. It turns
cache lookups (done by the engine) into int32 arrays padded to shape buckets, so a batch job
compiles a bounded set of programs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

EXACT, REUSED, NEW = 0, 1, 2


def bucket(n: int, minimum: int = 16) -> int:
  """A padded size for n: powers of two up to 256, then multiples of an eighth of the next power
  of two (4 buckets per octave, at most 25% padding): a bounded set of compiled shapes that does
  not double the attention work of a long prompt."""
  n = max(n, minimum, 1)
  p = 1 << (n - 1).bit_length()
  if p <= 256:
    return p
  step = p // 8
  return -(-n // step) * step


@dataclasses.dataclass
class RequestPlan:
  """One request's prompt, labelled, with the pages it will use."""

  token_ids: np.ndarray  # [n] int32, the whole prompt
  labels: np.ndarray  # [n] int8: EXACT / REUSED / NEW
  src_slots: np.ndarray  # [n] int32 flat pool slot of a reused token's cached K/V, else -1
  old_positions: np.ndarray  # [n] int32 position a reused token's K/V was computed at, else -1
  segment_ids: np.ndarray  # [n] int32 index of the segment each token belongs to
  page_table: np.ndarray  # [n_pages] int32: exact prefix pages, then the request's own pages
  n_exact: int
  n_select: int = 0  # reused tokens to recompute in the sparse layers
  n_keep: int = 0  # of those, still recomputed after re-scoring
  given_score: np.ndarray | None = None  # epic / random scores, [n] float32

  @property
  def n(self) -> int:
    return int(self.token_ids.size)

  @property
  def sparse_q(self) -> np.ndarray:
    """The Sparse-Q set: new tokens, and always the last prompt token."""
    q = self.labels == NEW
    q[-1] = True
    return q

  @property
  def n_reused(self) -> int:
    return int(np.sum(self.labels == REUSED))

  @property
  def n_candidates(self) -> int:
    return int(np.sum((self.labels == REUSED) & ~self.sparse_q))


def n_to_select(ratio: float, n_reused: int, n_candidates: int) -> int:
  """k = ceil(r * n_reused), capped by the reused tokens not already in the Sparse-Q set."""
  # round() first: 0.15 * 100 is 15.000000000000002 in floating point, not 16 tokens.
  return min(n_candidates, int(math.ceil(round(ratio * n_reused, 9))))


def epic_scores(plan: RequestPlan, ratio: float) -> tuple[np.ndarray, int]:
  """EPIC: the first ceil(r * len) tokens of every reused segment; returns (scores, count)."""
  scores = np.zeros(plan.n, np.float32)
  count = 0
  reused = plan.labels == REUSED
  candidates = reused & ~plan.sparse_q
  for seg in np.unique(plan.segment_ids[reused]):
    members = np.flatnonzero(reused & (plan.segment_ids == seg))
    k = int(math.ceil(round(ratio * members.size, 9)))
    chosen = members[:k]
    chosen = chosen[candidates[chosen]]
    scores[chosen] = 1.0
    count += chosen.size
  return scores, count


def random_scores(plan: RequestPlan, seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, plan.n, int(plan.token_ids.sum()) & 0x7FFFFFFF])
  return rng.random(plan.n).astype(np.float32)


def build_prefill_batch(plans: list[RequestPlan], page_size: int, num_pages: int,
                        batch_size: int, max_pages: int) -> dict[str, np.ndarray]:
  """Pads the non-exact tokens of `plans` into [batch_size, T] arrays (T a bucket).

  Padding rows and tokens: position -1, slot sentinel num_pages * page_size (dropped writes).
  """
  sentinel = num_pages * page_size
  t = bucket(max(p.n - p.n_exact for p in plans))
  b = batch_size
  out = {
      "tokens": np.zeros((b, t), np.int32),
      "positions": np.full((b, t), -1, np.int32),
      "slots": np.full((b, t), sentinel, np.int32),
      "src_slots": np.zeros((b, t), np.int32),
      "delta": np.zeros((b, t), np.int32),
      "reused": np.zeros((b, t), bool),
      "sparse_q": np.zeros((b, t), bool),
      "given_score": np.zeros((b, t), np.float32),
      "n_select": np.zeros((b,), np.int32),
      "n_keep": np.zeros((b,), np.int32),
      "last_index": np.zeros((b,), np.int32),
      "page_table": np.zeros((b, max_pages), np.int32),
      "kv_len": np.zeros((b,), np.int32),
  }
  for i, p in enumerate(plans):
    work = slice(p.n_exact, p.n)
    m = p.n - p.n_exact
    pos = np.arange(p.n_exact, p.n, dtype=np.int32)
    out["tokens"][i, :m] = p.token_ids[work]
    out["positions"][i, :m] = pos
    out["slots"][i, :m] = p.page_table[pos // page_size] * page_size + pos % page_size
    reused = p.labels[work] == REUSED
    out["reused"][i, :m] = reused
    out["src_slots"][i, :m] = np.where(reused, p.src_slots[work], 0)
    out["delta"][i, :m] = np.where(reused, pos - p.old_positions[work], 0)
    out["sparse_q"][i, :m] = p.sparse_q[work]
    if p.given_score is not None:
      out["given_score"][i, :m] = p.given_score[work]
    out["n_select"][i] = p.n_select
    out["n_keep"][i] = p.n_keep
    out["last_index"][i] = m - 1
    out["page_table"][i, :p.page_table.size] = p.page_table
    out["kv_len"][i] = p.n
  return out
