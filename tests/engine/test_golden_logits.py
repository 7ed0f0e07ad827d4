"""Pins the first-token logits and selections of every reuse policy to stored values.

The values in tests/engine/data/golden_logits.npz were computed by the engine as it stood before
the first architecture refactor (commit aaf8099; the default rule's at 062ae45, before the
second); refactors must not move them. Rejected options were deleted with their values (tag
research-round9). The tiny scenario's values were recorded again in round 22, when q/k/v and
gate/up became one matrix each: that changed how init_params draws the tiny model's random
weights, and docs/results/round22/probes/check_fused_golden.py showed the fused model on the
previous weights reproducing the previous values (every policy, this test's tolerance). The
real model's values are unchanged. Two scenarios, each run on a fresh engine per policy so that no policy sees
another's cache entries:

- tiny: the random tiny model, passages cached alone, a system prompt cached as an exact prefix,
  then a request interleaving reused passages with new text (full logits stored);
- real: SmolLM2-135M on three essay passages cached alone plus a new question (logits stored at
  the full prefill's top 32 ids and 96 fixed random ids, and each row's log-sum-exp).

Regenerate (only when a change is meant to move them): python -m tests.engine.test_golden_logits
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import sparsex_jax as sx

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_logits.npz")

POLICIES = {
    "full": sx.Full(),
    "prefix": sx.Prefix(),
    "naive": sx.Naive(),
    "cacheblend": sx.CacheBlend(recompute_ratio=0.3),
    "epic": sx.Epic(recompute_ratio=0.3),
    "random": sx.Random(recompute_ratio=0.3, seed=7),
    # the paper's rule (stored under "sparsex*" since before the methods had their own classes)
    "sparsex": sx.SparseXAttention(recompute_ratio=0.3),
    "sparsex_t1": sx.SparseXAttention(recompute_ratio=0.3, layer_threshold=1),
    "sparsex_t0": sx.SparseXAttention(recompute_ratio=0.3, layer_threshold=0),
    # The default rule (attention x |deviation|, segment heads, refresh), added at commit 062ae45
    # before the second architecture pass: at T = 2 it reads layers T - 1 and T, at T <= 1 the
    # last full layer alone (the tiny model has 3 layers, so its own default T = 4 is full).
    "default_t2": sx.SparseX(recompute_ratio=0.3, layer_threshold=2),
    "default_t1": sx.SparseX(recompute_ratio=0.3, layer_threshold=1),
    "default_t0": sx.SparseX(recompute_ratio=0.3, layer_threshold=0),
    "default": sx.SparseX(),
}
# Kept only for the real model (30 layers): the tiny model's default T is its depth.
TINY_POLICIES = [name for name in POLICIES if name != "default"]


def _tiny_case():
  from tests.engine.test_sparsex import DOC_A, DOC_B, DOC_C, SYSTEM, _request
  from tests.engine.test_engine import _engine, _ids

  def run(reuse):
    eng = _engine()
    eng.cache_segments([DOC_A, DOC_B, DOC_C])
    eng.prefill_logits(sx.Request([sx.Segment(SYSTEM, cache=False), sx.Segment(_ids(3, 1))]),
                       reuse=sx.ReuseConfig("prefix"))
    return eng.prefill_logits(_request(), reuse=reuse, return_plan=True)

  return run


def _real_case(loaded):
  from tests.engine.test_real_model import _essay_passages
  passages = [p + "\n\n" for p in _essay_passages(3, words=50)]
  system = "You are a careful reader. Read the passages and answer briefly.\n\n"
  question = "Question: which passage talks about startups? Answer:"

  def run(reuse):
    eng = sx.Engine(loaded.config, loaded.params, loaded.tokenizer, page_size=16, num_pages=96)
    eng.cache_segments(passages)
    req = sx.Request([sx.Segment(system)] + [sx.Segment(p) for p in passages[::-1]]
                     + [sx.Segment(question, cache=False)])
    return eng.prefill_logits(req, reuse=reuse, return_plan=True)

  return run


def _record(run, policies, index=None) -> dict[str, np.ndarray]:
  out = {}
  for name in policies:
    logits, plan = run(POLICIES[name])
    out[f"{name}/lse"] = np.logaddexp.reduce(logits.astype(np.float64))[None]
    out[f"{name}/logits"] = logits if index is None else logits[index]
    out[f"{name}/selected"] = plan.selected_positions.astype(np.int32)
    out[f"{name}/labels"] = plan.labels.astype(np.int8)
  return out


REAL_POLICIES = ["full", "prefix", "naive", "cacheblend", "epic", "random", "sparsex",
                 "sparsex_t0", "default", "default_t1"]


def _real_index(full_logits):
  top = np.argsort(full_logits)[::-1][:32]
  rand = np.random.default_rng(0).choice(full_logits.size, 96, replace=False)
  return np.concatenate([top, rand]).astype(np.int64)


def float32_tolerance(ref: np.ndarray, cfg) -> float:
  """How far float32 logits of `cfg` may move between CPUs and XLA builds with the same math.

  The values were recorded on one CPU; another CPU (or XLA build) sums the same float32 terms in
  another order and with other fused instructions. Each rounding moves a dot product of length
  d_model by about eps * sqrt(d_model) of its magnitude (random-walk accumulation), and each of
  the n_layers residual updates carries that relative error forward, so a logit of magnitude
  max|ref| may move by eps32 * sqrt(d_model) * n_layers * max|ref|. (A fixed 2e-5 failed on a
  fresh 2-core machine: 4.7e-5 on the real model, whose logits reach 20.) A behaviour change
  moves logits by 1e-2 or more, far above this.
  """
  eps = float(np.finfo(np.float32).eps)
  return eps * np.sqrt(cfg.d_model) * cfg.n_layers * float(np.max(np.abs(ref)))


def _compare(got: dict, want, prefix: str, cfg):
  for key, value in got.items():
    ref = want[f"{prefix}/{key}"]
    if key.endswith("/logits") or key.endswith("/lse"):
      np.testing.assert_allclose(value, ref, rtol=0, atol=float32_tolerance(ref, cfg),
                                 err_msg=key)
    else:
      np.testing.assert_array_equal(value, ref, err_msg=key)


def _tiny_config():
  from models.config import get_config
  return get_config("tiny")


@pytest.fixture(scope="module")
def golden():
  return np.load(GOLDEN)


def test_tiny_model_policies_match_golden(golden):
  _compare(_record(_tiny_case(), TINY_POLICIES), golden, "tiny", _tiny_config())


def test_dense_full_layers_match_golden(golden, monkeypatch):
  """The full layers as one causal attention over contiguous K/V (cuDNN's path on the GPU; XLA's
  softmax here) give every policy's stored logits and selections, exact prefix included."""
  from sparsex_jax import planner
  monkeypatch.setattr(planner, "full_attention_kind", lambda cfg, backend: "dense")
  # The policies with full layers after an exact prefix or before scoring (T = 0 has none; the
  # cache_segments prefills inside each run cover full layers without an exact prefix).
  names = ["prefix", "cacheblend", "sparsex_t1", "default_t2", "default_t1"]
  _compare(_record(_tiny_case(), names), golden, "tiny", _tiny_config())


@pytest.mark.slow
def test_real_model_policies_match_golden(golden, real_model):
  index = golden["real/index"]
  _compare(_record(_real_case(real_model), REAL_POLICIES, index), golden, "real",
           real_model.config)


def _write():
  from models.loaders import load_model
  data = {f"tiny/{k}": v for k, v in _record(_tiny_case(), TINY_POLICIES).items()}
  run = _real_case(load_model("smollm2-135m"))
  index = _real_index(run(POLICIES["full"])[0])
  data |= {f"real/{k}": v for k, v in _record(run, REAL_POLICIES, index).items()}
  data["real/index"] = index
  os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
  np.savez_compressed(GOLDEN, **data)
  print(f"wrote {GOLDEN}: {len(data)} arrays")


if __name__ == "__main__":
  _write()
