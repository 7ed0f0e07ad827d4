"""The prefill program: one jitted body shared by every reuse method.

A prefill batch holds, per request, its non-exact tokens (reused and new, in position order; exact
prefix tokens are only referenced through the page table). In one program, stage by stage:

  1. full       layers [0, T): every non-exact token, as in a normal prefill; fresh K/V written.
  2. assemble   gather each reused token's cached K/V of layers [T, L) into the request's own
                slots, re-rotating K by delta = new_pos - old_pos. Not before the full layers:
                they recompute layers [0, T) of every reused token, and read nothing cached of
                the layers above, so the segments' pages of layers [T, L) may still be arriving
                from the host tier while they run (docs/TIERS.md).
  3. score      the method's device scorer ranks the reused tokens (spec.scorer; the pieces it
                reads are in scoring.py; host-only rankings arrive as batch.given_score).
  4. select     the top n_select reused tokens per request (forced ones first); active = the
                Sparse-Q set + selected.
  5. sparse     layers [T, L): only the active tokens, continuing from layer T's input; their K/V
                overwrite their slots; queries attend over the whole request KV.
  6. logits     of the last prompt token.

`prefill` is the whole program; `prefill_full_layers` (stage 1) and `prefill_rest` (2-6) are its
two halves, for a batch whose reused pages of layers [T, L) are written between them (host-tier
loads). The pool is donated: its pages are updated in place.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models import llama
from models.config import ModelConfig
from sparsex_jax.programs import kernels as ops
from sparsex_jax.programs.layers import pool_sentinel, scan_layers
from sparsex_jax.programs.options import COMPILER_OPTIONS
from sparsex_jax.programs.scoring import DeviceScorer, ScoringInputs, compact, take


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
  """Static (compile-time) choices of one prefill program; the planner makes it."""

  layer_threshold: int  # T (the model's depth: every token in full, nothing to select)
  scorer: DeviceScorer | None = None  # the method's ranking of the reused tokens (None: given)
  n_active: int = 0  # bucketed size of the active set (sparse layers)
  n_probe: int = 0  # bucketed size of the scoring rows, for scorers that read their attention
  assemble: bool = False  # any reused tokens in the batch
  backend: str = "auto"
  # Attention of the full layers [0, T): "paged" (the sparse-query kernel with every token a
  # query) or "dense" (causal attention over contiguous K/V: cuDNN flash attention on the GPU).
  full_attention: str = "paged"
  # Some row has an exact prefix: the dense full layers read its keys back from the pages.
  prefix_keys: bool = True


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "positions", "slots", "src_slots", "delta", "reused",
                                "sparse_q", "given_score", "forced", "score_rows", "n_select",
                                "last_index", "page_table", "kv_len"],
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
  score_rows: jax.Array  # [B, T] bool: the queries whose attention scores (the Sparse-Q set, or
                         # the method's: e.g. the paper's tail fallback)
  n_select: jax.Array  # [B] int32 reused tokens to recompute
  last_index: jax.Array  # [B] int32 index of the last prompt token along T
  page_table: jax.Array  # [B, MP] int32
  kv_len: jax.Array  # [B] int32 prompt length


@dataclasses.dataclass(frozen=True)
class PrefillOutput:
  logits: jax.Array  # [B, V] float32, of the last prompt token
  scores: jax.Array  # [B, T] float32 selection score of each token
  selected: jax.Array  # [B, T] bool: recomputed in the sparse layers


jax.tree_util.register_dataclass(PrefillOutput, data_fields=["logits", "scores", "selected"],
                                 meta_fields=[])


def assemble(pool, src_slots, dst_slots, delta, inv_freq, first_layer=0, backend="auto"):
  """Copies K/V of layers [first_layer, L) from src_slots to dst_slots [B, T], rotating K by
  delta [B, T] (sentinel dst: nothing written). One pass over the reused K/V with the kernel."""
  k, v = ops.assemble_kv(pool["k"], pool["v"], src_slots, dst_slots, delta, inv_freq,
                         first_layer, backend=backend)
  return {"k": k, "v": v}


def select_top_k(score, candidates, n_select):
  """The n_select[b] highest-scoring candidates of each row (ties: earlier position first)."""
  ranked = jnp.argsort(-jnp.where(candidates, score, -jnp.inf), axis=1, stable=True)
  rank = jnp.argsort(ranked, axis=1)
  return candidates & (rank < n_select[:, None])


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
    out = ops.causal_attention(take(q, q_rows), keys(pool["k"]), keys(pool["v"]),
                               sm_scale=cfg.sm_scale, backend=spec.backend)
    return finish(take(out, jnp.clip(positions, 0, n_keys - 1)), positions)
  return attend



@functools.partial(jax.tree_util.register_dataclass, data_fields=["x", "x_prev"],
                   meta_fields=[])
@dataclasses.dataclass
class FullLayersOutput:
  x: jax.Array  # [B, T, D] the input of layer T
  x_prev: jax.Array | None  # [B, T, D] the input of layer T - 1, for scorers that probe it


def _full_layers(pool, params, batch: PrefillBatch, cfg: ModelConfig, spec: PrefillSpec):
  """Stage 1 -> (pool, FullLayersOutput)."""
  t_full, n_layers = spec.layer_threshold, cfg.n_layers
  layers = params["layers"]
  positions, slots = batch.positions, batch.slots
  x = llama.embed(params, batch.tokens)

  # Every non-exact token is a query. Layer T - 1 runs on its own where the scorer reads its
  # attention, so that its input stays (inside one scan with the scoring, XLA added 69 device
  # copies per prefill, 8 ms at 8K on the H100: docs/quality.md, round 8).
  dense = spec.full_attention == "dense"
  full_attend = (_dense_attention(cfg, batch, spec, pool["k"].shape[3]) if dense
                 else _paged_attention(cfg, batch, spec.backend))

  def full_layers(first, stop, x, pool):
    x, pool, _ = scan_layers(layers, cfg, first, x, positions, slots, pool, full_attend,
                             pass_kv=dense, stop_layer=stop, write_backend=spec.backend,
                             ffn_backend=spec.backend)
    return x, pool

  x_prev = None
  if 0 < t_full < n_layers and spec.scorer is not None and spec.scorer.uses_probe:
    x, pool = full_layers(0, t_full - 1, x, pool)
    x_prev = x
    x, pool = full_layers(t_full - 1, t_full, x, pool)
  else:
    x, pool = full_layers(0, t_full, x, pool)
  return pool, FullLayersOutput(x, x_prev)


def _rest(pool, params, batch: PrefillBatch, full: FullLayersOutput, cfg: ModelConfig,
          spec: PrefillSpec):
  """Stages 2-6 -> (pool, PrefillOutput)."""
  t_full, n_layers = spec.layer_threshold, cfg.n_layers
  layers = params["layers"]
  positions, slots = batch.positions, batch.slots
  b, t = positions.shape
  x = full.x
  scores = jnp.zeros((b, t), jnp.float32)
  selected = jnp.zeros((b, t), bool)
  if t_full == n_layers:
    x_last = take(x, batch.last_index[:, None])[:, 0]
    return pool, PrefillOutput(llama.logits(params, cfg, x_last), scores, selected)

  # 2. assemble
  if spec.assemble:
    dst = jnp.where(batch.reused, batch.slots, pool_sentinel(pool))
    pool = assemble(pool, batch.src_slots, dst, batch.delta, llama.rope_inv_freq(cfg),
                    t_full, spec.backend)

  # 3. score
  if spec.scorer is not None:
    inputs = ScoringInputs(cfg=cfg, layers=layers, batch=batch, layer_threshold=t_full,
                           x_prev=full.x_prev, x=x, n_probe=spec.n_probe, backend=spec.backend)
    scores, pool = spec.scorer(inputs, pool)
  else:
    scores = batch.given_score

  # 4. select
  candidates = batch.reused & ~batch.sparse_q
  selected = select_top_k(jnp.where(batch.forced, jnp.inf, scores), candidates, batch.n_select)

  # 5. the sparse layers, on the active tokens only
  paged = _paged_attention(cfg, batch, spec.backend)
  idx, valid = compact(batch.sparse_q | selected, spec.n_active)
  x, pool, _ = scan_layers(layers, cfg, t_full, take(x, idx),
                           jnp.where(valid, take(positions, idx), -1),
                           jnp.where(valid, take(slots, idx), pool_sentinel(pool)), pool, paged,
                           stop_layer=n_layers, write_backend=spec.backend,
                           ffn_backend=spec.backend)
  # 6. The last prompt token is always active and has the highest position: the last valid row.
  last = jnp.sum(valid, axis=1) - 1
  x_last = take(x, last[:, None])[:, 0]
  return pool, PrefillOutput(llama.logits(params, cfg, x_last), scores, selected)


_JIT = dict(static_argnames=("cfg", "spec"), donate_argnames=("pool",),
            compiler_options=COMPILER_OPTIONS)


@functools.partial(jax.jit, **_JIT)
def prefill(pool, params, batch: PrefillBatch, *, cfg: ModelConfig, spec: PrefillSpec):
  """One prefill program -> (pool, PrefillOutput)."""
  pool, full = _full_layers(pool, params, batch, cfg, spec)
  return _rest(pool, params, batch, full, cfg, spec)


@functools.partial(jax.jit, **_JIT)
def prefill_full_layers(pool, params, batch: PrefillBatch, *, cfg: ModelConfig,
                        spec: PrefillSpec):
  """The first half of `prefill` (stage 1) -> (pool, FullLayersOutput)."""
  return _full_layers(pool, params, batch, cfg, spec)


@functools.partial(jax.jit, **_JIT)
def prefill_rest(pool, params, batch: PrefillBatch, full: FullLayersOutput, *,
                 cfg: ModelConfig, spec: PrefillSpec):
  """The second half of `prefill` (stages 2-6) -> (pool, PrefillOutput)."""
  return _rest(pool, params, batch, full, cfg, spec)
