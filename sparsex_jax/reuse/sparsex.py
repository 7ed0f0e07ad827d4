"""SparseX: the Sparse-Q set (the new tokens and the last prompt token) decides which reused
tokens are recomputed in the sparse layers [T, L).

Three rules, each a method:
  SparseX           the default: rank by attention x |K/V deviation| (to first order, the error a
                    reused token causes in the new tokens' outputs, not only how much it is
                    read), and always recompute the first tokens of every reused segment:
                    `segment_heads` of one cached alone, `context_heads` of one computed in
                    context.
  SparseXPaper      the paper's rule as its second version publishes it (DESIGN.md section 2b):
                    Sparse-Q attention mass at the boundary layer, plus overflow blocks around
                    every new interval and the tail fallback, T a fraction of the depth.
  SparseXAttention  the paper's attention-mass ranking alone (our reading of its abstract).
Each probes layer 0 when T = 0 (no full layer ran).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from sparsex_jax.labels import NEW, REUSED
from sparsex_jax.programs.scoring import ScoringInputs
from sparsex_jax.reuse.base import (DEFAULT_LAYER_THRESHOLD, Selection, ceil_fraction,
                                    check_threshold, segment_heads)
from sparsex_jax.reuse.baselines import TopK
from sparsex_jax.validation import is_int, is_real

# A segment cached alone starts as a sequence does: its first tokens carry attention-sink K/V,
# far from what they are in context (docs/quality.md, round 2). The ranking sees that error at
# layer T already; forcing 2 tokens covers the sink.
DEFAULT_SEGMENT_HEADS = 2
# A segment computed in context (a chat message, an agent's answer: its first token's old position
# is > 0) carries the context it was computed after in its first tokens' deep-layer K/V. That
# context has changed, and the error is not yet visible at layer T, so the ranking cannot find
# it; forcing recomputes it (docs/quality.md, the diagnosis and round 15's test-split run).
DEFAULT_CONTEXT_HEADS = 8


@dataclasses.dataclass(frozen=True)
class AttentionMass:
  """The paper's scorer: the attention the scoring rows (the Sparse-Q set, and the tail
  fallback's queries where the method adds them) pay each token at the last full layer T - 1
  (at T = 0, layer 0's, probed)."""

  uses_probe: ClassVar[bool] = True

  def __call__(self, inputs: ScoringInputs, pool):
    if inputs.layer_threshold == 0:
      return inputs.layer0_attention(pool)
    return inputs.attention(inputs.layer_threshold - 1, inputs.x_prev, pool), pool


@dataclasses.dataclass(frozen=True)
class AttentionTimesDeviation:
  """The default scorer: Sparse-Q attention x the norm of the K/V deviation at layer T.

  To first order, a reused token j moves a query's output by a_j * |dv_j| (its value) plus
  a_j * |q.dk_j| * |v_j - o| / sqrt(d) (its key shifting the softmax): linear in the deviation
  (the square over-weights a few far-off tokens against many that are read more).
  Measuring the deviation computes every token's exact K/V at layer T (the layers below ran in
  full); they are written for every token, not only the selected (+0.8 points [+0.3, +1.3] of
  the gap on the test split, no measurable cost on the H100: docs/quality.md, round 3).
  With read_layer_t (T >= 2), the attention is the sum of layer T - 1's and layer T's over those
  fresh K/V (+1.8 [+0.2, +3.3] on the test split at the default, at the same device time; at
  T = 1 it was worse, -4.7: our reading, layers 0 and 1 attend mostly by position; rounds 8-9).
  """

  read_layer_t: bool
  uses_probe: ClassVar[bool] = True

  def __call__(self, inputs: ScoringInputs, pool):
    t = inputs.layer_threshold
    squared, pool = inputs.deviation(pool, refresh=True)
    attention = inputs.attention(t - 1, inputs.x_prev, pool)
    if self.read_layer_t:
      attention = inputs.attention(t, inputs.x, pool) + attention
    return attention * jnp.sqrt(squared), pool


@dataclasses.dataclass(frozen=True)
class SparseXAttention(TopK):
  """The paper's attention-only ranking: the top ceil(r * n_reused) reused tokens by Sparse-Q
  attention mass at the last full layer; layers [0, T) full.

  recompute_ratio: r. layer_threshold: T (None: 4, capped at the model's depth).
  """

  mode: ClassVar[str] = "sparsex-attention"
  layer_threshold: int | None = None

  def __post_init__(self):
    super().__post_init__()
    check_threshold(self.layer_threshold)

  def layer_threshold_for(self, n_layers: int) -> int:
    if self.layer_threshold is None:
      return min(n_layers, DEFAULT_LAYER_THRESHOLD)
    return self.layer_threshold

  def device_scorer(self, layer_threshold: int):
    return AttentionMass()


@dataclasses.dataclass(frozen=True)
class SparseX(SparseXAttention):
  """The default rule (docs/quality.md): attention x |deviation| at layers T - 1 and T (T - 1
  alone at T = 1; attention alone at T = 0, where no deviation exists), and the first tokens of
  every reused segment always selected within the budget (fewer of each, evenly, when the
  budget cannot hold them all: base.segment_heads). How many depends on where the segment's K/V
  were computed, which the plan knows: from position 0 (cached alone) or after other tokens
  (in context).

  recompute_ratio: r. layer_threshold: T (None: 4, capped at the model's depth).
  segment_heads: tokens forced at the head of every reused segment cached alone.
  context_heads: tokens forced at the head of every reused segment computed in context.
  """

  mode: ClassVar[str] = "sparsex"
  segment_heads: int = DEFAULT_SEGMENT_HEADS
  context_heads: int = DEFAULT_CONTEXT_HEADS

  def __post_init__(self):
    super().__post_init__()
    for name in ("segment_heads", "context_heads"):
      value = getattr(self, name)
      if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")

  def select(self, plan, layer_threshold: int) -> Selection:
    selection = super().select(plan, layer_threshold)
    if not (self.segment_heads or self.context_heads):
      return selection

    def heads_of(members):  # computed in context: its first token's old position is > 0
      return self.context_heads if plan.old_positions[members[0]] > 0 else self.segment_heads

    forced = segment_heads(plan, heads_of, selection.n_select)
    return dataclasses.replace(selection, forced=forced)

  def device_scorer(self, layer_threshold: int):
    # At T = 0 every reused K/V equals its fresh value at layer 0 (it depends only on the token
    # and its position): no deviation to weigh by, so attention alone ranks.
    if layer_threshold == 0:
      return AttentionMass()
    return AttentionTimesDeviation(read_layer_t=layer_threshold >= 2)


# The paper (v2, section 2b of DESIGN.md): l* is about 15-20% of the layers for ~7B models and
# 10-15% for large and MoE ones (Qwen3-8B: 5-7 of 36); the tail fallback uses the last 64 queries.
PAPER_LAYER_FRACTION = 0.15
PAPER_TAIL_QUERIES = 64
# "One block" at each end of a new interval: vLLM's KV block, 16 tokens (the paper runs on vLLM).
PAPER_OVERFLOW_BLOCK = 16


def new_intervals(plan):
  """[(start, end)] of every maximal run of new tokens (the non-reused, computed positions)."""
  is_new = (plan.labels == NEW).astype(np.int8)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], is_new, [0]])))
  return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def overflow_tokens(plan, block: int) -> np.ndarray:
  """S_ov [n] bool: the reused tokens within `block` positions before or after a new interval
  (its local, positional attention across the boundary)."""
  out = np.zeros(plan.n, bool)
  for start, end in new_intervals(plan):
    out[max(0, start - block):start] = True
    out[end:end + block] = True
  return out & (plan.labels == REUSED)


