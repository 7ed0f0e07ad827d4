"""What every reuse method shares: the cache flags, the resolved policy, and the selection counts.

A reuse method is a small frozen config (its own fields, validated on construction) that brings
two things beside it in its module:
  - `select(plan, layer_threshold)` on the host, before the prefill: how many reused tokens to
    recompute, and any scores or forced choices that need only the plan (EPIC, random, heads);
  - `device_scorer(layer_threshold)`: a static, hashable scorer that the prefill program calls
    after its full layers (sparsex_jax/programs/scoring.py has the pieces), or None where the
    host choice is all there is.
`resolve(model_config)` turns it into a `ReusePolicy` for one model (T checked against the depth):
what the KV store, the planner and the prefill read. Nothing outside sparsex_jax/reuse interprets
a method's name or fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from sparsex_jax.labels import REUSED
from sparsex_jax.validation import is_int, is_real

if TYPE_CHECKING:
  from models.config import ModelConfig

# Chosen by measurement (docs/quality.md): on MuSiQue with SmolLM2-135M, T = 4 at r = 0.15 halves
# the first-token KL of T = 2 (0.060 vs 0.115 nats) for ~15 ms more TTFT at 8K tokens on an H100.
DEFAULT_LAYER_THRESHOLD = 4
DEFAULT_RECOMPUTE_RATIO = 0.15


def ceil_fraction(ratio: float, n: int) -> int:
  """ceil(ratio * n), where 0.15 * 100 is 15 (not 16, as 15.000000000000002 would round up)."""
  return int(math.ceil(round(ratio * n, 9)))


def n_to_select(ratio: float, n_reused: int, n_candidates: int) -> int:
  """k = ceil(r * n_reused), capped by the reused tokens not already in the Sparse-Q set."""
  return min(n_candidates, ceil_fraction(ratio, n_reused))


def reused_segments(plan):
  """The token indices of every reused segment of a plan, in prompt order."""
  reused = plan.labels == REUSED
  for seg in np.unique(plan.segment_ids[reused]):
    yield np.flatnonzero(reused & (plan.segment_ids == seg))


def segment_heads(plan, heads_of: Callable[[np.ndarray], int], budget: int) -> np.ndarray:
  """[n] bool: the first heads_of(members) tokens of every reused segment (members: its token
  indices), Sparse-Q rows left out, to be selected before any scored token. When they do not all
  fit the budget, every segment keeps its first h tokens (at most its own count), h the largest
  that fits: the prefill's top-k breaks ties among forced tokens by position, so an overflowing
  set would be cut at the end, the earliest segments keeping every head and the latest, nearest
  the new tokens, none."""
  segments = [(members, heads_of(members)) for members in reused_segments(plan)]

  def first(h: int) -> np.ndarray:
    forced = np.zeros(plan.n, bool)
    for members, own in segments:
      forced[members[:min(own, h)]] = True
    return forced & ~plan.sparse_q

  h = max((own for _, own in segments), default=0)
  forced = first(h)
  while h > 0 and forced.sum() > budget:
    h -= 1
    forced = first(h)
  return forced


def check_ratio(value) -> None:
  if not is_real(value) or not 0.0 <= value <= 1.0:
    raise ValueError(f"recompute_ratio must be in [0, 1], got {value!r}")


def check_threshold(value, name: str = "layer_threshold") -> None:
  if value is not None and (not is_int(value) or value < 0):
    raise ValueError(f"{name} must be an int >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Selection:
  """One request's selection, decided on the host before its prefill."""

  n_select: int = 0  # reused tokens recomputed in the sparse layers
  given_score: np.ndarray | None = None  # [n] float32: the ranking itself (EPIC, random)
  forced: np.ndarray | None = None  # [n] bool: selected before any scored token
  # [n] bool: the queries whose attention scores (None: the Sparse-Q set, plan.sparse_q)
  score_rows: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ReuseMethod:
  """Base of every method: which caches it uses, and whether a call may read or change them.

  read_caches: False ignores every cache entry (the prompt is computed as if nothing were cached).
  update_caches: False stores nothing after the prefill (no prefix blocks, no in-context
    segments): evaluations and sweeps that must not change the cache between configs.
  """

  mode: ClassVar[str]
  prefix_cache: ClassVar[bool] = True  # reads and writes the exact prefix cache
  segment_cache: ClassVar[bool] = True  # reuses segments
  read_caches: bool = dataclasses.field(default=True, kw_only=True)
  update_caches: bool = dataclasses.field(default=True, kw_only=True)

  def __post_init__(self):
    for name in ("read_caches", "update_caches"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

  # --- what a subclass defines -------------------------------------------------------------
  def layer_threshold_for(self, n_layers: int) -> int:
    """T for a model of n_layers: layers [0, T) compute every non-exact token."""
    return n_layers

  def select(self, plan, layer_threshold: int) -> Selection:
    return Selection()

  def device_scorer(self, layer_threshold: int):
    """The prefill's scorer (a frozen, hashable callable; programs/scoring.py), or None."""
    return None

  @property
  def ratio(self) -> float:
    """r: the fraction of reused tokens recomputed (0 where the method recomputes none)."""
    return float(getattr(self, "recompute_ratio", 0.0))

  # --- shared -------------------------------------------------------------------------------
  def as_record(self) -> dict[str, Any]:
    """The method's name and fields, for result files and reports."""
    return {"mode": self.mode} | {f.name: getattr(self, f.name)
                                  for f in dataclasses.fields(self)}

  def resolve(self, model_config: "ModelConfig") -> "ReusePolicy":
    """The policy for a model (checks T against its depth)."""
    n_layers = model_config.n_layers
    t = self.layer_threshold_for(n_layers)
    if not 0 <= t <= n_layers:
      raise ValueError(f"layer_threshold must be in [0, {n_layers}] for this model, got {t}")
    return ReusePolicy(method=self, layer_threshold=t, recompute_ratio=self.ratio,
                       scorer=self.device_scorer(t) if t < n_layers else None)


@dataclasses.dataclass(frozen=True)
class ReusePolicy:
  """A method resolved for one model: everything the KV store, planner and prefill read."""

  method: ReuseMethod
  layer_threshold: int  # T
  recompute_ratio: float  # r
  scorer: Any  # the prefill's static device scorer, or None

  @property
  def mode(self) -> str:
    return self.method.mode

  @property
  def reads_prefix_cache(self) -> bool:
    return self.method.prefix_cache and self.method.read_caches

  @property
  def reads_segment_cache(self) -> bool:
    return self.method.segment_cache and self.method.read_caches

  @property
  def writes_prefix_cache(self) -> bool:
    return self.method.prefix_cache and self.method.update_caches

  @property
  def writes_segment_cache(self) -> bool:
    return self.method.segment_cache and self.method.update_caches

  def select(self, plan) -> Selection:
    """The host selection of a labelled plan."""
    return self.method.select(plan, self.layer_threshold)
