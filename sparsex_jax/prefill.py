"""Device side: the one jitted prefill shared by every reuse policy, and the paged decode step.

A prefill batch holds, per request, its non-exact tokens (reused and new, in position order; exact
prefix tokens are only referenced through the page table). In one program:

  1. assemble   gather each reused token's cached K/V (all layers) into the request's own slots,
                re-rotating K by delta = new_pos - old_pos.
  2. full       layers [0, T): every non-exact token, as in a normal prefill; fresh K/V overwrite.
  3. score      rank the reused tokens (policy: Sparse-Q attention mass, K/V deviation, or a score
                the host computed for epic/random).
  4. select     top n_select reused tokens per request; active = Sparse-Q set + selected.
  5. sparse     layers [T, L): only the active tokens, continuing from layer T's input; their K/V
                overwrite their slots; queries attend over the whole request KV.
  6. logits     of the last prompt token.

Optionally (sparsex), the selection is re-scored at a later layer R and shrinks for layers [R, L).

Policies differ only in T, in how step 3 scores, and in n_select: the prefill itself is written once.
The pool is donated: its pages are updated in place.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models import llama
from models.config import ModelConfig
from pallas_kernels import ops
from sparsex_jax.sampling import sample

# Programs traced so far, by function: the engine reports it so tests can bound recompilation.
TRACE_COUNTS = {"prefill": 0, "decode": 0, "copy": 0}


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
  """Static (compile-time) choices of one prefill program."""

  n_full_layers: int  # T, the layer threshold
  score: str = "none"  # none | attention | deviation | given
  importance_layers: str = "last"  # last | sum
  head_reduce: str = "sum"
  n_active: int = 0  # bucketed size of the active set (sparse layers)
  n_probe: int = 0  # bucketed size of the Sparse-Q set (attention probe when T == 0)
  assemble: bool = False  # any reused tokens in the batch
  backend: str = "auto"
  decode: bool = False  # one token per sequence: use the flash-decoding attention
  rescore_layer: int = 0  # R > T: re-score the selection with layer R-1's Sparse-Q attention
  n_active_late: int = 0  # bucketed active-set size in layers [R, L) after re-scoring


def _pool_sentinel(pool) -> int:
  _, _, p, s, _ = pool["k"].shape
  return p * s


def _write_kv(pool, layer, slots, k, v):
  """Writes k, v [B, T, K, H] at flat slots [B, T] of one layer (sentinel slots are dropped)."""
  s = pool["k"].shape[3]
  page, offset = slots // s, slots % s
  return {"k": pool["k"].at[layer, :, page, offset].set(k.astype(pool["k"].dtype), mode="drop"),
          "v": pool["v"].at[layer, :, page, offset].set(v.astype(pool["v"].dtype), mode="drop")}


def assemble(pool, src_slots, dst_slots, delta, inv_freq):
  """Copies K/V of every layer from src_slots to dst_slots [B, T], rotating K by delta [B, T].

  Sentinel dst slots are dropped; src slots must be valid (the host clips them).
  """
  s = pool["k"].shape[3]
  src_page, src_off = src_slots // s, src_slots % s
  dst_page, dst_off = dst_slots // s, dst_slots % s
  k = pool["k"][:, :, src_page, src_off]  # [L, K, B, T, H]
  v = pool["v"][:, :, src_page, src_off]
  # apply_rope wants [..., T, heads, H]: rotate as [L, B, T, K, H].
  k = llama.apply_rope(k.transpose(0, 2, 3, 1, 4), delta, inv_freq).transpose(0, 3, 1, 2, 4)
  return {"k": pool["k"].at[:, :, dst_page, dst_off].set(k, mode="drop"),
          "v": pool["v"].at[:, :, dst_page, dst_off].set(v, mode="drop")}


def _run_layers(layers, cfg: ModelConfig, first_layer: int, x, positions, slots, pool, batch,
                spec: PrefillSpec, sparse_q=None, importance=None):
  """Runs the stacked `layers` (absolute indices first_layer...) over tokens x [B, T, D].

  With sparse_q given, also accumulates Sparse-Q importance [B, MP*S] (summed over these layers).
  """
  n = jax.tree.leaves(layers)[0].shape[0]
  if n == 0:
    return x, pool, importance

  def one_layer(carry, xs):
    x, pool, acc = carry
    layer_params, layer = xs
    q, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
    pool = _write_kv(pool, layer, slots, k, v)
    # The kernels take the whole pool and the (traced) layer index: pool["k"][layer] here would
    # be a dynamic slice that XLA must materialise for the Pallas custom call, a copy of the
    # layer's whole pool slice on every layer of every prefill and decode step.
    if spec.decode:
      out = ops.decode_attention(q[:, 0], pool["k"], pool["v"], batch["page_table"],
                                 batch["kv_len"], sm_scale=cfg.sm_scale, layer=layer,
                                 backend=spec.backend)[:, None]
    else:
      out, lse = ops.attention(q, positions, pool["k"], pool["v"], batch["page_table"],
                               batch["kv_len"], sm_scale=cfg.sm_scale, layer=layer,
                               backend=spec.backend)
    if sparse_q is not None:
      acc = acc + ops.importance(q, positions, sparse_q, pool["k"], batch["page_table"],
                                 batch["kv_len"], lse, sm_scale=cfg.sm_scale,
                                 head_reduce=spec.head_reduce, layer=layer,
                                 backend=spec.backend)
    return (llama.layer_output(layer_params, cfg, x, out), pool, acc), None

  layer_ids = first_layer + jnp.arange(n, dtype=jnp.int32)
  (x, pool, importance), _ = jax.lax.scan(one_layer, (x, pool, importance), (layers, layer_ids))
  return x, pool, importance


def _take(a, idx):
  """Gathers a [B, T, ...] along T with idx [B, A]."""
  return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def compact(mask, size: int):
  """Indices [B, size] of the True entries of mask [B, T] in order, and which are real."""
  t = mask.shape[1]
  order = jnp.arange(t, dtype=jnp.int32)
  idx = jnp.argsort(jnp.where(mask, order, t + order), axis=1)[:, :size].astype(jnp.int32)
  return idx, _take(mask, idx)


def select_top_k(score, candidates, n_select):
  """The n_select[b] highest-scoring candidates of each row (ties: earlier position first)."""
  ranked = jnp.argsort(-jnp.where(candidates, score, -jnp.inf), axis=1, stable=True)
  rank = jnp.argsort(ranked, axis=1)
  return candidates & (rank < n_select[:, None])


def _token_scores(importance, positions):
  """Per-token score [B, T] from per-key-position importance [B, MP*S]."""
  return jnp.take_along_axis(importance, jnp.clip(positions, 0, importance.shape[1] - 1), axis=1)


def _kv_deviation(layer_params, cfg, layer, x, positions, slots, pool):
  """CacheBlend's score: squared distance of fresh K/V at `layer` from what the pool holds."""
  _, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
  s = pool["k"].shape[3]
  page, offset = jnp.clip(slots // s, 0, pool["k"].shape[2] - 1), slots % s
  k_old = pool["k"][layer][:, page, offset].transpose(1, 2, 0, 3)  # [B, T, K, H]
  v_old = pool["v"][layer][:, page, offset].transpose(1, 2, 0, 3)
  dk = (k.astype(jnp.float32) - k_old.astype(jnp.float32)) ** 2
  dv = (v.astype(jnp.float32) - v_old.astype(jnp.float32)) ** 2
  return jnp.sum(dk + dv, axis=(2, 3))


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnames=("pool",))
def prefill(params, pool, batch, *, cfg: ModelConfig, spec: PrefillSpec):
  """One prefill program; returns (last-token logits [B, V], pool, scores [B, T], selected [B, T],
  kept [B, T]) where kept is the part of the selection still active after re-scoring.

  batch (int32 unless noted, all [B, T] over the non-exact tokens, padded):
    tokens, positions (-1 pad), slots (sentinel pad), src_slots, delta, reused (bool),
    sparse_q (bool), given_score (f32); and per request: n_select [B], n_keep [B] (selected
    tokens kept after re-scoring), last_index [B], page_table [B, MP], kv_len [B].
  """
  TRACE_COUNTS["prefill"] += 1
  inv_freq = llama.rope_inv_freq(cfg)
  if spec.assemble:
    dst = jnp.where(batch["reused"], batch["slots"], _pool_sentinel(pool))
    pool = assemble(pool, batch["src_slots"], dst, batch["delta"], inv_freq)

  t_full, n_layers = spec.n_full_layers, cfg.n_layers
  layers = params["layers"]
  positions, slots = batch["positions"], batch["slots"]
  b, t = positions.shape
  importance = jnp.zeros((b, batch["page_table"].shape[1] * pool["k"].shape[3]), jnp.float32)
  x = llama.embed(params, batch["tokens"])

  attention_scored = spec.score == "attention" and t_full > 0
  scored_from = t_full - 1 if spec.importance_layers == "last" else 0
  if not attention_scored:
    scored_from = t_full
  x, pool, _ = _run_layers(llama.slice_layers(layers, 0, scored_from), cfg, 0, x, positions,
                           slots, pool, batch, spec)
  x, pool, importance = _run_layers(
      llama.slice_layers(layers, scored_from, t_full), cfg, scored_from, x, positions, slots,
      pool, batch, spec, sparse_q=batch["sparse_q"], importance=importance)

  scores = jnp.zeros((b, t), jnp.float32)
  selected = jnp.zeros((b, t), bool)
  if t_full == n_layers:
    x_last = _take(x, batch["last_index"][:, None])[:, 0]
    return llama.logits(params, cfg, x_last), pool, scores, selected, selected

  if attention_scored:
    scores = _token_scores(importance, positions)
  elif spec.score == "attention":  # T == 0: probe layer 0 with the Sparse-Q rows only
    idx, valid = compact(batch["sparse_q"], spec.n_probe)
    probe_pos = jnp.where(valid, _take(positions, idx), -1)
    # The probe's K/V writes are the values the sparse layers write again: keep its pool so the
    # update stays in place (dropping it would force a copy of the pool).
    _, pool, importance = _run_layers(
        llama.slice_layers(layers, 0, 1), cfg, 0, _take(x, idx), probe_pos,
        jnp.where(valid, _take(slots, idx), _pool_sentinel(pool)), pool, batch, spec,
        sparse_q=valid, importance=importance)
    scores = _token_scores(importance, positions)
  elif spec.score == "deviation":
    scores = _kv_deviation(jax.tree.map(lambda w: w[t_full], layers), cfg, t_full, x, positions,
                           slots, pool)
  elif spec.score == "given":
    scores = batch["given_score"]

  candidates = batch["reused"] & ~batch["sparse_q"]
  selected = select_top_k(scores, candidates, batch["n_select"])
  idx, valid = compact(batch["sparse_q"] | selected, spec.n_active)
  sentinel = _pool_sentinel(pool)
  x, pos_a, slots_a = (_take(x, idx), jnp.where(valid, _take(positions, idx), -1),
                       jnp.where(valid, _take(slots, idx), sentinel))
  kept = selected
  # Without re-scoring the sparse layers run to the end here; with it, up to the scoring layer R-1.
  first_late = spec.rescore_layer or n_layers
  early_end = first_late - 1 if spec.rescore_layer else n_layers
  x, pool, _ = _run_layers(llama.slice_layers(layers, t_full, early_end), cfg, t_full, x, pos_a,
                           slots_a, pool, batch, spec)
  if spec.rescore_layer:
    # Layer R-1 also scores: the Sparse-Q rows are active, so their attention over every key is
    # computed anyway. Only already-selected tokens can stay (nothing else has a hidden state).
    sparse_a = _take(batch["sparse_q"], idx) & valid
    x, pool, importance = _run_layers(
        llama.slice_layers(layers, first_late - 1, first_late), cfg, first_late - 1, x, pos_a,
        slots_a, pool, batch, spec, sparse_q=sparse_a, importance=jnp.zeros_like(importance))
    keep_a = select_top_k(_token_scores(importance, pos_a), _take(selected, idx) & valid,
                          batch["n_keep"])
    idx2, valid = compact(sparse_a | keep_a, spec.n_active_late)
    x, pos_a, slots_a = (_take(x, idx2), jnp.where(valid, _take(pos_a, idx2), -1),
                         jnp.where(valid, _take(slots_a, idx2), sentinel))
    rows = jnp.arange(b)[:, None]
    kept = jnp.zeros_like(selected).at[rows, jnp.where(valid, _take(idx, idx2), t)].set(
        _take(keep_a, idx2), mode="drop")
    x, pool, _ = _run_layers(llama.slice_layers(layers, first_late, n_layers), cfg, first_late,
                             x, pos_a, slots_a, pool, batch, spec)
  # The last prompt token is always active and has the highest position: the last valid row.
  last = jnp.sum(valid, axis=1) - 1
  x_last = _take(x, last[:, None])[:, 0]
  return llama.logits(params, cfg, x_last), pool, scores, selected, kept


