"""The mixture-of-experts FFN of Qwen3 MoE: a router, top-k routing and SwiGLU experts.

    hx [M, D] ──router──> softmax over all E experts ──top k──> (expert ids, weights) [M, k]
                          (weights renormalised to sum 1 when cfg.norm_topk_prob)
    the M * k (token, expert) assignments, sorted by expert ──grouped matmuls──> [M * k, D]
    ──x weight, back in token order, summed over k──> [M, D]

The experts run as grouped matmuls (`jax.lax.ragged_dot`) over the assignments sorted by expert, so
each expert multiplies only the tokens routed to it. The engine's sparse layers hand the FFN only
their active tokens already, so routing needs nothing of the prefill.

Expert parallelism: `moe_ffn(..., first_expert=f)` with the expert weights of experts
[f, f + E_local) only computes those experts' share of every token's output (assignments to other
experts add nothing); a caller that splits the experts over devices sums the shares
(sparsex_jax/sharding.py: `expert_parallel_ffn`). Routing needs the router of all E experts, which
every shard holds.

Params of one layer (inside "attn_out_mlp", docs/CONTRACTS.md): "router" [D, E],
"expert_gate" and "expert_up" [E, D, F], "expert_down" [E, F, D] (F = cfg.moe_ffn_dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig

EXPERT_WEIGHTS = ("expert_gate", "expert_up", "expert_down")


def route(hx: jax.Array, router: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """Each token's k experts [M, k] (int32) and their weights [M, k] (float32).

  The router logits are computed in the weights' dtype, as Hugging Face's Qwen3MoE does (its
  `gate` is a Linear in the model's dtype), then the softmax over all experts in float32, so a
  bfloat16 model routes as the reference does. Ties in top-k go to the lower expert id (as
  torch.topk).
  """
  logits = jnp.einsum("MD,DE->ME", hx, router).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  weights, experts = jax.lax.top_k(probs, cfg.n_experts_per_token)
  if cfg.norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return experts.astype(jnp.int32), weights


def experts_ffn(hx: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array, first_expert=0) -> jax.Array:
  """sum_j weights[m, j] * SwiGLU_{experts[m, j]}(hx[m]) over the experts held here: [M, D].

  hx [M, D]; experts, weights [M, k]; w_gate, w_up [E_local, D, F], w_down [E_local, F, D] are
  experts [first_expert, first_expert + E_local). Assignments to other experts contribute 0.
  """
  m, d = hx.shape
  k = experts.shape[1]
  n_local = w_gate.shape[0]
  local = experts.reshape(-1) - first_expert  # [M * k]
  here = (local >= 0) & (local < n_local)
  # Sort the assignments by expert; those of other shards get group n_local and sort last, past
  # the sum of the group sizes: ragged_dot leaves those rows out (zero).
  group = jnp.where(here, local, n_local)
  order = jnp.argsort(group, stable=True)
  group_sizes = jnp.bincount(group, length=n_local + 1)[:n_local].astype(jnp.int32)
  rows = hx[order // k]  # [M * k, D]: the token of each sorted assignment
  gate = jax.lax.ragged_dot(rows, w_gate, group_sizes)
  up = jax.lax.ragged_dot(rows, w_up, group_sizes)
  out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [M * k, D]
  scale = jnp.where(here, weights.reshape(-1), 0.0)[order]
  # where, not a product alone: rows outside every group are unspecified on some backends.
  out = jnp.where(here[order][:, None], out.astype(jnp.float32) * scale[:, None], 0.0)
  unsort = jnp.argsort(order)  # back to (token, j) order by a gather, not a scatter-add
  return jnp.sum(out[unsort].reshape(m, k, d), axis=1)


def moe_ffn(hx: jax.Array, params: dict, cfg: ModelConfig, first_expert=0) -> jax.Array:
  """The MoE FFN of normed hidden states hx [..., D] -> [..., D] (hx's dtype).

  params: the layer's "router", "expert_gate", "expert_up", "expert_down" (the expert weights may
  be a contiguous block of experts starting at first_expert: see experts_ffn). Returns that block's
  share of the output (all of it when the block is every expert).
  """
  flat = hx.reshape(-1, hx.shape[-1])
  experts, weights = route(flat, params["router"], cfg)
  out = experts_ffn(flat, experts, weights, params["expert_gate"], params["expert_up"],
                    params["expert_down"], first_expert)
  return out.astype(hx.dtype).reshape(hx.shape)
