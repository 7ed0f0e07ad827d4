"""sparsex_jax/research/deep_attention.py's parts against independent references (random
inputs)."""

import jax.numpy as jnp
import numpy as np

from models import llama
from sparsex_jax.research import deep_attention as sda


def test_attention_probs_reproduce_the_models_attention_output():
  rng = np.random.default_rng(0)
  t, n, k, h = 23, 6, 2, 8
  q = jnp.asarray(rng.normal(size=(1, t, n, h)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(1, t, k, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, t, k, h)), jnp.float32)
  p = np.asarray(sda.attention_probs(q, kk, 0.3))  # [N, T, T]
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.triu(p, 1) == 0)  # causal
  out = np.einsum("NTS,SNH->TNH", p, np.repeat(np.asarray(v[0]), n // k, axis=1))
  ref = llama.dense_attention(q, kk, v, jnp.arange(t)[None], jnp.array([t]), 0.3)[0]
  np.testing.assert_allclose(out, np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_rank_metrics():
  rng = np.random.default_rng(1)
  a = rng.normal(size=200)
  assert abs(sda._spearman(a, np.exp(a)) - 1.0) < 1e-12  # monotone: rank correlation 1
  assert abs(sda._spearman(a, -a) + 1.0) < 1e-12
  assert sda._top_share(a, a) == 1.0 and sda._top_share(a, -a) == 0.0
