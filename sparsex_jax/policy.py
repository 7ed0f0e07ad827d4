"""Reuse policies: what a prefill reads from the caches, how it ranks the reused tokens, and how
many of them it recomputes.

`ReuseConfig` is what a user writes (a mode name and its knobs, validated on construction);
`ReuseConfig.resolve(model_config)` turns it into a frozen `ReusePolicy` for one model. Mode names
are interpreted here and nowhere else: the planner, the KV store and the prefill program only read
the policy's fields.

A policy ranks reused tokens with a `Scorer`. Scorers that need the model's activations name a
branch of the prefill program (`device_score`: "attention", "deviation"); scorers that need only
the plan (EPIC's segment heads, random choice) compute their scores on the host, before the
prefill, and hand them over as "given" scores. Adding a selection rule means one new scorer here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from sparsex_jax.validation import is_int, is_real

if TYPE_CHECKING:
  from models.config import ModelConfig

REUSE_MODES = ("full", "prefix", "naive", "cacheblend", "epic", "random", "sparsex")
IMPORTANCE_LAYERS = ("auto", "last", "sum", "threshold", "last_and_threshold")
HEAD_REDUCE = ("sum", "max")
IMPORTANCE_SIGNALS = ("attention", "attention_x_deviation", "attention_x_deviation_norm",
                      "attention_x_deviation_per_head")
# Chosen by measurement (docs/quality.md): on MuSiQue with SmolLM2-135M, T = 4 at r = 0.15 halves
# the first-token KL of T = 2 (0.060 vs 0.115 nats) for ~15 ms more TTFT at 8K tokens on an H100,
# and beats T = 2 at r = 0.30 on both.
DEFAULT_LAYER_THRESHOLD = 4
# The default selection rule, chosen on the dev split of `sparsex eval` and reported on its test
# split (docs/quality.md): rank by attention x the norm of the K/V deviation (to first order, the
# error a reused token causes in the new tokens' outputs, not only how much it is read) and always
# recompute the first 2 tokens of every reused segment (a segment cached alone starts as a
# sequence does: its first tokens carry attention-sink K/V). The paper's rule is
# importance_signal="attention", segment_heads=0, importance_layers="last".
DEFAULT_IMPORTANCE_SIGNAL = "attention_x_deviation_norm"
DEFAULT_SEGMENT_HEADS = 2
# Measuring the deviation computes every reused token's exact K/V at layer T; keeping them (not
# only the selected tokens') recovered +1.4 points of the gap on the dev split and +0.8
# [+0.3, +1.3] on the test split (docs/quality.md, round 3). The extra write of one layer's K/V
# costs nothing measurable on an H100 since the layer loops stopped copying weights (docs/ttft.md,
# round 4: 64.0 vs 63.5 ms of device time at 8K, 393.6 vs 392.1 ms at 32K), so it is on.
DEFAULT_REFRESH_THRESHOLD_KV = True
# Read the Sparse-Q attention at the last full layer T - 1 and at layer T (over the fresh K/V the
# deviation computes anyway), summed, where T >= 2; at T <= 1 read layer T - 1 alone. The sum was
# chosen on the dev split at T = 4 (+4.1 points [+1.9, +9.9] at r = 0.15) and at T = 2 (+7.4 over
# r = 0.10 and 0.15), and is +1.8 [+0.2, +3.3] on the test split at the default, at the previous
# rule's device time (59.3 against 59.4 ms at 8K on an H100; docs/quality.md, rounds 8 and 9).
# At T = 1 it is worse (-4.7 on the test split, -2.7 on dev); our reading: layers 0 and 1 attend
# mostly by position, and layer 1's attention alone is worse still (round 7). At T = 8 the two readings tie
# on dev (-1.2 [-3.9, +4.9]); one rule for every T >= 2 is the simpler choice.
DEFAULT_IMPORTANCE_LAYERS = "auto"


def importance_layers_at(importance_layers: str, layer_threshold: int,
                         refresh_threshold_kv: bool) -> str:
  """The concrete reading of `importance_layers` at threshold T: "auto" is "last_and_threshold"
  at T >= 2 where layer T's fresh K/V are kept (the reading needs them), "last" otherwise."""
  if importance_layers != "auto":
    return importance_layers
  return "last_and_threshold" if layer_threshold >= 2 and refresh_threshold_kv else "last"


