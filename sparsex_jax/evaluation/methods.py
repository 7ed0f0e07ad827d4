"""The methods compared: labels and their sx.ReuseConfig.

Labels follow scripts/bench_ttft.py's ("cacheblend r=0.15", "sparsex r=0.15 T=4"), so quality
joins TTFT by label. The layer threshold is spelled out for sparsex and random (their default
moved once already); cacheblend and epic keep their fixed mode defaults (check layer 1, T = 0).
Every config reads the caches and stores nothing (update_caches=False): all methods of a prompt
see the same cache state.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Sequence

import sparsex_jax as sx
from sparsex_jax.policy import importance_layers_at

BASELINES = ("full", "prefix", "naive", "cacheblend", "epic", "random")
FAMILIES = BASELINES + ("sparsex",)
GRID_RATIOS = (0.05, 0.10, 0.15, 0.20, 0.30)
GRID_THRESHOLDS = (0, 1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Method:
  label: str
  family: str
  config: sx.ReuseConfig
  ratio: float | None = None
  threshold: int | None = None


def _label(family: str, ratio: float | None, threshold: int | None) -> str:
  if family in ("full", "prefix", "naive"):
    return family
  if family in ("cacheblend", "epic"):
    return f"{family} r={ratio:.2f}"
  return f"{family} r={ratio:.2f} T={threshold}"


# Options of the sparsex policy, ablated on the dev split (docs/quality.md), each spelled out in
# full so that a label means the same rule whatever the defaults. The empty variant is the
# paper's rule (Sparse-Q attention mass, one top-k over the prompt); "axn+heads2+fresh+auto" is
# the default (since round 9: "axn+heads2+fresh+attn2" at T >= 2, "axn+heads2+fresh" at T <= 1).
_PAPER = {"importance_signal": "attention", "per_segment_budget": False, "segment_heads": 0,
          "refresh_threshold_kv": False, "segment_head_share": 0.0, "importance_layers": "last"}
_AXD = {"importance_signal": "attention_x_deviation"}
_AXN = {"importance_signal": "attention_x_deviation_norm"}
_AXH = {"importance_signal": "attention_x_deviation_per_head"}
_FRESH = {"refresh_threshold_kv": True}
VARIANTS = {
    "": _PAPER,
    "axd": _PAPER | _AXD,
    "heads2": _PAPER | {"segment_heads": 2},
    "perseg": _PAPER | {"per_segment_budget": True},
    "axd+heads2": _PAPER | _AXD | {"segment_heads": 2},
    "axn": _PAPER | _AXN,
    "axn+heads2": _PAPER | _AXN | {"segment_heads": 2},
    "axn+heads2+fresh": _PAPER | _AXN | {"segment_heads": 2} | _FRESH,
    # EPIC's positional rule for a share of the budget, the ranking for the rest
    "axn+heads2+fresh+share25": _PAPER | _AXN | {"segment_heads": 2, "segment_head_share": 0.25}
    | _FRESH,
    "axn+heads2+fresh+share50": _PAPER | _AXN | {"segment_heads": 2, "segment_head_share": 0.5}
    | _FRESH,
    # the Sparse-Q attention read at layer T over its fresh K/V, not at the last full layer
    "axn+heads2+fresh+attnT": _PAPER | _AXN | {"segment_heads": 2, "importance_layers": "threshold"}
    | _FRESH,
    "attnT": _PAPER | {"importance_layers": "threshold"} | _FRESH,
    # ... the attention of layers T - 1 and T summed
    "axn+heads2+fresh+attn2": _PAPER | _AXN | {"segment_heads": 2,
                                               "importance_layers": "last_and_threshold"} | _FRESH,
    # the default: attn2 at T >= 2, the last full layer alone at T <= 1 (importance_layers="auto");
    # its cells are labelled by the rule they run (cell_variant), so they join the runs above
    "axn+heads2+fresh+auto": _PAPER | _AXN | {"segment_heads": 2, "importance_layers": "auto"}
    | _FRESH,
    "axh+heads2": _PAPER | _AXH | {"segment_heads": 2},
    "axh+heads2+fresh": _PAPER | _AXH | {"segment_heads": 2} | _FRESH,
    "axd+perseg": _PAPER | _AXD | {"per_segment_budget": True},
    "axd+perseg+heads2": _PAPER | _AXD | {"per_segment_budget": True, "segment_heads": 2},
}


def _variant_of(config: sx.ReuseConfig) -> str:
  """The VARIANTS name of a sparsex config's selection options."""
  options = {f: getattr(config, f) for f in _PAPER}
  for name, opts in VARIANTS.items():
    if opts == options:
      return name
  return "+".join(f"{k}={v}" for k, v in options.items())


