"""The mixture-of-experts FFN of Qwen3 MoE: a router, top-k routing and SwiGLU experts.

    hx [M, D] ──router──> softmax over all E experts ──top k──> (expert ids, weights) [M, k]
                          (weights renormalised to sum 1 when cfg.norm_topk_prob)
    the M * k (token, expert) assignments, sorted by expert ──grouped matmuls──> [M * k, D]
    ──x weight, back in token order, summed over k──> [M, D]

The experts run over the assignments sorted by expert, so each expert multiplies only the tokens
routed to it. Where a layer's groups are large (a prefill), each expert's rows are padded to a
capacity that holds the largest group, chosen on the device among a few (`capacities`), and each
projection is one batched matmul; where they are small (a decode step), or larger than every
capacity, a grouped matmul: `jax.lax.ragged_dot` by default, the engine's GPU kernel where it
passes one (`grouped_matmul=`; pallas_kernels/grouped_matmul.py). The engine's sparse layers hand the FFN only
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

from typing import Callable

import jax
import jax.numpy as jnp

from models.config import ModelConfig

EXPERT_WEIGHTS = ("expert_gate", "expert_up", "expert_down")

# grouped_matmul(rows [R, K] sorted by group, w [G, K, N], group_sizes [G]) -> [R, N]
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


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


# The batched form (below) pads every expert's rows to one capacity; these are the capacities a
# layer may pick from, as multiples of the mean rows per expert (each rounded up to 64 rows).
CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0)
# Below this mean a layer's groups are a decode step's few rows each: the grouped matmul reads
# only the experts its tokens hit, where padding would compute and read every expert.
MIN_MEAN_ROWS = 64


def capacities(rows: int, n_experts: int) -> tuple[int, ...]:
  """Rows per expert the batched form may pad to, smallest first (CAPACITY_FACTORS times the mean
  rows per expert, rounded up to 64); () when the mean is under MIN_MEAN_ROWS."""
  mean = rows / n_experts
  if mean < MIN_MEAN_ROWS:
    return ()
  return tuple(sorted({-(-int(f * mean) // 64) * 64 for f in CAPACITY_FACTORS}))


def _swiglu_padded(hx, slot_token, filled, w_gate, w_up, w_down):
  """Each expert's SwiGLU over its rows padded to C: slot_token, filled [E, C] -> [E, C, D]. One
  batched matmul per projection (cuBLAS on a GPU: at 8K tokens of Qwen3-30B-A3B the three take
  1.12 ms where the grouped kernel takes 2.65 ms, docs/MODELS.md round 22)."""
  x = jnp.where(filled[..., None], hx[slot_token], 0).astype(hx.dtype)  # [E, C, D]
  gate = jnp.einsum("ECD,EDF->ECF", x, w_gate)
  up = jnp.einsum("ECD,EDF->ECF", x, w_up)
  return jnp.einsum("ECF,EFD->ECD", jax.nn.silu(gate) * up, w_down)


def experts_ffn(hx: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array, first_expert=0,
                grouped_matmul: GroupedMatmul = jax.lax.ragged_dot) -> jax.Array:
  """sum_j weights[m, j] * SwiGLU_{experts[m, j]}(hx[m]) over the experts held here: [M, D].

  hx [M, D]; experts, weights [M, k]; w_gate, w_up [E_local, D, F], w_down [E_local, F, D] are
  experts [first_expert, first_expert + E_local). Assignments to other experts contribute 0.
  grouped_matmul(rows, w, group_sizes): each group's rows times its expert's matrix (the engine
  passes its GPU kernel, pallas_kernels/grouped_matmul.py; rows past the groups may be anything).

  Two forms compute the experts, the same products: where a layer's groups are large (a prefill),
  every expert's rows padded to a capacity C and one batched matmul per projection, C the
  smallest of `capacities` that holds the largest group (lax.switch: routing decides it on the
  device, so the cost follows this layer's largest group); past the largest capacity, and where
  groups are small (a decode step), the grouped matmul.
  """
  m, d = hx.shape
  k = experts.shape[1]
  n_local = w_gate.shape[0]
  local = experts.reshape(-1) - first_expert  # [M * k]
  here = (local >= 0) & (local < n_local)
  # Sort the assignments by expert; those of other shards get group n_local and sort last, past
  # the sum of the group sizes: the grouped matmul leaves those rows out (masked below).
  group = jnp.where(here, local, n_local)
  order = jnp.argsort(group, stable=True)
  group_sizes = jnp.bincount(group, length=n_local + 1)[:n_local].astype(jnp.int32)

  # Where each assignment sits in the sorted order (the inverse permutation: a scatter of unique
  # indices, not a second sort), and its routing weight (0 for another shard's expert).
  unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                                 unique_indices=True)
  scale = jnp.where(here, weights.reshape(-1), 0.0).reshape(m, k, 1)

  def combine(rows):
    """rows [M * k, D] in (token, j) order, in the matmul's dtype -> the weighted sum over j in
    float32: one fusion reads the rows once (the same products and sums, bit for bit, as scaling
    them in float32 first, which wrote and read them again at twice the bytes). where, not a
    product alone: rows of another shard's assignments are unspecified on some backends."""
    rows = rows.reshape(m, k, d).astype(jnp.float32)
    return jnp.sum(jnp.where(here.reshape(m, k, 1), rows * scale, 0.0), axis=1)

  def grouped():
    rows = hx[order // k]  # [M * k, D]: the token of each sorted assignment
    gate = grouped_matmul(rows, w_gate, group_sizes)
    up = grouped_matmul(rows, w_up, group_sizes)
    out = grouped_matmul(jax.nn.silu(gate) * up, w_down, group_sizes)  # [M * k, D], sorted
    return combine(out[unsort])

  def padded(c: int):
    def run():
      starts = jnp.cumsum(group_sizes) - group_sizes
      slot = starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]  # [E, C] sorted index
      filled = jnp.arange(c)[None, :] < group_sizes[:, None]
      slot_token = order[jnp.minimum(slot, order.shape[0] - 1)] // k
      out = _swiglu_padded(hx, slot_token, filled, w_gate, w_up, w_down)  # [E, C, D]
      # Assignment a (token order) is row unsort[a] - starts[e] of its expert e's block: read
      # straight into token order, with no sorted copy in between.
      expert = jnp.minimum(group, n_local - 1)
      return combine(out[expert, jnp.clip(unsort - starts[expert], 0, c - 1)])
    return run

  caps = capacities(m * k, n_local)
  if not caps:
    return grouped()
  branch = jnp.searchsorted(jnp.asarray(caps, jnp.int32), jnp.max(group_sizes))
  return jax.lax.switch(branch, [padded(c) for c in caps] + [grouped])


def moe_ffn(hx: jax.Array, params: dict, cfg: ModelConfig, first_expert=0,
            grouped_matmul: GroupedMatmul = jax.lax.ragged_dot) -> jax.Array:
  """The MoE FFN of normed hidden states hx [..., D] -> [..., D] (hx's dtype).

  params: the layer's "router", "expert_gate", "expert_up", "expert_down" (the expert weights may
  be a contiguous block of experts starting at first_expert: see experts_ffn). Returns that block's
  share of the output (all of it when the block is every expert). grouped_matmul: as experts_ffn.
  """
  flat = hx.reshape(-1, hx.shape[-1])
  experts, weights = route(flat, params["router"], cfg)
  out = experts_ffn(flat, experts, weights, params["expert_gate"], params["expert_up"],
                    params["expert_down"], first_expert, grouped_matmul)
  return out.astype(hx.dtype).reshape(hx.shape)