_READS_LAYER_T = ("threshold", "last_and_threshold")
# Labels of a prompt token (RequestPlan.labels): where its K/V comes from.
from sparsex_jax.labels import EXACT, NEW, REUSED  # noqa: E402,F401  (re-exported)


def n_to_select(ratio: float, n_reused: int, n_candidates: int) -> int:
  """k = ceil(r * n_reused), capped by the reused tokens not already in the Sparse-Q set."""
  return min(n_candidates, ceil_fraction(ratio, n_reused))


def ceil_fraction(ratio: float, n: int) -> int:
  """ceil(ratio * n), where 0.15 * 100 is 15 (not 16, as 15.000000000000002 would round up)."""
  return int(math.ceil(round(ratio * n, 9)))


# ------------------------------------------------------------------------------------------------
# Scorers
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scorer:
  """Ranks the reused tokens of a plan. The base class selects nothing."""

  device_score: ClassVar[str] = "none"  # the prefill program's scoring branch

  def host_scores(self, plan, ratio: float) -> np.ndarray | None:
    """Scores [n] computed before the prefill (device_score "given"), else None."""
    return None

  def n_select(self, plan, ratio: float) -> int:
    return 0

  def forced(self, plan, ratio: float) -> np.ndarray | None:
    """Tokens [n] (bool) selected whatever their score, within the budget; None: none."""
    return None

  def segment_budget(self, plan, ratio: float) -> np.ndarray | None:
    """Per token [n] (int32), the budget of its segment when selection is per segment."""
    return None


def reused_segments(plan):
  """(members, candidate members) of every reused segment, in prompt order."""
  reused = plan.labels == REUSED
  candidates = reused & ~plan.sparse_q
  for seg in np.unique(plan.segment_ids[reused]):
    members = np.flatnonzero(reused & (plan.segment_ids == seg))
    yield members, members[candidates[members]]


@dataclasses.dataclass(frozen=True)
class TopK(Scorer):
  """Base of the scorers that recompute the top ceil(r * n_reused) reused tokens."""

  def n_select(self, plan, ratio: float) -> int:
    return n_to_select(ratio, plan.n_reused, plan.n_candidates)


