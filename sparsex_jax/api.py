"""The public request/response types: Segment, Request, RequestOutput, RequestStats, PrefillPlan.

How a prefill reuses cached KV (the reuse methods, ReuseConfig) lives in sparsex_jax/reuse.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from sparsex_jax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Segment:
  """A piece of a prompt: text or token ids. cache=False: never looked up or stored (e.g. a
  question that will not recur)."""

  content: str | Sequence[int]
  cache: bool = True
  # The ids once more as a read-only int64 array (not compared or hashed): converting an
  # 8K-token tuple of Python ints back to an array took ~2 ms of every prefill's host time.
  token_array: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False,
                                                     compare=False)

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
      ids = ids.astype(np.int64)
      ids.flags.writeable = False
      object.__setattr__(self, "content", tuple(ids.tolist()))
      object.__setattr__(self, "token_array", ids)


@dataclasses.dataclass(frozen=True)
class Request:
  """An ordered list of segments, concatenated into one prompt.

  segments: Segments (a str item is a text Segment); a lone str or Segment is one segment.
  id: optional, named in errors and outputs (the batch runner's line id).
  sampling: optional per-request SamplingParams, overriding the ones passed to generate().
  namespace: the segment-cache namespace (None: the engine's): segments cached under one
    namespace are never reused, nor seen, by requests of another (docs/SECURITY.md).
  """

  segments: Sequence[Segment] | Segment | str
  id: str | int | None = None
  sampling: "SamplingParams | None" = None
  namespace: str | None = None

  def __post_init__(self):
    raw = self.segments
    if isinstance(raw, (str, Segment)):
      raw = [raw]
    if not isinstance(raw, (list, tuple)):
      raise TypeError(f"Request takes a list of Segments, got {type(raw).__name__}")
    segments = tuple(Segment(s) if isinstance(s, str) else s for s in raw)
    if not segments:
      raise ValueError("empty request: a Request needs at least one Segment")
    for s in segments:
      if not isinstance(s, Segment):
        hint = (": wrap token ids in a Segment, Request([Segment([1, 2, 3])])"
                if isinstance(s, (int, np.integer)) else "")
        raise TypeError(f"Request segments must be Segment or str, got {type(s).__name__}{hint}")
    if self.sampling is not None and not isinstance(self.sampling, SamplingParams):
      raise TypeError(f"Request.sampling must be SamplingParams, got "
                      f"{type(self.sampling).__name__}")
    if self.namespace is not None and not isinstance(self.namespace, str):
      raise TypeError(f"Request.namespace must be a str, got {type(self.namespace).__name__}")
    object.__setattr__(self, "segments", segments)


@dataclasses.dataclass
class RequestStats:
  ttft_s: float = 0.0  # the request's prefill batch: its start to the first token
  first_token_s: float = 0.0  # the generate() call's start to this request's first token
  n_prompt: int = 0
  n_exact: int = 0  # prefix-cache hits: referenced, never recomputed or copied
  n_continued: int = 0  # of those, an earlier prompt's K/V as its reuse computed it (a chat's
                        # history): the continuation cache
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
  finish_reason: str = "length"  # "stop", "length", or "error" (then `error` says why)
  request_id: str | int | None = None
  error: str | None = None
  # Where each prompt token's KV came from (labels: 0 exact, 1 reused, 2 new) and which reused
  # tokens were recomputed; None for a request that failed.
  prefill: "PrefillPlan | None" = None

  @classmethod
  def failed(cls, request_id, error: str) -> "RequestOutput":
    return cls(text="", token_ids=[], stats=RequestStats(), finish_reason="error",
               request_id=request_id, error=error)


class RequestError(ValueError):
  """A request that cannot run, naming it by index and id. `outputs`: what the job produced up to
  the failure (None where a request did not run), so that nothing finished is lost."""

  def __init__(self, index: int, request_id, cause: BaseException | str,
               outputs: "list[RequestOutput | None] | None" = None):
    self.index, self.request_id, self.outputs = index, request_id, outputs
    self.cause = cause
    where = f"request {index}" + (f" (id {request_id!r})" if request_id is not None else "")
    super().__init__(f"{where}: {cause}")


@dataclasses.dataclass
class PrefillPlan:
  """What a SparseX-family prefill did to one request (engine.prefill_logits(return_plan=True))."""

  labels: np.ndarray  # [n_prompt] int8: 0 exact, 1 reused, 2 new
  sparse_q: np.ndarray  # [n_prompt] bool: the Sparse-Q set (new tokens and the last token)
  reused_positions: np.ndarray  # positions of the reused tokens
  scores: np.ndarray  # selection score of each reused token (importance, deviation, ...)
  selected_positions: np.ndarray  # reused positions recomputed in the sparse layers
  layer_threshold: int = 0
