"""The methods compared: labels and their reuse methods.

Labels follow scripts/bench_ttft.py's ("cacheblend r=0.15", "sparsex r=0.15 T=4"), so quality
joins TTFT by label. "sparsex" is the default rule (sx.SparseX), "sparsex-paper" the paper's rule
as published (sx.SparseXPaper: attention, overflow blocks, tail fallback), "sparsex-attention"
its attention-only ranking (sx.SparseXAttention). The layer threshold is spelled out for both rules and random (their default
moved once already); cacheblend and epic keep their fixed defaults (check layer 1, T = 0).
Every method reads the caches and stores nothing (update_caches=False): all methods of a prompt
see the same cache state.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Sequence

import sparsex_jax as sx
from sparsex_jax.reuse import METHODS

BASELINES = ("full", "prefix", "naive", "cacheblend", "epic", "random")
# Run over the r x T grid. A round's candidate rules join CANDIDATE_RULES (label -> method class)
# while they are measured, then move into sparsex_jax/reuse/ or are deleted (round 10's split
# rules: tag research-round10; round 12's head counts: tag research-round14-candidates, the
# context heads adopted into the default in round 15; docs/quality.md).
CANDIDATE_RULES: dict = {}
RULES = ("sparsex", "sparsex-paper", "sparsex-attention") + tuple(CANDIDATE_RULES)
_RULE_CLASSES = {**{family: METHODS[family] for family in RULES if family in METHODS},
                 **CANDIDATE_RULES}
FAMILIES = BASELINES + RULES
# What `sparsex eval` runs without --methods: each other rule adds a grid, so it is asked for by
# name.
DEFAULT_FAMILIES = BASELINES + ("sparsex",)
GRID_RATIOS = (0.05, 0.10, 0.15, 0.20, 0.30)
GRID_THRESHOLDS = (0, 1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Method:
  label: str
  family: str
  config: sx.ReuseMethod
  ratio: float | None = None
  threshold: int | None = None


def label(family: str, ratio: float | None = None, threshold: int | None = None) -> str:
  """The label of a method: "naive", "epic r=0.15", "sparsex-attention r=0.15 T=4"."""
  if family in ("full", "prefix", "naive"):
    return family
  if family in ("cacheblend", "epic"):
    return f"{family} r={ratio:.2f}"
  return f"{family} r={ratio:.2f} T={threshold}"


def default_label(ratio: float, threshold: int) -> str:
  """The label of the shipped default rule (sx.SparseX) at (r, T)."""
  return label("sparsex", ratio, threshold)


# Result files (eval JSON meta, bench_ttft JSON) carry "labels": LABELS. Before it, the rules were
# labelled by their options: "sparsex r=.. T=.." was the paper's attention-only rule, and the
# default rule was
# "sparsex[axn+heads2+fresh+attn2]" at T >= 2, "sparsex[axn+heads2+fresh]" at T <= 1 (rounds
# 8-9; the other bracketed rules were removed, tag research-round9).
LABELS = 2
_DEFAULT_BEFORE = {"sparsex[axn+heads2+fresh+attn2]": lambda t: t >= 2,
                   "sparsex[axn+heads2+fresh]": lambda t: t <= 1}


def current_label(old: str) -> str:
  """A label of a result file without "labels" in today's names (others unchanged)."""
  rule, sep, rest = old.partition(" r=")
  if not sep or " T=" not in rest:
    return old
  threshold = int(rest.split(" T=")[1])
  if rule == "sparsex":
    return "sparsex-attention" + sep + rest
  if rule in _DEFAULT_BEFORE and _DEFAULT_BEFORE[rule](threshold):
    return "sparsex" + sep + rest
  return old


def _threshold(config: sx.ReuseMethod, n_layers: int) -> int:
  # resolve() reads only the model's depth
  return config.resolve(types.SimpleNamespace(n_layers=n_layers)).layer_threshold


def rule_method(family: str, ratio: float, threshold: int) -> Method:
  """A SparseX rule at (r, T), storing nothing."""
  config = _RULE_CLASSES[family](recompute_ratio=ratio, layer_threshold=threshold,
                                 update_caches=False)
  return Method(label(family, ratio, threshold), family, config, ratio, threshold)


def config_of(text: str, **fields) -> sx.ReuseMethod:
  """The method a rule's label names ("sparsex-paper r=0.15 T=5"), with extra fields."""
  family, sep, rest = text.partition(" r=")
  ratio, sep2, threshold = rest.partition(" T=")
  if not sep or not sep2 or family not in RULES + ("random",):
    raise ValueError(f"{text!r} is not a rule's label (FAMILY r=R T=T, FAMILY one of "
                     f"{', '.join(RULES)}, random)")
  cls = sx.Random if family == "random" else _RULE_CLASSES[family]
  return cls(recompute_ratio=float(ratio), layer_threshold=int(threshold), **fields)


def default_method(n_layers: int, family: str = "sparsex") -> Method:
  """A rule at its shipped defaults (r = 0.15, T = 4 capped at the depth): for "sparsex", the
  default of sx.ReuseConfig()."""
  base = _RULE_CLASSES[family]()
  return rule_method(family, base.recompute_ratio, _threshold(base, n_layers))


def method_grid(families: Sequence[str], n_layers: int, ratios: Sequence[float] = GRID_RATIOS,
                thresholds: Sequence[int] = GRID_THRESHOLDS, baseline_ratio: float = 0.15
                ) -> list[Method]:
  """full first (the reference), then the asked baselines, then each asked rule at its default
  and over ratios x thresholds. Thresholds deeper than the model are dropped."""
  for f in families:
    if f not in FAMILIES:
      raise ValueError(f"unknown method {f!r}; choose from {', '.join(FAMILIES)}")
  for r in list(ratios) + [baseline_ratio]:
    if not 0.0 <= r <= 1.0:
      raise ValueError(f"recompute ratio must be in [0, 1], got {r}")
  for t in thresholds:
    if t < 0:
      raise ValueError(f"layer threshold must be >= 0, got {t}")
  out = [Method("full", "full", sx.Full(update_caches=False))]
  for f in families:
    if f in ("prefix", "naive"):
      out.append(Method(f, f, sx.ReuseConfig(f, update_caches=False), 0.0, None))
    elif f in ("cacheblend", "epic"):
      config = sx.ReuseConfig(f, recompute_ratio=baseline_ratio, update_caches=False)
      out.append(Method(label(f, baseline_ratio), f, config, baseline_ratio,
                        _threshold(config, n_layers)))
    elif f == "random":  # at the default rule's threshold: the chance level of selection
      t = _threshold(sx.Random(), n_layers)
      out.append(Method(label(f, baseline_ratio, t), f,
                        sx.Random(recompute_ratio=baseline_ratio, layer_threshold=t,
                                  update_caches=False), baseline_ratio, t))
  for f in RULES:
    if f not in families:
      continue
    grid = [default_method(n_layers, f)] + [rule_method(f, r, t) for t in thresholds
                                            if t <= n_layers for r in ratios]
    seen = set()
    for m in grid:  # the default is usually a grid point
      if m.label not in seen:
        seen.add(m.label)
        out.append(m)
  return out


def parse_floats(s: str, what: str) -> list[float]:
  try:
    return [float(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what}: expected comma-separated numbers, got {s!r}") from None


def parse_ints(s: str, what: str) -> list[int]:
  try:
    return [int(x) for x in s.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"{what}: expected comma-separated integers, got {s!r}") from None
