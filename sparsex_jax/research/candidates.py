"""Round 12's candidate rules: variants of the default measured with leave-one-family-out selection
(docs/quality_log.md). A candidate that loses is deleted (and its commit tagged), one that wins
moves into sparsex_jax/reuse/.

SparseXContextHeads: the default, with more tokens forced at the head of a reused segment whose
K/V were computed *in context* (after other tokens: its first token's old position is > 0) than at
the head of one cached alone (computed from position 0). The two kinds of segment start are wrong
for different reasons (docs/quality.md, the diagnosis): a segment cached alone starts with
attention-sink K/V, wrong from layer 0, which the ranking sees at layer T and 2 forced tokens
cover; a segment computed in context carries the old context in its first tokens' deep-layer K/V,
an error that is not visible at layer T, so the ranking cannot find it and only forcing recomputes
it. What the prefill knows at run time (where each segment's K/V were computed) decides the split.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sparsex_jax.reuse.base import segment_heads
from sparsex_jax.reuse.sparsex import SparseX
from sparsex_jax.validation import is_int


@dataclasses.dataclass(frozen=True)
class SparseXContextHeads(SparseX):
  """SparseX with `context_heads` tokens forced at the head of every segment computed in context
  (`segment_heads` at the head of those cached alone), within the budget."""

  mode: ClassVar[str] = "sparsex-context-heads"
  context_heads: int = 8

  def __post_init__(self):
    super().__post_init__()
    if not is_int(self.context_heads) or self.context_heads < 0:
      raise ValueError(f"context_heads must be an int >= 0, got {self.context_heads!r}")

  def select(self, plan, layer_threshold: int):
    selection = super(SparseX, self).select(plan, layer_threshold)  # the ranking, no heads yet
    def heads_of(members):  # computed in context: its first token's old position is > 0
      return self.context_heads if plan.old_positions[members[0]] > 0 else self.segment_heads

    forced = segment_heads(plan, heads_of, selection.n_select)
    return dataclasses.replace(selection, forced=forced)
