"""Qwen3 and Qwen3 MoE checkpoints: a Hugging Face folder (one safetensors file, or shards with
model.safetensors.index.json) and a GGUF file, written here from the same random weights with the
real tensor names, load to the same params; a missing or misnamed tensor is an error naming it."""

from __future__ import annotations

import json
import os

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from models import loaders
from models.config import get_config
from tests import projections

# n_heads * head_dim = 64 != d_model = 48; untied head (the tied case drops lm_head).
DENSE = get_config("qwen3-tiny").replace(n_layers=2, tie_embeddings=False)
MOE = get_config("qwen3-moe-tiny").replace(n_layers=2)


def hf_weights(cfg, seed) -> dict[str, np.ndarray]:
  """Random weights under their Hugging Face names, [out, in] as nn.Linear stores them."""
  rng = np.random.default_rng(seed)
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

  def rnd(*shape):
    return rng.normal(0, 0.1, shape).astype(np.float32)

  w = {"model.embed_tokens.weight": rnd(cfg.vocab_size, d), "model.norm.weight": 1 + rnd(d)}
  if not cfg.tie_embeddings:
    w["lm_head.weight"] = rnd(cfg.vocab_size, d)
  for i in range(cfg.n_layers):
    p = f"model.layers.{i}."
    w.update({p + "input_layernorm.weight": 1 + rnd(d),
              p + "self_attn.q_proj.weight": rnd(n * h, d),
              p + "self_attn.k_proj.weight": rnd(k * h, d),
              p + "self_attn.v_proj.weight": rnd(k * h, d),
              p + "self_attn.o_proj.weight": rnd(d, n * h),
              p + "self_attn.q_norm.weight": 1 + rnd(h),
              p + "self_attn.k_norm.weight": 1 + rnd(h),
              p + "post_attention_layernorm.weight": 1 + rnd(d)})
    if cfg.is_moe:
      w[p + "mlp.gate.weight"] = rnd(cfg.n_experts, d)
      for j in range(cfg.n_experts):
        w[p + f"mlp.experts.{j}.gate_proj.weight"] = rnd(cfg.moe_ffn_dim, d)
        w[p + f"mlp.experts.{j}.up_proj.weight"] = rnd(cfg.moe_ffn_dim, d)
        w[p + f"mlp.experts.{j}.down_proj.weight"] = rnd(d, cfg.moe_ffn_dim)
    else:
      w.update({p + "mlp.gate_proj.weight": rnd(cfg.ffn_dim, d),
                p + "mlp.up_proj.weight": rnd(cfg.ffn_dim, d),
                p + "mlp.down_proj.weight": rnd(d, cfg.ffn_dim)})
  return w


def hf_config(cfg) -> dict:
  """config.json as transformers writes it for Qwen3 / Qwen3 MoE."""
  out = {"architectures": ["Qwen3MoeForCausalLM" if cfg.is_moe else "Qwen3ForCausalLM"],
         "model_type": "qwen3_moe" if cfg.is_moe else "qwen3", "vocab_size": cfg.vocab_size,
         "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
         "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim, "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 1024,
         "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
         "use_sliding_window": False, "sliding_window": None, "torch_dtype": "bfloat16"}
  if cfg.is_moe:
    out.update({"num_experts": cfg.n_experts, "num_experts_per_tok": cfg.n_experts_per_token,
                "moe_intermediate_size": cfg.moe_ffn_dim, "norm_topk_prob": True,
                "decoder_sparse_step": 1, "mlp_only_layers": []})
  return out


