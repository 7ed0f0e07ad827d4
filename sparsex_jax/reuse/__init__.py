"""Reuse methods: how a prefill reuses cached KV, one small config and scorer per method.

    sx.SparseX(recompute_ratio=0.15, layer_threshold=4)     the default rule
    sx.SparseXPaper(...)                                     the paper's rule as published
    sx.SparseXAttention(...)                                 its attention-mass ranking alone
    sx.CacheBlend(...), sx.Epic(...), sx.Random(...), sx.Naive(), sx.Prefix(), sx.Full()

`ReuseConfig(mode, **fields)` builds one by name (the CLI's --reuse). Adding a method: a frozen
dataclass subclass of ReuseMethod with its own fields and checks, its host `select` and its
`device_scorer`, registered in METHODS (docs/DESIGN.md, "How to add a reuse method").
"""

from __future__ import annotations

import dataclasses

from sparsex_jax.reuse.base import (DEFAULT_LAYER_THRESHOLD, DEFAULT_RECOMPUTE_RATIO, ReuseMethod,
                                    ReusePolicy, Selection, ceil_fraction, n_to_select)
from sparsex_jax.reuse.baselines import CacheBlend, Epic, Full, Naive, Prefix, Random
from sparsex_jax.reuse.sparsex import (DEFAULT_CONTEXT_HEADS, DEFAULT_SEGMENT_HEADS, SparseX,
                                       SparseXAttention, SparseXPaper)

METHODS: dict[str, type[ReuseMethod]] = {
    m.mode: m for m in (Full, Prefix, Naive, CacheBlend, Epic, Random, SparseX, SparseXPaper,
                        SparseXAttention)}
REUSE_MODES = tuple(METHODS)


def ReuseConfig(mode: str = "sparsex", **fields) -> ReuseMethod:  # noqa: N802 (a constructor)
  """The method named `mode`, built from its own fields; a field the method does not take is an
  error naming the fields it does take."""
  if mode not in METHODS:
    raise ValueError(f"unknown reuse mode {mode!r}; choose one of {REUSE_MODES}")
  cls = METHODS[mode]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"reuse mode {mode!r} takes {sorted(known)}; got {unknown}")
  return cls(**fields)


__all__ = ["CacheBlend", "DEFAULT_CONTEXT_HEADS", "DEFAULT_LAYER_THRESHOLD",
           "DEFAULT_RECOMPUTE_RATIO", "DEFAULT_SEGMENT_HEADS", "Epic", "Full", "METHODS", "Naive",
           "Prefix", "REUSE_MODES", "Random", "ReuseConfig", "ReuseMethod", "ReusePolicy",
           "Selection", "SparseX", "SparseXAttention", "SparseXPaper", "ceil_fraction",
           "n_to_select"]