@dataclasses.dataclass(frozen=True)
class SparseQAttention(TopK):
  """SparseX: attention probability the Sparse-Q rows pay each key, at the last full layer
  ("last"), summed over the full layers ("sum"), at layer T itself over its fresh K/V
  ("threshold") or the last full layer's plus layer T's ("last_and_threshold"), summed or maxed
  over heads (layer 0 probed when T = 0).

  Options (ablated in docs/quality.md):
  deviation_weighted: multiply a token's attention by its K/V deviation at layer T (how far the
    reused K/V is from fresh): the error a token causes, not only how much it is read.
  deviation_norm: weigh by the deviation's norm instead of its square. To first order, a reused
    token j moves a query's output by a_j * |dv_j| (its value) plus a_j * |q.dk_j| * |v_j - o| / sqrt(d)
    (its key shifting the softmax): linear in the deviation, where the square over-weights a few
    far-off tokens against many that are read more.
  per_segment: every reused segment recomputes ceil(r * its reused tokens), ranked inside it,
    instead of one top-k over the prompt.
  segment_heads: the first `segment_heads` tokens of every reused segment are always selected (a
    segment cached alone starts as a sequence does, with attention-sink K/V), within the budget.
  segment_head_share: more forced head tokens: the first ceil(share * r * its length) of every
    reused segment (EPIC's positional rule for that share of the budget; at least segment_heads),
    the rest of the budget ranked by the score.
  deviation_per_head: pair attention and deviation per kv head: sum over kv heads k of (the
    attention its query heads pay the token) x |deviation of the token's K/V in head k|. A query
    head reads only its own kv head, so its first-order error from token j is its own a_hj times
    that head's deviation; the product of two sums over heads also credits a token read by one
    head for a deviation in another.
  refresh_threshold_kv: the deviation's fresh K/V of every token at layer T (exact, since the
    layers below ran in full, and computed anyway to measure the deviation) replace the reused
    K/V at layer T for the unselected tokens too: one more K/V write of one layer.
  """

  device_score: ClassVar[str] = "attention"
  importance_layers: str = "last"
  head_reduce: str = "sum"
  deviation_weighted: bool = False
  per_segment: bool = False
  segment_heads: int = 0
  segment_head_share: float = 0.0
  deviation_norm: bool = False
  deviation_per_head: bool = False
  refresh_threshold_kv: bool = False

  def n_select(self, plan, ratio: float) -> int:
    if not self.per_segment:
      return super().n_select(plan, ratio)
    return sum(min(ceil_fraction(ratio, m.size), c.size) for m, c in reused_segments(plan))

  def forced(self, plan, ratio: float) -> np.ndarray | None:
    if not self.segment_heads and not self.segment_head_share:
      return None
    out = np.zeros(plan.n, bool)
    for members, _ in reused_segments(plan):
      n_head = max(self.segment_heads,
                   ceil_fraction(self.segment_head_share * ratio, members.size))
      out[members[:n_head]] = True
    return out & ~plan.sparse_q

  def segment_budget(self, plan, ratio: float) -> np.ndarray | None:
    if not self.per_segment:
      return None
    out = np.zeros(plan.n, np.int32)
    for members, _ in reused_segments(plan):
      out[members] = ceil_fraction(ratio, members.size)
    return out


@dataclasses.dataclass(frozen=True)
class KVDeviation(TopK):
  """CacheBlend: squared distance of fresh K/V at layer T from the reused (re-rotated) K/V."""

  device_score: ClassVar[str] = "deviation"


@dataclasses.dataclass(frozen=True)
class RandomChoice(TopK):
  """Uniformly random reused tokens (seeded by the seed and the prompt): the control."""

  device_score: ClassVar[str] = "given"
  seed: int = 0

  def host_scores(self, plan, ratio: float) -> np.ndarray:
    rng = np.random.default_rng([self.seed, plan.n, int(plan.token_ids.sum()) & 0x7FFFFFFF])
    return rng.random(plan.n).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SegmentHeads(Scorer):
  """EPIC: the first ceil(r * len) tokens of every reused segment."""

  device_score: ClassVar[str] = "given"

  def _heads(self, plan, ratio: float) -> np.ndarray:
    candidates = (plan.labels == REUSED) & ~plan.sparse_q
    chosen = [m[:ceil_fraction(ratio, m.size)] for m, _ in reused_segments(plan)]
    chosen = [head[candidates[head]] for head in chosen]
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)

  def host_scores(self, plan, ratio: float) -> np.ndarray:
    scores = np.zeros(plan.n, np.float32)
    scores[self._heads(plan, ratio)] = 1.0
    return scores

  def n_select(self, plan, ratio: float) -> int:
    return int(self._heads(plan, ratio).size)


# ------------------------------------------------------------------------------------------------
# The resolved policy
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Selection:
  """One request's selection counts and host-side scores."""

  n_select: int = 0  # reused tokens recomputed in the sparse layers
  n_keep: int = 0  # of those, still recomputed after re-scoring
  given_score: np.ndarray | None = None  # [n] float32, for device_score "given"
  forced: np.ndarray | None = None  # [n] bool, selected first
  segment_budget: np.ndarray | None = None  # [n] int32, per-segment selection


