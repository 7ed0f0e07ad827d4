"""The prefill program: one jitted body shared by every reuse policy.

A prefill batch holds, per request, its non-exact tokens (reused and new, in position order; exact
prefix tokens are only referenced through the page table). In one program:

  1. assemble   gather each reused token's cached K/V (all layers) into the request's own slots,
                re-rotating K by delta = new_pos - old_pos.
  2. full       layers [0, T): every non-exact token, as in a normal prefill; fresh K/V overwrite.
  3. score      rank the reused tokens (the policy's scorer: Sparse-Q attention mass, K/V
                deviation, or scores the host computed).
  4. select     top n_select reused tokens per request; active = Sparse-Q set + selected.
  5. sparse     layers [T, L): only the active tokens, continuing from layer T's input; their K/V
                overwrite their slots; queries attend over the whole request KV.
  6. logits     of the last prompt token.

Optionally (sparsex), the selection is re-scored at a later layer R and shrinks for layers [R, L).
The pool is donated: its pages are updated in place.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models import llama
from models.config import ModelConfig
from sparsex_jax.programs import kernels as ops
from sparsex_jax.kv.layout import page_and_offset
from sparsex_jax.programs.layers import pool_sentinel, scan_layers, write_kv
from sparsex_jax.programs.options import COMPILER_OPTIONS

SCORES = ("none", "attention", "deviation", "given")
# importance_layers that read the Sparse-Q attention at layer T, through the probe
LAYER_T_READINGS = ("threshold", "last_and_threshold")


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
  """Static (compile-time) choices of one prefill program; the planner makes it."""

  layer_threshold: int  # T
  score: str = "none"  # one of SCORES
  # last | sum | threshold (layer T's attention over its fresh K/V, which are then kept) |
  # last_and_threshold (the sum of the two): LAYER_T_READINGS read layer T
  importance_layers: str = "last"
  head_reduce: str = "sum"
  n_active: int = 0  # bucketed size of the active set (sparse layers)
  # bucketed size of the Sparse-Q set: the rows whose lse a scored layer without one recomputes
  # (the layer-0 probe at T = 0, dense full layers, layer T's attention)
  n_probe: int = 0
  assemble: bool = False  # any reused tokens in the batch
  backend: str = "auto"
  rescore_layer: int = 0  # R > T: re-score the selection with layer R-1's Sparse-Q attention
  n_active_late: int = 0  # bucketed active-set size in layers [R, L) after re-scoring
  deviation_weighted: bool = False  # attention scores times the K/V deviation at layer T
  deviation_norm: bool = False  # ... times its norm (first-order error) rather than its square
  # ... paired per kv head: sum over kv heads of (attention of its query heads) x (its deviation
  # norm), instead of (attention summed over heads) x (deviation norm over all kv heads).
  deviation_per_head: bool = False
  # The deviation's fresh K/V at layer T (every non-exact token's, exact: layers below T ran in
  # full) replace the reused K/V at layer T, not only the selected tokens'.
  refresh_threshold_kv: bool = False
  per_segment: bool = False  # select per segment (segment_budget) instead of one top-k
  # Attention of the full layers [0, T): "paged" (the sparse-query kernel with every token a
  # query) or "dense" (causal attention over contiguous K/V: cuDNN flash attention on the GPU).
  full_attention: str = "paged"
  # Some row has an exact prefix: the dense full layers read its keys back from the pages.
  prefix_keys: bool = True


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "positions", "slots", "src_slots", "delta", "reused",
                                "sparse_q", "given_score", "forced", "segment_ids",
                                "segment_budget", "n_select", "n_keep", "last_index",
                                "page_table", "kv_len"],
                   meta_fields=[])
@dataclasses.dataclass
class PrefillBatch:
  """The device arrays of one prefill, padded to shape buckets ([B, T] over non-exact tokens).

  Padding tokens have position -1 and the sentinel slot; padding rows have kv_len 0.
  """

  tokens: jax.Array  # [B, T] int32
  positions: jax.Array  # [B, T] int32 absolute positions (-1 pad)
  slots: jax.Array  # [B, T] int32 flat pool slots (sentinel pad)
  src_slots: jax.Array  # [B, T] int32 slot of a reused token's cached K/V (0 otherwise)
  delta: jax.Array  # [B, T] int32 new - old position of a reused token (0 otherwise)
  reused: jax.Array  # [B, T] bool
  sparse_q: jax.Array  # [B, T] bool: new tokens and the last prompt token
  given_score: jax.Array  # [B, T] float32 host scores (epic, random)
  forced: jax.Array  # [B, T] bool: selected before any scored token (segment heads)
  segment_ids: jax.Array  # [B, T] int32 segment of each token (-1 pad)
  segment_budget: jax.Array  # [B, T] int32 tokens to select from the token's segment
  n_select: jax.Array  # [B] int32 reused tokens to recompute
  n_keep: jax.Array  # [B] int32 of those, kept after re-scoring
  last_index: jax.Array  # [B] int32 index of the last prompt token along T
  page_table: jax.Array  # [B, MP] int32
  kv_len: jax.Array  # [B] int32 prompt length


@dataclasses.dataclass(frozen=True)
class PrefillOutput:
  logits: jax.Array  # [B, V] float32, of the last prompt token
  scores: jax.Array  # [B, T] float32 selection score of each token
  selected: jax.Array  # [B, T] bool: recomputed in the sparse layers
  kept: jax.Array  # [B, T] bool: still recomputed after re-scoring


jax.tree_util.register_dataclass(PrefillOutput, data_fields=["logits", "scores", "selected",
                                                             "kept"], meta_fields=[])


def assemble(pool, src_slots, dst_slots, delta, inv_freq, backend="auto"):
  """Copies K/V of every layer from src_slots to dst_slots [B, T], rotating K by delta [B, T]
  (sentinel dst: nothing written). One pass over the reused K/V with the kernel (GPU)."""
  k, v = ops.assemble_kv(pool["k"], pool["v"], src_slots, dst_slots, delta, inv_freq,
                         backend=backend)
  return {"k": k, "v": v}


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


def select_per_segment(score, candidates, segment_ids, budget):
  """Candidates ranked inside their segment; a token is selected if its rank < its segment's
  budget (ties: earlier position first)."""
  t = score.shape[1]
  by_score = jnp.argsort(-jnp.where(candidates, score, -jnp.inf), axis=1, stable=True)
  seg = jnp.where(candidates, segment_ids, jnp.iinfo(jnp.int32).max)
  order = _take(by_score, jnp.argsort(_take(seg, by_score), axis=1, stable=True))  # (seg, -score)
  seg_in_order = _take(seg, order)
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg_in_order.shape)
  starts = jnp.concatenate([jnp.ones_like(seg_in_order[:, :1], bool),
                            seg_in_order[:, 1:] != seg_in_order[:, :-1]], axis=1)
  rank_in_order = idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  rank = _take(rank_in_order, jnp.argsort(order, axis=1))
  return candidates & (rank < budget)


def _token_scores(importance, positions):
  """Per-token score [B, T] from per-key-position importance [B, MP*S]; [B, T, K] from a per
  kv head importance [B, K, MP*S]."""
  idx = jnp.clip(positions, 0, importance.shape[-1] - 1)
  if importance.ndim == 3:
    return jnp.take_along_axis(importance, idx[:, None, :], axis=2).transpose(0, 2, 1)
  return jnp.take_along_axis(importance, idx, axis=1)


def _kv_deviation(layer_params, cfg, layer, x, positions, slots, pool, per_head=False):
  """CacheBlend's score: squared distance of fresh K/V at `layer` from what the pool holds,
  [B, T] (or [B, T, K] per kv head), and the fresh k, v [B, T, K, H] themselves."""
  _, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
  page, offset = page_and_offset(slots, pool["k"].shape[3])
  page = jnp.clip(page, 0, pool["k"].shape[2] - 1)
  k_old = pool["k"][layer][:, page, offset].transpose(1, 2, 0, 3)  # [B, T, K, H]
  v_old = pool["v"][layer][:, page, offset].transpose(1, 2, 0, 3)
  dk = (k.astype(jnp.float32) - k_old.astype(jnp.float32)) ** 2
  dv = (v.astype(jnp.float32) - v_old.astype(jnp.float32)) ** 2
  return jnp.sum(dk + dv, axis=3 if per_head else (2, 3)), k, v


def _paged_attention(cfg: ModelConfig, batch: PrefillBatch, backend: str):
  # The kernels take the whole pool and the (traced) layer index: pool["k"][layer] here would be
  # a dynamic slice that XLA must materialise for the Pallas custom call, a copy of the layer's
  # whole pool slice on every layer of every prefill.
  def attend(q, positions, pool, layer):
    return ops.attention(q, positions, pool["k"], pool["v"], batch.page_table, batch.kv_len,
                         sm_scale=cfg.sm_scale, layer=layer, backend=backend)
  return attend


def _dense_attention(cfg: ModelConfig, batch: PrefillBatch, spec: PrefillSpec, page_size: int):
  """The full layers' attention as one causal attention over contiguous K/V (cuDNN on the GPU).

  Every non-exact token is a query, so a full layer is a dense causal prefill whose queries start
  at the row's exact prefix length: the tokens sit at positions start + t, t = 0, 1, ... (the
  planner lays them out so). Contiguous rows indexed by absolute position make that plain causal
  attention (row t sees keys j <= t): without an exact prefix the layer's fresh q, k, v
  are those rows as they are; with one, keys are read back from the pages (exact prefix and the
  just-written K/V) and queries are placed at their positions. The K/V are in the pages already
  (scan_layers writes them first), so later layers and decode see the same pool as the paged path.
  A real query at position p < kv_len reads keys 0..p, all real: the causal mask alone excludes
  every padding key, so no lengths are passed (rows past kv_len are junk, zeroed by `finish`).
  cuDNN's padding-aware causal mask runs 9% slower at 32K even with no padding (docs/ttft.md).
  """
  b, t = batch.positions.shape

  def finish(out, positions):
    return jnp.where((positions >= 0)[..., None, None], out, jnp.zeros_like(out)), None

  if not spec.prefix_keys:
    def attend(q, positions, pool, layer, k, v):
      del pool, layer
      return finish(ops.causal_attention(q, k, v, sm_scale=cfg.sm_scale, backend=spec.backend),
                    positions)
    return attend

  n_keys = batch.page_table.shape[1] * page_size
  start = jnp.maximum(batch.positions[:, 0], 0)  # exact prefix length of each row
  q_rows = jnp.clip(jnp.arange(n_keys, dtype=jnp.int32)[None] - start[:, None], 0, t - 1)

  def attend(q, positions, pool, layer, k, v):
    del k, v
    n_kv, head_dim = pool["k"].shape[1], pool["k"].shape[4]

    def keys(x):  # [B, MP*S, K, H]: one gather of the request's pages of this layer
      x = x[layer][:, batch.page_table]  # [K, B, MP, S, H]
      return jnp.moveaxis(x, 0, 3).reshape(b, -1, n_kv, head_dim)

    # Rows before a request's start are junk queries (their outputs are never read).
    out = ops.causal_attention(_take(q, q_rows), keys(pool["k"]), keys(pool["v"]),
                               sm_scale=cfg.sm_scale, backend=spec.backend)
    return finish(_take(out, jnp.clip(positions, 0, n_keys - 1)), positions)
  return attend


def _importance(cfg: ModelConfig, batch: PrefillBatch, spec: PrefillSpec, sparse_q, probe=None,
                head_reduce=None):
  """score(q, positions, lse, pool, layer) -> per-key importance of the Sparse-Q rows.

  head_reduce: spec.head_reduce unless given ("per_kv_head": [B, K, MP*S]).

  probe (idx, valid) [B, n_probe]: the Sparse-Q rows, for layers whose attention gives no f32
  log-sum-exp (the dense full layers): their lse is recomputed by the sparse-query kernel on those
  rows only (a few queries: cheap next to the layer), so the probabilities stay exact.
  """
  def score(q, positions, lse, pool, layer, probe_rows=False):
    """probe_rows: q is already the probe's rows (positions still every token's)."""
    rows = sparse_q
    if lse is None:
      idx, valid = probe
      q = q if probe_rows else _take(q, idx)
      positions, rows = jnp.where(valid, _take(positions, idx), -1), valid
      _, lse = ops.attention(q, positions, pool["k"], pool["v"], batch.page_table, batch.kv_len,
                             sm_scale=cfg.sm_scale, layer=layer, backend=spec.backend)
    if (head_reduce or spec.head_reduce) != "sum":  # the kernel sums over heads, nothing else
      raise ValueError(f"head_reduce={head_reduce or spec.head_reduce!r} was removed with the "
                       "importance kernel's max and per-kv-head paths (docs/quality.md)")
    return ops.importance(q, positions, rows, pool["k"], batch.page_table, batch.kv_len, lse,
                          sm_scale=cfg.sm_scale, layer=layer, backend=spec.backend)
  return score


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnames=("pool",),
                   compiler_options=COMPILER_OPTIONS)
def prefill(pool, params, batch: PrefillBatch, *, cfg: ModelConfig, spec: PrefillSpec):
  """One prefill program -> (pool, PrefillOutput)."""
  if spec.assemble:
    dst = jnp.where(batch.reused, batch.slots, pool_sentinel(pool))
    pool = assemble(pool, batch.src_slots, dst, batch.delta, llama.rope_inv_freq(cfg),
                    spec.backend)

  layer_threshold, n_layers = spec.layer_threshold, cfg.n_layers
  layers = params["layers"]
  positions, slots = batch.positions, batch.slots
  b, t = positions.shape
  attend = _paged_attention(cfg, batch, spec.backend)
  n_keys = batch.page_table.shape[1] * pool["k"].shape[3]
  per_head = spec.deviation_weighted and spec.deviation_per_head
  importance = jnp.zeros((b, pool["k"].shape[1], n_keys) if per_head else (b, n_keys),
                         jnp.float32)
  x = llama.embed(params, batch.tokens)

  def run(first, stop, x, positions, slots, pool, sparse_q=None, importance=None, dense=False,
          probe=None, head_reduce=None):
    score = None if sparse_q is None else _importance(cfg, batch, spec, sparse_q, probe,
                                                      head_reduce)
    return scan_layers(layers, cfg, first, x, positions, slots, pool,
                       full_attend if dense else attend, score, importance, pass_kv=dense,
                       stop_layer=stop, write_backend=spec.backend)

  # Sparse-Q attention read at layer T itself, over its fresh K/V (computed for every token: the
  # layers below ran in full), instead of in the full layers.
  at_threshold = (spec.score == "attention" and layer_threshold > 0
                  and spec.importance_layers in LAYER_T_READINGS)
  if at_threshold and not (spec.refresh_threshold_kv and spec.n_probe):
    raise ValueError(f"importance_layers={spec.importance_layers!r} reads layer T's attention "
                     "over the fresh K/V the refresh writes, through the Sparse-Q probe: the spec "
                     f"needs refresh_threshold_kv and n_probe > 0, got {spec}")
  attention_scored = (spec.score == "attention" and layer_threshold > 0
                      and spec.importance_layers in ("last", "sum"))
  # last_and_threshold scores layer T - 1 after the full layers, from its input kept between two
  # runs, not inside their scan: with both layers scored inside one program XLA added 69 device
  # copies per prefill, 8 ms at 8K on the H100 (docs/quality.md, round 8).
  both = at_threshold and spec.importance_layers == "last_and_threshold"
  if attention_scored:
    scored_from = 0 if spec.importance_layers == "sum" else layer_threshold - 1
  else:
    scored_from = layer_threshold - 1 if both else layer_threshold
  # The full layers: every non-exact token is a query.
  dense = spec.full_attention == "dense"
  full_attend = _dense_attention(cfg, batch, spec, pool["k"].shape[3]) if dense else attend
  probe = (compact(batch.sparse_q, spec.n_probe) if ((dense and attention_scored) or at_threshold)
           else None)
  x, pool, _ = run(0, scored_from, x, positions, slots, pool, dense=dense)
  x_last_full = x  # layer T - 1's input where both
  x, pool, importance = run(scored_from, layer_threshold, x, positions, slots, pool,
                            sparse_q=batch.sparse_q if attention_scored else None,
                            importance=importance, dense=dense, probe=probe,
                            head_reduce="per_kv_head" if per_head else None)

  def deviation(pool):  # at the first sparse layer, from its input x (exact: every layer ran)
    squared, k, v = _kv_deviation(jax.tree.map(lambda w: w[layer_threshold], layers), cfg,
                                  layer_threshold, x, positions, slots, pool, per_head=per_head)
    if spec.refresh_threshold_kv:  # the fresh K/V are exact for every token: keep them all
      pool = write_kv(pool, layer_threshold, slots, k, v, spec.backend)
    return squared, pool

  def probe_importance(layer, x_in, pool):
    """The probe rows' attention at `layer` (its K/V in the pool), their q computed from the
    layer's input x_in for those rows only."""
    idx, valid = probe
    q, _, _ = llama.layer_qkv(jax.tree.map(lambda w: w[layer], layers), cfg, _take(x_in, idx),
                              jnp.where(valid, _take(positions, idx), 0))
    score = _importance(cfg, batch, spec, batch.sparse_q, probe,
                        "per_kv_head" if per_head else None)
    return score(q, positions, None, pool, layer, probe_rows=True)

  scores = jnp.zeros((b, t), jnp.float32)
  selected = jnp.zeros((b, t), bool)
  if layer_threshold == n_layers:
    x_last = _take(x, batch.last_index[:, None])[:, 0]
    return pool, PrefillOutput(llama.logits(params, cfg, x_last), scores, selected, selected)

  squared = None
  if at_threshold:  # the refresh puts layer T's fresh K/V of every token in the pool first
    squared, pool = deviation(pool)
    importance = importance + probe_importance(layer_threshold, x, pool)
    if both:  # layer T - 1, over the K/V it wrote
      importance = importance + probe_importance(layer_threshold - 1, x_last_full, pool)
    scores = _token_scores(importance, positions)
  elif attention_scored:
    scores = _token_scores(importance, positions)
  elif spec.score == "attention":  # T == 0: probe layer 0 with the Sparse-Q rows only
    idx, valid = compact(batch.sparse_q, spec.n_probe)
    probe_pos = jnp.where(valid, _take(positions, idx), -1)
    # The probe's K/V writes are the values the sparse layers write again: keep its pool so the
    # update stays in place (dropping it would force a copy of the pool).
    _, pool, importance = run(0, 1, _take(x, idx), probe_pos,
                              jnp.where(valid, _take(slots, idx), pool_sentinel(pool)), pool,
                              sparse_q=valid, importance=importance)
    scores = _token_scores(importance, positions)
  elif spec.score == "deviation":
    scores, pool = deviation(pool)
  elif spec.score == "given":
    scores = batch.given_score

  if spec.deviation_weighted:  # the error a token causes: how much it is read x how wrong it is
    if squared is None:
      squared, pool = deviation(pool)
    error = scores * (jnp.sqrt(squared) if spec.deviation_norm else squared)
    scores = jnp.sum(error, axis=2) if per_head else error
  candidates = batch.reused & ~batch.sparse_q
  ranked = jnp.where(batch.forced, jnp.inf, scores)
  if spec.per_segment:
    selected = select_per_segment(ranked, candidates, batch.segment_ids, batch.segment_budget)
  else:
    selected = select_top_k(ranked, candidates, batch.n_select)
  idx, valid = compact(batch.sparse_q | selected, spec.n_active)
  sentinel = pool_sentinel(pool)
  x, pos_a, slots_a = (_take(x, idx), jnp.where(valid, _take(positions, idx), -1),
                       jnp.where(valid, _take(slots, idx), sentinel))
  kept = selected
  # Without re-scoring the sparse layers run to the end here; with it, up to the scoring layer R-1.
  first_late = spec.rescore_layer or n_layers
  early_end = first_late - 1 if spec.rescore_layer else n_layers
  x, pool, _ = run(layer_threshold, early_end, x, pos_a, slots_a, pool)
  if spec.rescore_layer:
    # Layer R-1 also scores: the Sparse-Q rows are active, so their attention over every key is
    # computed anyway. Only already-selected tokens can stay (nothing else has a hidden state).
    sparse_a = _take(batch.sparse_q, idx) & valid
    x, pool, importance = run(first_late - 1, first_late, x, pos_a, slots_a, pool,
                              sparse_q=sparse_a, importance=jnp.zeros((b, n_keys), jnp.float32))
    keep_a = select_top_k(_token_scores(importance, pos_a), _take(selected, idx) & valid,
                          batch.n_keep)
    idx2, valid = compact(sparse_a | keep_a, spec.n_active_late)
    x, pos_a, slots_a = (_take(x, idx2), jnp.where(valid, _take(pos_a, idx2), -1),
                         jnp.where(valid, _take(slots_a, idx2), sentinel))
    rows = jnp.arange(b)[:, None]
    kept = jnp.zeros_like(selected).at[rows, jnp.where(valid, _take(idx, idx2), t)].set(
        _take(keep_a, idx2), mode="drop")
    x, pool, _ = run(first_late, n_layers, x, pos_a, slots_a, pool)
  # The last prompt token is always active and has the highest position: the last valid row.
  last = jnp.sum(valid, axis=1) - 1
  x_last = _take(x, last[:, None])[:, 0]
  return pool, PrefillOutput(llama.logits(params, cfg, x_last), scores, selected, kept)
