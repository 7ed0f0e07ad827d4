"""sparsex_jax/research/oracle.py on one short chat prompt with the real model (about 30 s on 2
cores): the default rule rebuilt from the pools must give the default rule's KL, and every
ranking must recompute the default rule's budget."""

import json
import os

import numpy as np

from sparsex_jax.research import diagnosis, oracle


def test_oracle_rebuilds_the_default_rule_from_the_pools(tmp_path):
  out = str(tmp_path / "oracle")
  # One probe layer beside the rule's: each probes a prefill program of its own (a compile of the
  # real model), and the default five (test_probe_layers_and_the_rules_attention) add no path.
  # r = 0.40: the quick chat turns are short, and at 0.15 the default's forced heads (8 at the
  # head of every turn computed in context) would take the whole budget, leaving nothing ranked.
  assert oracle.main(["--quick", "--prompts", "1", "--workloads", "chat", "--probe-layers", "10",
                      "--ratio", "0.4", "--out", out]) == 0
  data = json.load(open(out + ".json"))
  # the default rule reads layers T - 1 and T; the asked one is read beside them
  assert data["meta"]["complete"] and data["meta"]["probe_layers"] == [3, 4, 10]
  (prompt,) = data["prompts"]
  res = prompt["results"]
  runtime = res["sparsex r=0.40 T=4"]
  rebuilt = res["oracle attn x dev@T r=0.40 T=4"]
  # On this one short prompt the default rule is not asserted against naive reuse (both KLs are
  # small); the paper's rule and the deep-deviation oracle beat it.
  assert res["naive"]["kl"] > 0 and runtime["kl"] > 0
  assert res["sparsex-attention r=0.40 T=4"]["kl"] < res["naive"]["kl"]
  assert res["oracle dev>=T r=0.40 T=4"]["kl"] < 0.5 * res["naive"]["kl"]
  # Same tokens recomputed, same program: the same logits up to float32 summation order.
  assert abs(rebuilt["kl"] - runtime["kl"]) <= 1e-3 * res["naive"]["kl"]
  for label, r in res.items():
    if label.startswith("oracle") or label.startswith("sparsex"):
      assert r["n_recomputed"] == runtime["n_recomputed"] > 0, label
  # Other rankings pick other tokens: some KL differs from the runtime rule's.
  others = [r["kl"] for label, r in res.items() if label.startswith("oracle dev")]
  assert max(abs(k - runtime["kl"]) for k in others) > 1e-3 * res["naive"]["kl"]
  features = np.load(out + "_features.npz")
  key = prompt["key"]
  dev = features[f"{key}/deviation"]
  assert dev.shape == (30, runtime["n_reused"]) and np.all(np.isfinite(dev))
  assert features[f"{key}/attention"].shape == (3, runtime["n_reused"])
  # Layer 0 of a segment computed in context and moved: re-rotation makes K exact there, and
  # V never depends on position, so the deviation grows from ~0 at layer 0.
  assert float(dev[0].astype(np.float64).mean()) < 0.05 * float(dev[-1].astype(np.float64).mean())
  assert os.path.getsize(out + ".md") > 0
  # the token-class features, and the diagnosis over them: each measure's shares sum to 1
  assert features[f"{key}/segment_length"].shape == (runtime["n_reused"],)
  assert not features[f"{key}/cached_alone"].any()  # chat turns were computed in context
  result = diagnosis.analyse(out, 4)
  (state,) = result  # one family, one cache state
  assert state == ("chat", "in context")
  for measure, shares in result[state].items():
    assert abs(sum(shares) - 1) < 1e-6 and min(shares) >= 0, measure


def test_probe_layers_and_the_rules_attention():
  assert oracle.probe_layers(30, 4) == [3, 4, 10, 16, 22, 28]
  assert oracle.probe_layers(30, 1, "7,3") == [0, 3, 7]  # at T = 1 the rule reads layer 0 only
  rng = np.random.default_rng(0)
  attention = {layer: rng.random(9) for layer in range(6)}
  np.testing.assert_array_equal(oracle.rule_attention(attention, 4), attention[3] + attention[4])
  np.testing.assert_array_equal(oracle.rule_attention(attention, 1), attention[0])
