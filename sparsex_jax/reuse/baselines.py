"""The baselines, on the same code path as SparseX: full and prefix prefill, naive reuse,
CacheBlend, EPIC and random selection (the chance level of any ranking)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from sparsex_jax.labels import REUSED
from sparsex_jax.programs.scoring import ScoringInputs
from sparsex_jax.reuse.base import (DEFAULT_LAYER_THRESHOLD, DEFAULT_RECOMPUTE_RATIO, ReuseMethod,
                                    Selection, ceil_fraction, check_ratio, check_threshold,
                                    n_to_select, reused_segments)
from sparsex_jax.validation import is_int


@dataclasses.dataclass(frozen=True)
class Full(ReuseMethod):
  """Every prompt token computed, no cache read or written."""

  mode: ClassVar[str] = "full"
  prefix_cache: ClassVar[bool] = False
  segment_cache: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class Prefix(ReuseMethod):
  """The exact prefix cache only (vLLM's and SGLang's reuse): the rest computed in full."""

  mode: ClassVar[str] = "prefix"
  segment_cache: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class Naive(ReuseMethod):
  """Reused segments' K/V re-rotated to their new positions, nothing recomputed after the
  first `layer_threshold` layers (0: no layer)."""

  mode: ClassVar[str] = "naive"
  layer_threshold: int = 0

  def __post_init__(self):
    super().__post_init__()
    check_threshold(self.layer_threshold)

  def layer_threshold_for(self, n_layers: int) -> int:
    return self.layer_threshold


@dataclasses.dataclass(frozen=True)
class TopK(ReuseMethod):
  """Base of the methods that recompute ceil(r * n_reused) reused tokens."""

  recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO

  def __post_init__(self):
    super().__post_init__()
    check_ratio(self.recompute_ratio)

  def select(self, plan, layer_threshold: int) -> Selection:
    return Selection(n_select=n_to_select(self.recompute_ratio, plan.n_reused,
                                          plan.n_candidates))


@dataclasses.dataclass(frozen=True)
class DeviationScore:
  """CacheBlend's device scorer: the squared distance of every token's fresh K/V at layer T
  from its reused (re-rotated) K/V."""

  uses_probe: ClassVar[bool] = False

  def __call__(self, inputs: ScoringInputs, pool):
    return inputs.deviation(pool)


@dataclasses.dataclass(frozen=True)
class CacheBlend(TopK):
  """CacheBlend: full layers [0, T), then the tokens whose K/V deviate most at layer T
  (CacheBlend's "check layer") are recomputed."""

  mode: ClassVar[str] = "cacheblend"
  layer_threshold: int = 1  # T, the check layer

  def __post_init__(self):
    super().__post_init__()
    if not is_int(self.layer_threshold) or self.layer_threshold < 1:
      raise ValueError(f"layer_threshold (CacheBlend's check layer) must be an int >= 1 (layer 0 "
                       f"is always full), got {self.layer_threshold!r}")

  def layer_threshold_for(self, n_layers: int) -> int:
    return self.layer_threshold

  def device_scorer(self, layer_threshold: int):
    return DeviationScore()


@dataclasses.dataclass(frozen=True)
class Epic(ReuseMethod):
  """EPIC: the first ceil(r * len) tokens of every reused segment, no full layer."""

  mode: ClassVar[str] = "epic"
  recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO

  def __post_init__(self):
    super().__post_init__()
    check_ratio(self.recompute_ratio)

  def layer_threshold_for(self, n_layers: int) -> int:
    return 0

  def select(self, plan, layer_threshold: int) -> Selection:
    candidates = (plan.labels == REUSED) & ~plan.sparse_q
    heads = [m[:ceil_fraction(self.recompute_ratio, m.size)] for m in reused_segments(plan)]
    heads = [h[candidates[h]] for h in heads]
    chosen = np.concatenate(heads) if heads else np.zeros(0, np.int64)
    scores = np.zeros(plan.n, np.float32)
    scores[chosen] = 1.0
    return Selection(n_select=int(chosen.size), given_score=scores)


@dataclasses.dataclass(frozen=True)
class Random(TopK):
  """Uniformly random reused tokens (seeded by the seed and the prompt): the control."""

  mode: ClassVar[str] = "random"
  layer_threshold: int | None = None  # None: SparseX's default T (capped at the depth)
  seed: int = 0

  def __post_init__(self):
    super().__post_init__()
    check_threshold(self.layer_threshold)
    if not is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")

  def layer_threshold_for(self, n_layers: int) -> int:
    if self.layer_threshold is None:
      return min(n_layers, DEFAULT_LAYER_THRESHOLD)
    return self.layer_threshold

  def select(self, plan, layer_threshold: int) -> Selection:
    rng = np.random.default_rng([self.seed, plan.n, int(plan.token_ids.sum()) & 0x7FFFFFFF])
    return dataclasses.replace(super().select(plan, layer_threshold),
                               given_score=rng.random(plan.n).astype(np.float32))