def write_hf(folder, cfg, weights, shards=1):
  """A HF folder: config.json and one model.safetensors, or `shards` files and the index."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf_config(cfg), f)
  if shards == 1:
    save_file(weights, os.path.join(folder, "model.safetensors"))
    return
  names = sorted(weights)
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = names[s::shards]
    save_file({n: weights[n] for n in part}, os.path.join(folder, fname))
    weight_map.update({n: fname for n in part})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def write_gguf(path, cfg, weights, drop=(), rename=None):
  """The GGUF llama.cpp's converter writes for the same weights (Qwen3Model / Qwen3MoeModel): no
  q/k permutation, each layer's experts stacked [E, out, in]."""
  arch = "qwen3moe" if cfg.is_moe else "qwen3"
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny-qwen3")
  w.add_block_count(cfg.n_layers)
  w.add_context_length(1024)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.ffn_dim)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_key_length(cfg.head_dim)
  w.add_value_length(cfg.head_dim)
  w.add_rope_freq_base(1000000.0)
  w.add_layer_norm_rms_eps(1e-6)
  if cfg.is_moe:
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.n_experts_per_token)
    w.add_expert_feed_forward_length(cfg.moe_ffn_dim)
  tensors = {"token_embd.weight": weights["model.embed_tokens.weight"],
             "output_norm.weight": weights["model.norm.weight"]}
  if not cfg.tie_embeddings:
    tensors["output.weight"] = weights["lm_head.weight"]
  names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
           "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
           "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "mlp.gate": "ffn_gate_inp"}
  for i in range(cfg.n_layers):
    for hf_name, g_name in names.items():
      key = f"model.layers.{i}.{hf_name}.weight"
      if key in weights:
        tensors[f"blk.{i}.{g_name}.weight"] = weights[key]
    if cfg.is_moe:
      for proj, g_name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                           ("down_proj", "ffn_down_exps")):
        tensors[f"blk.{i}.{g_name}.weight"] = np.stack(
            [weights[f"model.layers.{i}.mlp.experts.{j}.{proj}.weight"]
             for j in range(cfg.n_experts)])
  for name, arr in tensors.items():
    if name in drop:
      continue
    w.add_tensor((rename or {}).get(name, name), arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _flat(params) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a, b):
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["qwen3", "qwen3-moe"])
def test_hf_folder_sharded_folder_and_gguf_load_the_same_params(tmp_path, cfg):
  weights = hf_weights(cfg, seed=1)
  write_hf(tmp_path / "one", cfg, weights)
  write_hf(tmp_path / "sharded", cfg, weights, shards=3)
  write_gguf(tmp_path / "m.gguf", cfg, weights)
  hf_cfg, params, _ = loaders.load_model(str(tmp_path / "one"))
  sh_cfg, sharded, _ = loaders.load_model(str(tmp_path / "sharded"))
  g_cfg, from_gguf, tok = loaders.load_model(str(tmp_path / "m.gguf"))
  assert tok is None  # no tokenizer metadata written
  want = cfg.replace(max_seq_len=1024)
  assert hf_cfg == want.replace(name="one") and sh_cfg == want.replace(name="sharded")
  assert g_cfg == want.replace(name="tiny-qwen3")
  _assert_same_params(params, sharded)
  _assert_same_params(params, from_gguf)

  # The layout of docs/CONTRACTS.md: y = x @ W, projections split into heads, experts [E, in, out].
  d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
  ai = projections.attn_in(params["layers"]["attn_in"])
  ao = projections.attn_out_mlp(params["layers"]["attn_out_mlp"])
  for i in (0, cfg.n_layers - 1):
    p = f"model.layers.{i}."
    np.testing.assert_array_equal(ai["wq"][i], weights[p + "self_attn.q_proj.weight"].T
                                  .reshape(d, n, h))
    np.testing.assert_array_equal(ai["q_norm"][i], weights[p + "self_attn.q_norm.weight"])
    np.testing.assert_array_equal(ai["k_norm"][i], weights[p + "self_attn.k_norm.weight"])
    np.testing.assert_array_equal(ao["wo"][i], weights[p + "self_attn.o_proj.weight"].T
                                  .reshape(n, h, d))
    if cfg.is_moe:
      np.testing.assert_array_equal(ao["router"][i], weights[p + "mlp.gate.weight"].T)
      for j in (0, 5):
        e = f"{p}mlp.experts.{j}."
        np.testing.assert_array_equal(ao["expert_gate"][i, j], weights[e + "gate_proj.weight"].T)
        np.testing.assert_array_equal(ao["expert_up"][i, j], weights[e + "up_proj.weight"].T)
        np.testing.assert_array_equal(ao["expert_down"][i, j], weights[e + "down_proj.weight"].T)
    else:
      np.testing.assert_array_equal(ao["w_down"][i], weights[p + "mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(params["lm_head"], weights["lm_head.weight"].T)

  # bfloat16 loading casts the same values (tensor by tensor, never the whole model in f32).
  _, p16, _ = loaders.load_hf(tmp_path / "sharded", dtype="bfloat16")
  assert p16["layers"]["attn_in"]["q_norm"].dtype == np.dtype("bfloat16")
  np.testing.assert_allclose(np.asarray(p16["layers"]["attn_out_mlp"]["wo"], np.float32),
                             ao["wo"], rtol=1e-2, atol=1e-3)


def test_tied_qwen3_and_bfloat16_safetensors(tmp_path):
  cfg = DENSE.replace(tie_embeddings=True)
  weights = hf_weights(cfg, seed=2)
  stored = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}  # as released: bf16
  write_hf(tmp_path, cfg, stored)
  got_cfg, params, _ = loaders.load_hf(tmp_path)
  assert got_cfg.tie_embeddings and "lm_head" not in params
  np.testing.assert_array_equal(params["embed"], stored["model.embed_tokens.weight"]
                                .astype(np.float32))


def _expect_error(exc, match, fn, *args):
  with pytest.raises(exc, match=match):
    fn(*args)


def test_missing_and_misnamed_tensors_are_errors_naming_them(tmp_path):
  weights = hf_weights(MOE, seed=3)
  missing = dict(weights)
  del missing["model.layers.1.mlp.experts.6.up_proj.weight"]
  write_hf(tmp_path / "missing", MOE, missing)
  _expect_error(ValueError, r"no tensor model\.layers\.1\.mlp\.experts\.6\.up_proj\.weight",
                loaders.load_hf, tmp_path / "missing")

  misnamed = dict(weights)
  misnamed["model.layers.0.self_attn.query_norm.weight"] = misnamed.pop(
      "model.layers.0.self_attn.q_norm.weight")
  write_hf(tmp_path / "misnamed", MOE, misnamed, shards=2)
  _expect_error(ValueError, r"no tensor model\.layers\.0\.self_attn\.q_norm\.weight",
                loaders.load_hf, tmp_path / "misnamed")

  no_head = dict(weights)
  del no_head["lm_head.weight"]
  write_hf(tmp_path / "no_head", MOE, no_head)
  _expect_error(ValueError, r"no tensor lm_head\.weight", loaders.load_hf, tmp_path / "no_head")

  # A shard the index names is missing; the index puts a tensor in a shard that lacks it.
  write_hf(tmp_path / "lost_shard", MOE, weights, shards=2)
  os.remove(tmp_path / "lost_shard" / "model-00002-of-00002.safetensors")
  _expect_error(FileNotFoundError, "model-00002-of-00002.safetensors", loaders.load_hf,
                tmp_path / "lost_shard")
  write_hf(tmp_path / "bad_index", MOE, weights, shards=2)
  index_path = tmp_path / "bad_index" / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  name = "model.layers.0.mlp.gate.weight"
  index["weight_map"][name] = next(f for f in set(index["weight_map"].values())
                                   if f != index["weight_map"][name])
  index_path.write_text(json.dumps(index))
  _expect_error(ValueError, r"model\.layers\.0\.mlp\.gate\.weight.*does not hold it",
                loaders.load_hf, tmp_path / "bad_index")

  # Wrong shapes name the tensor too.
  wrong = dict(weights)
  wrong["model.layers.0.self_attn.k_norm.weight"] = np.ones(MOE.head_dim + 2, np.float32)
  write_hf(tmp_path / "wrong", MOE, wrong)
  _expect_error(ValueError, r"model\.layers\.0\.self_attn\.k_norm\.weight has shape \(18,\)",
                loaders.load_hf, tmp_path / "wrong")

  # GGUF: a dropped and a misnamed tensor.
  write_gguf(tmp_path / "drop.gguf", MOE, weights, drop=("blk.1.attn_k_norm.weight",))
  _expect_error(ValueError, r"no tensor blk\.1\.attn_k_norm\.weight", loaders.load_gguf,
                tmp_path / "drop.gguf")
  write_gguf(tmp_path / "rename.gguf", MOE, weights,
             rename={"blk.0.ffn_down_exps.weight": "blk.0.ffn_down_experts.weight"})
  _expect_error(ValueError, r"no tensor blk\.0\.ffn_down_exps\.weight", loaders.load_gguf,
                tmp_path / "rename.gguf")


def test_unsupported_qwen3_moe_variants_are_refused(tmp_path):
  cfg = hf_config(MOE)
  for change, match in (({"mlp_only_layers": [1]}, "dense layers"),
                        ({"use_sliding_window": True}, "use_sliding_window"),
                        ({"attention_bias": True}, "attention_bias")):
    with pytest.raises(ValueError, match=match):
      loaders.config_from_hf({**cfg, **change}, "x")
  without = dict(cfg)
  del without["num_experts"]
  with pytest.raises(ValueError, match="num_experts"):
    loaders.config_from_hf(without, "x")