@dataclasses.dataclass(frozen=True)
class ReusePolicy:
  """A ReuseConfig resolved for one model: everything the planner and the prefill need."""

  mode: str
  layer_threshold: int  # T: layers [0, T) run every non-exact token
  recompute_ratio: float  # r (0 for naive)
  scorer: Scorer
  prefix_cache: bool  # the mode uses the exact prefix cache
  segment_cache: bool  # the mode reuses segments
  read_caches: bool  # look the prompt up in the caches it uses
  update_caches: bool  # store prefix blocks and in-context segments after the prefill
  rescore_layer: int | None = None  # R: re-select at layer R (sparsex), None: never
  rescore_ratio: float = 0.0  # fraction of the reused tokens kept active from layer R

  @property
  def reads_prefix_cache(self) -> bool:
    return self.prefix_cache and self.read_caches

  @property
  def reads_segment_cache(self) -> bool:
    return self.segment_cache and self.read_caches

  @property
  def writes_prefix_cache(self) -> bool:
    return self.prefix_cache and self.update_caches

  @property
  def writes_segment_cache(self) -> bool:
    return self.segment_cache and self.update_caches

  def select(self, plan) -> Selection:
    """Selection counts (and host scores) for a labelled plan."""
    ratio = self.recompute_ratio
    n_select = self.scorer.n_select(plan, ratio)
    n_keep = 0
    if self.rescore_layer is not None:
      n_keep = n_to_select(self.rescore_ratio, plan.n_reused, n_select)
    return Selection(n_select=n_select, n_keep=n_keep,
                     given_score=self.scorer.host_scores(plan, ratio),
                     forced=self.scorer.forced(plan, ratio),
                     segment_budget=self.scorer.segment_budget(plan, ratio))