@functools.partial(jax.jit, static_argnames=("cfg", "backend"), donate_argnames=("pool",))
def decode_step(params, pool, tokens, positions, slots, page_table, kv_len, temperature, top_p,
                keys, *, cfg: ModelConfig, backend: str = "auto"):
  """One token for each sequence: tokens, positions, slots [B] (sentinel slot: finished/pad).

  Returns (next tokens [B], logits [B, V], pool).
  """
  TRACE_COUNTS["decode"] += 1
  batch = {"page_table": page_table, "kv_len": kv_len}
  spec = PrefillSpec(n_full_layers=cfg.n_layers, backend=backend, decode=True)
  x, pool, _ = _run_layers(params["layers"], cfg, 0, llama.embed(params, tokens[:, None]),
                           positions[:, None], slots[:, None], pool, batch, spec)
  out_logits = llama.logits(params, cfg, x[:, 0])
  return sample(out_logits, temperature, top_p, keys), out_logits, pool


@functools.partial(jax.jit, donate_argnames=("pool",))
def copy_slots(pool, src_slots, dst_slots):
  """Copies every layer's K/V from src to dst slots [B, T] unchanged (segment-cache inserts)."""
  TRACE_COUNTS["copy"] += 1
  return assemble(pool, src_slots, dst_slots, jnp.zeros_like(src_slots), jnp.zeros((1,)))
