"""The contiguous-cache prefill/decode path against the no-cache full forward."""

import jax
import numpy as np
import pytest

from models import llama
from models.config import get_config
from sparsex_jax import dense
from sparsex_jax.sampling import SamplingParams, sample


@pytest.fixture(scope="module")
def tiny():
  cfg = get_config("tiny")
  return cfg, llama.init_params(cfg, seed=7)


def test_prefill_then_decode_matches_full_forward(tiny):
  cfg, params = tiny
  rng = np.random.default_rng(0)
  ids = rng.integers(0, cfg.vocab_size, size=21)
  new, _ = dense.generate(params, cfg, ids, SamplingParams(max_new_tokens=6, ignore_eos=True))
  assert len(new) == 6
  full = np.concatenate([ids, new])
  ref = np.asarray(llama.forward(params, cfg, full[None]))[0]
  # greedy: every generated token is the argmax of the full forward at the previous position
  np.testing.assert_array_equal(ref[len(ids) - 1:-1].argmax(-1), new)

  cache = dense.init_cache(cfg, 1, 64)
  pos = np.arange(len(full), dtype=np.int32)[None]
  logits, _ = dense.dense_step(params, cfg, cache, full[None].astype(np.int32), pos,
                               np.array([len(full)], np.int32),
                               np.array([len(full) - 1], np.int32))
  np.testing.assert_allclose(np.asarray(logits[0]), ref[-1], rtol=1e-4, atol=1e-4)


def test_bad_prompts(tiny):
  cfg, _ = tiny
  with pytest.raises(ValueError, match="empty prompt"):
    dense.check_prompt(cfg, [])
  with pytest.raises(ValueError, match="outside the vocabulary"):
    dense.check_prompt(cfg, [1, cfg.vocab_size])
  with pytest.raises(ValueError, match="exceeds the model's context"):
    dense.check_prompt(cfg, np.ones(cfg.max_seq_len - 3, int), max_new_tokens=4)


def test_sampling_greedy_top_p_and_seed():
  logits = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
  key = jax.random.split(jax.random.PRNGKey(0), 3)
  greedy = sample(logits, np.zeros(3, np.float32), np.ones(3, np.float32), key)
  np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1))
  # a tiny top_p keeps only the most likely token, whatever the temperature
  nucleus = sample(logits, np.full(3, 5.0, np.float32), np.full(3, 1e-6, np.float32), key)
  np.testing.assert_array_equal(np.asarray(nucleus), logits.argmax(-1))
  a = sample(logits, np.ones(3, np.float32), np.ones(3, np.float32), key)
  b = sample(logits, np.ones(3, np.float32), np.ones(3, np.float32), key)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