# ------------------------------------------------------------------------------------------------
# What users write
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReuseConfig:
  """How a prefill reuses cached KV.

  mode: full (no cache), prefix (exact prefix cache only), naive (re-rotated segment KV, no
    recompute), cacheblend, epic, random, sparsex.
  recompute_ratio: r, the fraction of reused tokens recomputed in the sparse layers.
  layer_threshold: T, layers [0, T) are computed for every non-exact token. None picks the mode's
    default: sparsex and random 4 (capped at the model's depth), cacheblend `check_layer`, epic 0,
    naive 0.
  importance_layers: where sparsex reads the Sparse-Q attention. "auto" (default): layers T - 1
    and T summed at T >= 2, layer T - 1 alone at T <= 1 (see importance_layers_at; the better
    measured at each T). "last_and_threshold" sums the last full layer T - 1's and layer T's,
    the latter over layer T's fresh K/V of every token (exact, since the layers below ran in
    full; they are kept, so it needs refresh_threshold_kv=True); "last" reads layer T - 1 alone
    (the default until round 8); "threshold" layer T alone (measured worse, round 7); "sum"
    sums the full layers [0, T). head_reduce: "sum" (default) or "max" over heads. The defaults
    were the better measured options (docs/quality.md).
  check_layer: cacheblend's layer whose K/V deviation ranks the tokens (full layers below it).
  seed: for mode="random" (an int in [0, 2**32)).
  rescore_layer, rescore_ratio: re-score the selection at a later layer (sparsex only). At layer
    R = rescore_layer the selected tokens are ranked again by the Sparse-Q attention of layer R-1
    and only the top ceil(rescore_ratio * n_reused) stay active in layers [R, L); the others keep
    the K/V computed so far. Selection can only shrink: a token not computed in layers [T, R) has
    no hidden state to continue from (CacheBlend's gradual filtering has the same shape).
    rescore_ratio defaults to recompute_ratio / 2.
  update_caches: False reads the caches but stores nothing after the prefill (no prefix blocks, no
    in-context segments): evaluations and sweeps that must not change the cache between configs.
  read_caches: False ignores every cache entry (the prompt is computed as if nothing were
    cached). With update_caches=False too, the prefill neither reads nor writes the caches.
  importance_signal, per_segment_budget, segment_heads, segment_head_share, refresh_threshold_kv:
    sparsex selection options (see SparseQAttention; "attention_x_deviation_per_head" is the norm
    paired per kv head, and sums the attention within each kv head, so it needs
    head_reduce="sum").
    Defaults (measured best, docs/quality.md): "attention_x_deviation_norm" (at T = 0 attention
    alone), segment_heads=2, refresh_threshold_kv=True. The paper's rule:
    importance_signal="attention", segment_heads=0, importance_layers="last" (no deviation is
    measured then, so nothing is refreshed).
  """

  mode: str = "sparsex"
  recompute_ratio: float = 0.15
  layer_threshold: int | None = None
  importance_layers: str = DEFAULT_IMPORTANCE_LAYERS
  head_reduce: str = "sum"
  check_layer: int = 1
  seed: int = 0
  rescore_layer: int | None = None
  rescore_ratio: float | None = None
  update_caches: bool = True
  read_caches: bool = True
  importance_signal: str = DEFAULT_IMPORTANCE_SIGNAL
  per_segment_budget: bool = False
  segment_heads: int = DEFAULT_SEGMENT_HEADS
  refresh_threshold_kv: bool = DEFAULT_REFRESH_THRESHOLD_KV
  segment_head_share: float = 0.0

  def __post_init__(self):
    if self.mode not in REUSE_MODES:
      raise ValueError(f"unknown reuse mode {self.mode!r}; choose one of {REUSE_MODES}")
    if not is_real(self.recompute_ratio) or not 0.0 <= self.recompute_ratio <= 1.0:
      raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio!r}")
    if self.layer_threshold is not None and (not is_int(self.layer_threshold)
                                             or self.layer_threshold < 0):
      raise ValueError(f"layer_threshold must be an int >= 0, got {self.layer_threshold!r}")
    if self.importance_layers not in IMPORTANCE_LAYERS:
      raise ValueError(f"importance_layers must be one of {IMPORTANCE_LAYERS}, "
                       f"got {self.importance_layers!r}")
    if self.head_reduce not in HEAD_REDUCE:
      raise ValueError(f"head_reduce must be one of {HEAD_REDUCE}, got {self.head_reduce!r}")
    if not is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
    for name in ("update_caches", "read_caches"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if self.rescore_layer is not None:
      if self.mode != "sparsex":
        raise ValueError(f"rescore_layer is a sparsex option, not for mode {self.mode!r}")
      if not is_int(self.rescore_layer):
        raise ValueError(f"rescore_layer must be an int, got {self.rescore_layer!r}")
      if self.rescore_ratio is not None and (not is_real(self.rescore_ratio) or
                                             not 0.0 <= self.rescore_ratio <= self.recompute_ratio):
        raise ValueError(f"rescore_ratio must be in [0, recompute_ratio={self.recompute_ratio}], "
                         f"got {self.rescore_ratio}")
    elif self.rescore_ratio is not None:
      raise ValueError("rescore_ratio needs rescore_layer")
    if self.importance_signal not in IMPORTANCE_SIGNALS:
      raise ValueError(f"importance_signal must be one of {IMPORTANCE_SIGNALS}, "
                       f"got {self.importance_signal!r}")
    if not isinstance(self.per_segment_budget, bool):
      raise ValueError(f"per_segment_budget must be True or False, got {self.per_segment_budget!r}")
    if not is_int(self.segment_heads) or self.segment_heads < 0:
      raise ValueError(f"segment_heads must be an int >= 0, got {self.segment_heads!r}")
    if not is_real(self.segment_head_share) or not 0.0 <= self.segment_head_share <= 1.0:
      raise ValueError(f"segment_head_share must be in [0, 1], got {self.segment_head_share!r}")
    if not isinstance(self.refresh_threshold_kv, bool):
      raise ValueError(f"refresh_threshold_kv must be True or False, "
                       f"got {self.refresh_threshold_kv!r}")
    if (self.mode == "sparsex" and self.importance_layers in _READS_LAYER_T
        and not self.refresh_threshold_kv):
      raise ValueError(f"importance_layers={self.importance_layers!r} reads layer T's attention "
                       "over the fresh K/V of every token and keeps them: it needs "
                       "refresh_threshold_kv=True; without the refresh use "
                       "importance_layers='last'")
    if self.importance_signal == "attention_x_deviation_per_head" and self.head_reduce != "sum":
      raise ValueError(f"importance_signal='attention_x_deviation_per_head' sums the attention "
                       f"within each kv head; head_reduce must be 'sum', got {self.head_reduce!r}")
    if self.mode != "sparsex" and (
        self.importance_signal != DEFAULT_IMPORTANCE_SIGNAL or self.per_segment_budget
        or self.segment_heads != DEFAULT_SEGMENT_HEADS or self.segment_head_share
        or self.refresh_threshold_kv != DEFAULT_REFRESH_THRESHOLD_KV):
      raise ValueError(f"importance_signal, per_segment_budget, segment_heads, "
                       f"segment_head_share and refresh_threshold_kv are sparsex options, not "
                       f"for mode {self.mode!r}")
    if not is_int(self.check_layer) or self.check_layer < 1:
      raise ValueError(f"check_layer must be >= 1 (layer 0 is always full), got {self.check_layer}")

  def resolve(self, model_config: "ModelConfig") -> ReusePolicy:
    """The policy for a model (validates T and R against its depth)."""
    n_layers = model_config.n_layers
    mode = self.mode
    if mode in ("full", "prefix"):
      t = n_layers
    elif self.layer_threshold is not None:
      t = self.layer_threshold
    else:  # the mode's default, capped for models shallower than it
      t = min(n_layers, {"sparsex": DEFAULT_LAYER_THRESHOLD, "random": DEFAULT_LAYER_THRESHOLD,
                         "cacheblend": self.check_layer, "epic": 0, "naive": 0}[mode])
    if not 0 <= t <= n_layers:
      raise ValueError(f"layer_threshold must be in [0, {n_layers}] for this model, got {t}")
    if mode == "cacheblend" and t < 1:
      raise ValueError("cacheblend needs layer_threshold (its check layer) >= 1")
    rescore = None
    if self.rescore_layer is not None:
      if not t < self.rescore_layer < n_layers:
        raise ValueError(f"rescore_layer must be in ({t}, {n_layers}) (after the layer "
                         f"threshold, before the last layer), got {self.rescore_layer}")
      rescore = self.rescore_layer
    layers = importance_layers_at(self.importance_layers, t, self.refresh_threshold_kv)
    scorer = {
        "sparsex": lambda: SparseQAttention(
            layers, self.head_reduce,
            # At T = 0 every reused K/V equals its fresh value at layer 0 (it depends only on the
            # token and its position): no deviation to weigh by, so attention alone ranks.
            deviation_weighted=self.importance_signal != "attention" and t >= 1,
            per_segment=self.per_segment_budget, segment_heads=self.segment_heads,
            segment_head_share=float(self.segment_head_share),
            deviation_norm=self.importance_signal in ("attention_x_deviation_norm",
                                                      "attention_x_deviation_per_head") and t >= 1,
            deviation_per_head=self.importance_signal == "attention_x_deviation_per_head"
            and t >= 1,
            refresh_threshold_kv=self.refresh_threshold_kv and t >= 1 and (
                self.importance_signal != "attention" or layers in _READS_LAYER_T)),
        "cacheblend": KVDeviation,
        "epic": SegmentHeads,
        "random": lambda: RandomChoice(self.seed),
    }.get(mode, Scorer)()
    kept = self.rescore_ratio if self.rescore_ratio is not None else self.recompute_ratio / 2
    return ReusePolicy(
        mode=mode, layer_threshold=t,
        recompute_ratio=0.0 if mode == "naive" else float(self.recompute_ratio), scorer=scorer,
        prefix_cache=mode != "full", segment_cache=mode not in ("full", "prefix"),
        read_caches=self.read_caches, update_caches=self.update_caches, rescore_layer=rescore,
        rescore_ratio=float(kept) if rescore is not None else 0.0)
