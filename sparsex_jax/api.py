"""The public request/response types: Segment, Request, ReuseConfig, RequestOutput."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

REUSE_MODES = ("full", "prefix", "naive", "cacheblend", "epic", "random", "sparsex")
IMPORTANCE_LAYERS = ("last", "sum")
HEAD_REDUCE = ("sum", "max")
# Chosen by measurement (docs/quality.md): on MuSiQue with SmolLM2-135M, T = 4 at r = 0.15 halves
# the first-token KL of T = 2 (0.060 vs 0.115 nats) for ~15 ms more TTFT at 8K tokens on an H100,
# and beats T = 2 at r = 0.30 on both.
DEFAULT_LAYER_THRESHOLD = 4


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of a prompt: text or token ids. cache=False: never looked up or stored (e.g. a
  question that will not recur)."""

  content: str | Sequence[int]
  cache: bool = True

  def __post_init__(self):
    if isinstance(self.content, str):
      if not self.content:
        raise ValueError("empty segment: a Segment needs non-empty text or token ids")
    else:
      ids = np.asarray(self.content)
      if ids.size == 0:
        raise ValueError("empty segment: a Segment needs non-empty text or token ids")
      if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"segment token ids must be a flat list of ints, got {ids.dtype} "
                         f"array of shape {ids.shape}")
      object.__setattr__(self, "content", tuple(int(i) for i in ids))


@dataclasses.dataclass(frozen=True)
class Request:
  """An ordered list of segments, concatenated into one prompt."""

  segments: Sequence[Segment]

  def __post_init__(self):
    segments = tuple(Segment(s) if isinstance(s, str) else s for s in self.segments)
    if not segments:
      raise ValueError("empty request: a Request needs at least one Segment")
    for s in segments:
      if not isinstance(s, Segment):
        raise TypeError(f"Request segments must be Segment or str, got {type(s).__name__}")
    object.__setattr__(self, "segments", segments)


