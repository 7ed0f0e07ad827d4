"""scripts/study_residual_carry.py's machinery on random weights at SmolLM2's shapes (6 layers,
one short needle prompt, seconds): the new rows over exact K/V give full prefill's logits, and
stale K/V above the last layer change nothing."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import study_residual_carry  # noqa: E402

import sparsex_jax as sx  # noqa: E402
from models import llama  # noqa: E402
from models.config import get_config  # noqa: E402
from sparsex_jax.evaluation import workloads as wl  # noqa: E402


def test_rows_over_exact_kv_reproduce_full_prefill(real_tokenizer):
  cfg = get_config("smollm2-135m", dtype="float32").replace(n_layers=6)
  engine = sx.Engine(cfg, llama.init_params(cfg, 1), real_tokenizer, num_pages=64)
  prompt = wl.build(real_tokenizer, ["needle"], "dev", 1, wl.Sizes.quick())["needle"][0]
  r = study_residual_carry.study(engine, prompt, threshold=2)
  kl = r["kl"]
  assert kl["full"] < 1e-6 < kl["naive"]
  assert kl["stale"] != kl["naive"]  # layers <= T exact: something changed
  assert len(r["deviation_removed_by_layer"]["linear"]) == cfg.n_layers - 3
  top = study_residual_carry.study(engine, prompt, threshold=cfg.n_layers - 1)
  assert top["kl"]["stale"] < 1e-6 and top["kl"]["carry exact norm"] < 1e-6
