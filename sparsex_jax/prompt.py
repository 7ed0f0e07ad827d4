"""A tokenized request: what the KV store looks up and the planner labels.

Each segment is tokenized on its own, so a passage has the same token ids wherever it appears
(what makes a segment-cache hit possible); the prompt is checked once, as a whole.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from models.config import ModelConfig
from sparsex_jax.api import Request, Segment


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A tokenized request: each segment's token ids and whether it may be cached."""

  segments: tuple[np.ndarray, ...]
  cacheable: tuple[bool, ...]
  namespace: str = ""  # the segment-cache namespace its segments are looked up and stored in

  @functools.cached_property
  def token_ids(self) -> np.ndarray:
    return np.concatenate(self.segments).astype(np.int32)

  @property
  def spans(self) -> list[tuple[int, int, np.ndarray, bool]]:
    """(start, end, token ids, cacheable) of every segment, in prompt order."""
    out, start = [], 0
    for ids, cacheable in zip(self.segments, self.cacheable):
      out.append((start, start + ids.size, ids, cacheable))
      start += ids.size
    return out


def check_prompt(cfg: ModelConfig, token_ids, max_new_tokens: int = 0) -> np.ndarray:
  """Validates a prompt's token ids; returns them as int32. Clear errors for bad input."""
  ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
  if ids.size == 0:
    raise ValueError("empty prompt: at least one token is needed")
  bad = ids[(ids < 0) | (ids >= cfg.vocab_size)]
  if bad.size:
    raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size})")
  if ids.size + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f"prompt of {ids.size} tokens + {max_new_tokens} new tokens exceeds the model's context "
        f"of {cfg.max_seq_len} tokens")
  return ids.astype(np.int32)


def segment_ids(segment: Segment, tokenizer) -> np.ndarray:
  """A segment's token ids (int64, unchecked): its own, or its text tokenized."""
  if not isinstance(segment.content, str):
    if segment.token_array is not None:
      return segment.token_array
    return np.asarray(segment.content, np.int64)
  if tokenizer is None:
    raise ValueError("this engine has no tokenizer (random weights): give segments as token ids")
  ids = tokenizer.encode(segment.content)
  if not ids:
    raise ValueError(f"segment {segment.content[:40]!r} tokenizes to no tokens")
  return np.asarray(ids, np.int64)


def tokenize(request: Request, tokenizer, cfg: ModelConfig, max_new_tokens: int,
             namespace: str = "") -> Prompt:
  """A request's Prompt; vocabulary and context are checked once, on the whole prompt.
  namespace: the engine's, for a request that names none."""
  if not isinstance(request, Request):
    raise TypeError(f"expected a Request, got {type(request).__name__}")
  segments = [segment_ids(s, tokenizer) for s in request.segments]
  check_prompt(cfg, np.concatenate(segments), max_new_tokens)
  return Prompt(tuple(s.astype(np.int32) for s in segments),
                tuple(s.cache for s in request.segments),
                request.namespace if request.namespace is not None else namespace)
