"""Candidate selection rules of round 10, measured beside the default before any is adopted.

The question (issue 27): on chat and agent prompts EPIC, which recomputes the first
ceil(r * len) tokens of every reused segment, beats the default's ranking. Which share of the
budget should go to such positional tokens is the request's business, not a tuned constant:

  sparsex-split  the default rule's scorer and budget, but the budget is split per request:
                 a share s goes to the positional set H (each reused segment's first
                 ceil(r * len) tokens, EPIC's set, taken earliest first across segments by the
                 fraction of the segment they sit at), the rest to the ranking by attention x
                 |deviation|. s is the share of the measured K/V deviation at layer T that
                 sits in H (the 2 forced segment heads, whose K/V carry attention sinks when
                 a segment was cached alone, left out of both sums). Where the deviation sits
                 at the segment starts, as when a conversation lost its oldest turns, s is large
                 and the rule approaches EPIC; where it is spread, s is about r and the ranking
                 decides.
  sparsex-split-error  the same with s the share of the first-order error (attention x
                 |deviation|) in H instead of the deviation's.

Each is a method of the same shape as the shipped ones (sparsex_jax/reuse): a frozen config
with a host `select` and a static device scorer.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from sparsex_jax.reuse.base import ceil_fraction, reused_segments
from sparsex_jax.reuse.sparsex import SparseX


def positional_priority(plan, ratio: float) -> np.ndarray:
  """[n] float32: for each reused segment's first ceil(r * len) tokens (EPIC's set), 1 - its
  offset / len (earlier first, comparable across segments of any length); 0 elsewhere."""
  out = np.zeros(plan.n, np.float32)
  for members in reused_segments(plan):
    h = ceil_fraction(ratio, members.size)
    out[members[:h]] = 1.0 - np.arange(h, dtype=np.float32) / members.size
  return out


@dataclasses.dataclass(frozen=True)
class SplitScorer:
  """attention x |deviation| (the default's), with the top `s * budget` of the positional set
  moved ahead of every ranked token; s measured on this request (see the module doc)."""

  read_layer_t: bool
  share_by: str  # "deviation" or "error"
  uses_probe: ClassVar[bool] = True

  def __call__(self, inputs, pool):
    batch, t = inputs.batch, inputs.layer_threshold
    squared, pool = inputs.deviation(pool, refresh=True)
    deviation = jnp.sqrt(squared)
    attention = inputs.attention(t - 1, inputs.x_prev, pool)
    if self.read_layer_t:
      attention = inputs.attention(t, inputs.x, pool) + attention
    error = attention * deviation
    ranked = batch.reused & ~batch.sparse_q & ~batch.forced
    priority = jnp.where(ranked, batch.given_score, 0.0)
    in_h = priority > 0
    weight = deviation if self.share_by == "deviation" else error
    total = jnp.sum(jnp.where(ranked, weight, 0.0), axis=1)
    share = jnp.sum(jnp.where(in_h, weight, 0.0), axis=1) / jnp.maximum(total, 1e-30)
    n_forced = jnp.sum(batch.forced & batch.reused & ~batch.sparse_q, axis=1)
    budget = jnp.maximum(batch.n_select - n_forced, 0)
    n_positional = jnp.round(share * budget).astype(jnp.int32)
    order = jnp.argsort(-priority, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1)
    positional = in_h & (rank < n_positional[:, None])
    top = jnp.max(jnp.where(ranked, error, 0.0), axis=1, keepdims=True)
    normalised = error / jnp.maximum(top, 1e-30)  # in [0, 1]: below every positional pick
    return jnp.where(positional, 2.0 + priority, normalised), pool


@dataclasses.dataclass(frozen=True)
class SparseXSplit(SparseX):
  """The default rule with its budget split between positional and ranked tokens per request
  (module doc). recompute_ratio: r; layer_threshold: T (None: 4); segment_heads: forced heads."""

  mode: ClassVar[str] = "sparsex-split"
  share_by: ClassVar[str] = "deviation"

  def select(self, plan, layer_threshold: int):
    selection = super().select(plan, layer_threshold)
    return dataclasses.replace(selection,
                               given_score=positional_priority(plan, self.recompute_ratio))

  def device_scorer(self, layer_threshold: int):
    if layer_threshold == 0:
      return super().device_scorer(layer_threshold)
    return SplitScorer(read_layer_t=layer_threshold >= 2, share_by=self.share_by)


@dataclasses.dataclass(frozen=True)
class SparseXSplitError(SparseXSplit):
  mode: ClassVar[str] = "sparsex-split-error"
  share_by: ClassVar[str] = "error"


CANDIDATES = {m.mode: m for m in (SparseXSplit, SparseXSplitError)}
