"""The public request/response types: Segment, Request, RequestOutput, RequestStats, PrefillPlan.

ReuseConfig (how a prefill reuses cached KV) lives with the policies it resolves to
(sparsex_jax/policy.py) and is re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sparsex_jax.policy import ReuseConfig  # noqa: F401  (re-exported)


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
