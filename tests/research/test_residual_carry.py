"""sparsex_jax/research/residual_carry.py's machinery on random weights at SmolLM2's shapes (4
layers: one above T = 2, every variant still differs there; one short needle prompt, seconds): the new rows over exact K/V give full prefill's logits,
and stale K/V above the last layer change nothing."""

import sparsex_jax as sx
from models import llama
from models.config import get_config
from sparsex_jax.research import residual_carry
from sparsex_jax.research import workloads as wl


def test_rows_over_exact_kv_reproduce_full_prefill(real_tokenizer):
  cfg = get_config("smollm2-135m", dtype="float32").replace(n_layers=4)
  engine = sx.Engine(cfg, llama.init_params(cfg, 1), real_tokenizer, num_pages=64)
  prompt = wl.build(real_tokenizer, ["needle"], "dev", 1, wl.Sizes.quick())["needle"][0]
  r = residual_carry.study(engine, prompt, threshold=2)
  kl = r["kl"]
  assert kl["full"] < 1e-6 < kl["naive"]
  assert kl["stale"] != kl["naive"]  # layers <= T exact: something changed
  assert len(r["deviation_removed_by_layer"]["linear"]) == cfg.n_layers - 3
  top = residual_carry.study(engine, prompt, threshold=cfg.n_layers - 1)
  assert top["kl"]["stale"] < 1e-6 and top["kl"]["carry exact norm"] < 1e-6