@dataclasses.dataclass(frozen=True)
class ReuseConfig:
  """How a prefill reuses cached KV.

  mode: full (no cache), prefix (exact prefix cache only), naive (re-rotated segment KV, no
    recompute), cacheblend, epic, random, sparsex.
  recompute_ratio: r, the fraction of reused tokens recomputed in the sparse layers.
  layer_threshold: T, layers [0, T) are computed for every non-exact token. None picks the mode's
    default: sparsex and random 4 (capped at the model's depth), cacheblend `check_layer`, epic 0,
    naive 0.
  importance_layers: sparsex reads Sparse-Q attention at the "last" full layer (default) or
    "sum"s it over the full layers. head_reduce: "sum" (default) or "max" over heads. Both
    defaults were the better measured option (docs/quality.md).
  check_layer: cacheblend's layer whose K/V deviation ranks the tokens (full layers below it).
  seed: for mode="random".
  update_caches: False reads the caches but stores nothing after the prefill (no prefix blocks, no
    in-context segments): evaluations and sweeps that must not change the cache between configs.
  rescore_layer, rescore_ratio: re-score the selection at a later layer (sparsex only). At layer
    R = rescore_layer the selected tokens are ranked again by the Sparse-Q attention of layer R-1
    and only the top ceil(rescore_ratio * n_reused) stay active in layers [R, L); the others keep
    the K/V computed so far. Selection can only shrink: a token not computed in layers [T, R) has
    no hidden state to continue from (CacheBlend's gradual filtering has the same shape).
    rescore_ratio defaults to recompute_ratio / 2.
  """

  mode: str = "sparsex"
  recompute_ratio: float = 0.15
  layer_threshold: int | None = None
  importance_layers: str = "last"
  head_reduce: str = "sum"
  check_layer: int = 1
  seed: int = 0
  rescore_layer: int | None = None
  rescore_ratio: float | None = None
  update_caches: bool = True

  def __post_init__(self):
    if self.mode not in REUSE_MODES:
      raise ValueError(f"unknown reuse mode {self.mode!r}; choose one of {REUSE_MODES}")
    if not 0.0 <= self.recompute_ratio <= 1.0:
      raise ValueError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
    if self.layer_threshold is not None and self.layer_threshold < 0:
      raise ValueError(f"layer_threshold must be >= 0, got {self.layer_threshold}")
    if self.importance_layers not in IMPORTANCE_LAYERS:
      raise ValueError(f"importance_layers must be one of {IMPORTANCE_LAYERS}, "
                       f"got {self.importance_layers!r}")
    if self.head_reduce not in HEAD_REDUCE:
      raise ValueError(f"head_reduce must be one of {HEAD_REDUCE}, got {self.head_reduce!r}")
    if self.rescore_layer is not None:
      if self.mode != "sparsex":
        raise ValueError(f"rescore_layer is a sparsex option, not for mode {self.mode!r}")
      if self.rescore_ratio is not None and not 0.0 <= self.rescore_ratio <= self.recompute_ratio:
        raise ValueError(f"rescore_ratio must be in [0, recompute_ratio={self.recompute_ratio}], "
                         f"got {self.rescore_ratio}")
    elif self.rescore_ratio is not None:
      raise ValueError("rescore_ratio needs rescore_layer")
    if self.check_layer < 1:
      raise ValueError(f"check_layer must be >= 1 (layer 0 is always full), got {self.check_layer}")

  @property
  def reuses_segments(self) -> bool:
    return self.mode not in ("full", "prefix")

  @property
  def uses_prefix_cache(self) -> bool:
    return self.mode != "full"

  def threshold(self, n_layers: int) -> int:
    """The layer threshold T for a model of n_layers (validated against it)."""
    if self.mode in ("full", "prefix"):
      return n_layers
    if self.layer_threshold is not None:
      t = self.layer_threshold
    else:  # the mode's default, capped for models shallower than it
      t = min(n_layers, {"sparsex": DEFAULT_LAYER_THRESHOLD, "random": DEFAULT_LAYER_THRESHOLD,
                         "cacheblend": self.check_layer, "epic": 0, "naive": 0}[self.mode])
    if not 0 <= t <= n_layers:
      raise ValueError(f"layer_threshold must be in [0, {n_layers}] for this model, got {t}")
    if self.mode == "cacheblend" and t < 1:
      raise ValueError("cacheblend needs layer_threshold (its check layer) >= 1")
    return t

  def rescore(self, n_layers: int) -> int | None:
    """The re-scoring layer R, validated: T < R < n_layers; None when not re-scoring."""
    if self.rescore_layer is None:
      return None
    t = self.threshold(n_layers)
    if not t < self.rescore_layer < n_layers:
      raise ValueError(f"rescore_layer must be in ({t}, {n_layers}) (after the layer threshold, "
                       f"before the last layer), got {self.rescore_layer}")
    return self.rescore_layer

  def kept_ratio(self) -> float:
    """Fraction of the reused tokens still recomputed after re-scoring."""
    return self.rescore_ratio if self.rescore_ratio is not None else self.recompute_ratio / 2

  def ratio(self) -> float:
    return 0.0 if self.mode == "naive" else self.recompute_ratio


@dataclasses.dataclass
class RequestStats:
  ttft_s: float = 0.0
  n_prompt: int = 0
  n_exact: int = 0  # prefix-cache hits: referenced, never recomputed or copied
  n_reused: int = 0  # tokens whose KV came from the segment cache
  n_new: int = 0  # computed from scratch at every layer
  n_recomputed: int = 0  # reused tokens selected for recomputation in the sparse layers
  n_generated: int = 0
  compilations: int = 0  # programs compiled by the engine so far (bounded by shape buckets)


@dataclasses.dataclass
class RequestOutput:
  text: str
  token_ids: list[int]
  stats: RequestStats
  finish_reason: str = "length"  # "stop" or "length"


@dataclasses.dataclass
class PrefillPlan:
  """What a SparseX-family prefill did to one request (engine.prefill_logits(return_plan=True))."""

  labels: np.ndarray  # [n_prompt] int8: 0 exact, 1 reused, 2 new
  sparse_q: np.ndarray  # [n_prompt] bool: the Sparse-Q set (new tokens and the last token)
  reused_positions: np.ndarray  # positions of the reused tokens
  scores: np.ndarray  # selection score of each reused token (importance, deviation, ...)
  selected_positions: np.ndarray  # reused positions recomputed in the sparse layers
  kept_positions: np.ndarray | None = None  # of those, recomputed after re-scoring (if enabled)
  layer_threshold: int = 0