DEFAULT_VARIANT = _variant_of(sx.ReuseConfig())  # "axn+heads2+fresh+auto"


def cell_variant(variant: str, threshold: int) -> str:
  """The variant a cell at threshold T runs: "auto" readings resolved to the concrete one, so a
  label always names one rule (and the default's cells join explicit runs of that rule)."""
  opts = VARIANTS[variant]
  if opts.get("importance_layers") != "auto":
    return variant
  layers = importance_layers_at("auto", threshold, opts["refresh_threshold_kv"])
  return _variant_of(sx.ReuseConfig(**(opts | {"importance_layers": layers})))


def sparsex_label(variant: str, ratio: float, threshold: int) -> str:
  """The label of a sparsex rule at (r, T), as `sparsex eval` and bench_ttft write it."""
  v = cell_variant(variant, threshold)
  return _label(f"sparsex[{v}]" if v else "sparsex", ratio, threshold)


def default_label(ratio: float, threshold: int) -> str:
  """The label of the shipped default rule (sx.ReuseConfig()'s options) at (r, T)."""
  return sparsex_label(DEFAULT_VARIANT, ratio, threshold)


def _resolved(config: sx.ReuseConfig, n_layers: int):
  # resolve() reads only the model's depth
  return config.resolve(types.SimpleNamespace(n_layers=n_layers))


def default_method(n_layers: int) -> Method:
  """The sparsex default: sx.ReuseConfig("sparsex") as shipped, resolved for this depth."""
  base = sx.ReuseConfig("sparsex")
  t = _resolved(base, n_layers).layer_threshold
  r = base.recompute_ratio
  return Method(default_label(r, t), "sparsex",
                dataclasses.replace(base, layer_threshold=t, update_caches=False), r, t)


def method_grid(families: Sequence[str], n_layers: int, ratios: Sequence[float] = GRID_RATIOS,
                thresholds: Sequence[int] = GRID_THRESHOLDS, baseline_ratio: float = 0.15,
                variants: Sequence[str] = (DEFAULT_VARIANT,)) -> list[Method]:
  """full first (the reference), then the asked baselines, then sparsex over ratios x
  thresholds, plus the sparsex default whenever sparsex is asked for. Thresholds deeper than
  the model are dropped."""
  for f in families:
    if f not in FAMILIES:
      raise ValueError(f"unknown method {f!r}; choose from {', '.join(FAMILIES)}")
  for r in list(ratios) + [baseline_ratio]:
    if not 0.0 <= r <= 1.0:
      raise ValueError(f"recompute ratio must be in [0, 1], got {r}")
  for t in thresholds:
    if t < 0:
      raise ValueError(f"layer threshold must be >= 0, got {t}")
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f"unknown sparsex variant {v!r}; choose from "
                       f"{', '.join(repr(k) for k in VARIANTS)}")
  out = [Method("full", "full", sx.ReuseConfig("full", update_caches=False))]
  for f in families:
    if f in ("full", "sparsex"):
      continue
    if f in ("prefix", "naive"):
      out.append(Method(f, f, sx.ReuseConfig(f, update_caches=False), 0.0, None))
    elif f in ("cacheblend", "epic"):
      cfg = sx.ReuseConfig(f, recompute_ratio=baseline_ratio, update_caches=False)
      out.append(Method(_label(f, baseline_ratio, None), f, cfg, baseline_ratio,
                        _resolved(cfg, n_layers).layer_threshold))
    else:  # random selection at the sparsex default threshold: the chance level of selection
      t = _resolved(sx.ReuseConfig("random"), n_layers).layer_threshold
      out.append(Method(_label(f, baseline_ratio, t), f,
                        sx.ReuseConfig("random", recompute_ratio=baseline_ratio,
                                       layer_threshold=t, update_caches=False),
                        baseline_ratio, t))
  if "sparsex" in families:
    default = default_method(n_layers)
    grid = [default]
    for t in thresholds:
      if t > n_layers:
        continue
      for r in ratios:
        for v in variants:
          v = cell_variant(v, t)
          opts = VARIANTS[v]
          grid.append(Method(sparsex_label(v, r, t), "sparsex",
                             sx.ReuseConfig("sparsex", recompute_ratio=r, layer_threshold=t,
                                            update_caches=False, **opts), r, t))
    seen = set()
    for m in grid:
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