def tail_tokens(plan, n_queries: int) -> np.ndarray:
  """S_tail [n] bool: when the prompt ends in a reused segment, its last n_queries tokens (they
  stand in for the Sparse-Q rows the prompt's end lacks)."""
  out = np.zeros(plan.n, bool)
  if n_queries and plan.labels[-1] == REUSED:
    last = plan.segment_ids[-1]
    members = np.flatnonzero((plan.segment_ids == last) & (plan.labels == REUSED))
    out[members[-n_queries:]] = True
  return out


@dataclasses.dataclass(frozen=True)
class SparseXPaper(TopK):
  """The paper's rule as published (arXiv 2606.01751v2, read from a secondary summary): layers
  [0, T) full; at the boundary layer T - 1 the Sparse-Q rows' attention, summed into one strength
  per key, picks the top k = ceil(r * n_reused) reused tokens (S_key); the reused tokens within
  `overflow_block` positions of every new interval (S_ov) and, when the prompt ends in a reused
  segment, its last `tail_queries` tokens (S_tail, whose queries also join the scoring rows) are
  recomputed besides: R = I_nr + S_key + S_ov + S_tail.

  recompute_ratio: r (the paper gives no default budget; ours). layer_threshold: T; None takes
  round(layer_fraction * L), at least 1. overflow_block, tail_queries: 0 turns that part off.
  What we could not confirm: the block size (vLLM's 16 assumed), whether S_ov and S_tail count
  against the budget (here they come on top of k), and whether exact-prefix tokens start a
  "non-reused interval" (here only new tokens do: an exact prefix's K/V are exact already).
  """

  mode: ClassVar[str] = "sparsex-paper"
  layer_threshold: int | None = None
  layer_fraction: float = PAPER_LAYER_FRACTION
  overflow_block: int = PAPER_OVERFLOW_BLOCK
  tail_queries: int = PAPER_TAIL_QUERIES

  def __post_init__(self):
    super().__post_init__()
    check_threshold(self.layer_threshold)
    if not is_real(self.layer_fraction) or not 0.0 < self.layer_fraction <= 1.0:
      raise ValueError(f"layer_fraction must be in (0, 1], got {self.layer_fraction!r}")
    for name in ("overflow_block", "tail_queries"):
      value = getattr(self, name)
      if not is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")

  def layer_threshold_for(self, n_layers: int) -> int:
    if self.layer_threshold is not None:
      return self.layer_threshold
    return max(1, int(math.floor(self.layer_fraction * n_layers + 0.5)))

  def select(self, plan, layer_threshold: int) -> Selection:
    tail = tail_tokens(plan, self.tail_queries)
    forced = (overflow_tokens(plan, self.overflow_block) | tail) & ~plan.sparse_q
    k = ceil_fraction(self.recompute_ratio, plan.n_reused)
    return Selection(n_select=min(plan.n_candidates, k + int(forced.sum())), forced=forced,
                     score_rows=plan.sparse_q | tail)

  def device_scorer(self, layer_threshold: int):
    return AttentionMass()
