"""SparseX: the Sparse-Q set (the new tokens and the last prompt token) decides which reused
tokens are recomputed in the sparse layers [T, L).

Two rules, each a method:
  SparseX        the default: rank by attention x |K/V deviation| (to first order, the error a
                 reused token causes in the new tokens' outputs, not only how much it is read),
                 and always recompute the first `segment_heads` tokens of every reused segment.
  SparseXPaper   the paper's rule: rank by the Sparse-Q attention mass at the last full layer.
Both probe layer 0 when T = 0 (no full layer ran).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from sparsex_jax.programs.scoring import ScoringInputs
from sparsex_jax.reuse.base import (DEFAULT_LAYER_THRESHOLD, Selection, check_threshold,
                                    reused_segments)
from sparsex_jax.reuse.baselines import TopK
from sparsex_jax.validation import is_int

# A segment cached alone starts as a sequence does: its first tokens carry attention-sink K/V,
# far from what they are in context (docs/quality.md, round 2).
DEFAULT_SEGMENT_HEADS = 2


@dataclasses.dataclass(frozen=True)
class AttentionMass:
  """The paper's scorer: the attention the Sparse-Q rows pay each token at the last full layer
  T - 1 (at T = 0, layer 0's, probed)."""

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
class SparseXPaper(TopK):
  """The paper's rule: the top ceil(r * n_reused) reused tokens by Sparse-Q attention mass at
  the last full layer; layers [0, T) full.

  recompute_ratio: r. layer_threshold: T (None: 4, capped at the model's depth).
  """

  mode: ClassVar[str] = "sparsex-paper"
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
class SparseX(SparseXPaper):
  """The default rule (docs/quality.md): attention x |deviation| at layers T - 1 and T (T - 1
  alone at T = 1; attention alone at T = 0, where no deviation exists), the first
  `segment_heads` tokens of every reused segment always selected within the budget.

  recompute_ratio: r. layer_threshold: T (None: 4, capped at the model's depth).
  segment_heads: tokens forced at the head of every reused segment.
  """

  mode: ClassVar[str] = "sparsex"
  segment_heads: int = DEFAULT_SEGMENT_HEADS

  def __post_init__(self):
    super().__post_init__()
    if not is_int(self.segment_heads) or self.segment_heads < 0:
      raise ValueError(f"segment_heads must be an int >= 0, got {self.segment_heads!r}")

  def select(self, plan, layer_threshold: int) -> Selection:
    selection = super().select(plan, layer_threshold)
    if not self.segment_heads:
      return selection
    forced = np.zeros(plan.n, bool)
    for members in reused_segments(plan):
      forced[members[:self.segment_heads]] = True
    return dataclasses.replace(selection, forced=forced & ~plan.sparse_q)

  def device_scorer(self, layer_threshold: int):
    # At T = 0 every reused K/V equals its fresh value at layer 0 (it depends only on the token
    # and its position): no deviation to weigh by, so attention alone ranks.
    if layer_threshold == 0:
      return AttentionMass()
    return AttentionTimesDeviation(read_layer_t=layer_threshold >= 2)
