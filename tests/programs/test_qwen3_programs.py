"""The engine's device programs (prefill of every kind, decode loop) on Qwen3 dense and Qwen3 MoE,
tiny random models, against the model's plain forward: the programs go through the same layer
functions, so q/k norms and the routed experts must come out the same on the paged path."""

import math

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from models import llama
from models.config import get_config
from tests.models.test_qwen3 import random_params

# 6 layers: the default rule's T = 4 leaves two sparse layers (it refreshes layer T's K/V for
# every token, so the last layer is the one where reused tokens keep their cached K/V).
CONFIGS = [get_config("qwen3-tiny").replace(n_layers=6),
           get_config("qwen3-moe-tiny").replace(n_layers=6)]


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["qwen3", "qwen3-moe"])
def test_engine_prefill_reuse_and_decode_match_the_plain_forward(cfg):
  params = random_params(cfg, seed=11, scale=0.25)  # sharp attention: reuse errors show
  forward = jax.jit(llama.forward, static_argnums=1)
  eng = sx.Engine(cfg, params, page_size=4, num_pages=160, max_batch_size=1)
  rng = np.random.default_rng(12)
  ids = lambda n: [int(i) for i in rng.integers(3, cfg.vocab_size, n)]  # noqa: E731
  system, doc, question, other = ids(9), ids(30), ids(7), ids(13)

  # Full prefill, then greedy decode (the device loop): every token is the forward's argmax.
  first = sx.Request([sx.Segment(system, cache=False), sx.Segment(doc),
                      sx.Segment(question, cache=False)])
  out = eng.generate([first], sx.SamplingParams(max_new_tokens=6, ignore_eos=True),
                     reuse=sx.SparseX())[0]  # doc misses the cache: a full prefill, doc cached
  seq = system + doc + question + out.token_ids
  ref = np.asarray(forward(params, cfg, np.asarray(seq)[None]))[0]
  n = len(system + doc + question)
  np.testing.assert_array_equal(ref[n - 1:-1].argmax(-1), out.token_ids)
  assert len(set(out.token_ids)) > 1  # not a degenerate model that repeats one token
  full = eng.prefill_logits(first, reuse=sx.Full())
  assert _rel(full, ref[n - 1]) < 1e-5

  # doc reused at another position (after `other`): every reused token recomputed from layer 1
  # gives the full prefill (the sparse layers run the active tokens alone through attention and
  # the experts); the default rule (T = 4, r = 0.15) recomputes ceil(0.15 n) of them in its
  # sparse layers, an approximation. (Re-rotation of normed keys: tests/models/test_qwen3.py;
  # the engine's assembly does not depend on the architecture.)
  moved = sx.Request([sx.Segment(other, cache=False), sx.Segment(doc),
                      sx.Segment(question, cache=False)])
  want = np.asarray(forward(params, cfg, np.asarray(other + doc + question)[None]))[0, -1]
  no_update = dict(update_caches=False)
  all_recomputed, plan = eng.prefill_logits(
      moved, reuse=sx.SparseX(layer_threshold=1, recompute_ratio=1.0, **no_update),
      return_plan=True)
  assert plan.reused_positions.size == len(doc) and plan.selected_positions.size == len(doc)
  assert _rel(all_recomputed, want) < 1e-5
  default, plan = eng.prefill_logits(moved, reuse=sx.SparseX(**no_update), return_plan=True)
  assert plan.layer_threshold == 4 and plan.reused_positions.size == len(doc)
  assert plan.selected_positions.size == math.ceil(0.15 * len(doc))
  assert np.all(np.isfinite(default)) and 1e-4 < _rel(default, want) < 0.5
