"""Round 22: the fused projections (wqkv, w_gate_up) compute what the split ones did.

tests/engine/test_golden_logits.py pins the tiny scenario's logits, selections and labels to
values recorded before the first refactor. The fused layout changes how init_params draws the
tiny model's random weights, so its values had to be recorded again. This check is why that is
safe: the tiny model's weights as the split layout drew them (saved from the previous commit,
`OLD.npz`: {keystr path: array}), fused as the loaders fuse a checkpoint, give the stored golden
values within the test's own tolerance, every policy.

    python check_fused_golden.py OLD.npz      (from the repository root, PYTHONPATH=.)
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np


def fused(old: dict, cfg) -> dict:
  g = cfg.n_heads // cfg.n_kv_heads
  get = lambda name: old[f"['layers']['{name.split('/')[0]}']['{name.split('/')[1]}']"]
  lead = get("attn_in/wq").shape[:2]  # [L, D]
  wqkv = np.concatenate([get("attn_in/wq").reshape(*lead, cfg.n_kv_heads, g, cfg.head_dim),
                         get("attn_in/wk")[:, :, :, None], get("attn_in/wv")[:, :, :, None]], 3)
  gate_up = np.stack([get("attn_out_mlp/w_gate"), get("attn_out_mlp/w_up")], axis=2)
  return {
      "embed": jnp.asarray(old["['embed']"]), "final_norm": jnp.asarray(old["['final_norm']"]),
      "layers": {
          "attn_in": {"norm": jnp.asarray(get("attn_in/norm")), "wqkv": jnp.asarray(wqkv)},
          "attn_out_mlp": {"norm": jnp.asarray(get("attn_out_mlp/norm")),
                           "wo": jnp.asarray(get("attn_out_mlp/wo")),
                           "w_gate_up": jnp.asarray(gate_up),
                           "w_down": jnp.asarray(get("attn_out_mlp/w_down"))}},
      **({"lm_head": jnp.asarray(old["['lm_head']"])} if "['lm_head']" in old else {})}


def main(argv=None) -> int:
  from tests.engine import test_engine, test_golden_logits as golden
  old = dict(np.load((argv or sys.argv[1:])[0]))
  params = fused(old, test_engine.CFG)
  assert jax.tree.structure(params) == jax.tree.structure(test_engine.PARAMS)
  test_engine.PARAMS = params
  got = golden._record(golden._tiny_case(), golden.TINY_POLICIES)
  golden._compare(got, np.load(golden.GOLDEN), "tiny", test_engine.CFG)
  print(f"fused layout on the split layout's weights: {len(golden.TINY_POLICIES)} policies match "
        f"the stored golden values")
  return 0


if __name__ == "__main__":
  sys.exit(main())
