"""What a reuse method's device scorer can read after the full layers, inside the prefill.

The prefill program (prefill.py) runs the full layers [0, T), then calls its spec's scorer with a
`ScoringInputs`: the hidden states entering layers T - 1 and T, the batch, and measurements a
scorer combines. Each measurement maps back to the tokens of the batch, [B, T] float32:

  attention(layer, ...)   the attention probability the scoring rows (batch.score_rows: the
                          Sparse-Q set, new tokens and the last prompt token, unless the method
                          names others) pay each token at a layer whose K/V are in the pool,
                          summed over those rows and over heads (SparseX's importance);
  layer0_attention(pool)  the same at layer 0 when T = 0 (no full layer ran: the scoring rows
                          run layer 0 alone, writing their K/V first);
  deviation(pool)         the squared distance of every token's fresh K/V at layer T from the
                          reused K/V the pool holds (CacheBlend's signal), optionally writing the
                          fresh K/V (exact for every token: the layers below ran in full).

Scorers are frozen dataclasses (static under jit) defined beside their methods in
sparsex_jax/reuse; this module knows nothing of them.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from models import llama
from models.config import ModelConfig
from sparsex_jax.programs import kernels as ops
from sparsex_jax.kv.layout import page_and_offset
from sparsex_jax.programs.layers import pool_sentinel, scan_layers, write_kv


def take(a, idx):
  """Gathers a [B, T, ...] along T with idx [B, A]."""
  return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def compact(mask, size: int):
  """Indices [B, size] of the True entries of mask [B, T] in order, and which are real."""
  t = mask.shape[1]
  order = jnp.arange(t, dtype=jnp.int32)
  idx = jnp.argsort(jnp.where(mask, order, t + order), axis=1)[:, :size].astype(jnp.int32)
  return idx, take(mask, idx)


def token_scores(importance, positions):
  """Per-token score [B, T] from per-key-position importance [B, MP*S]."""
  return jnp.take_along_axis(importance, jnp.clip(positions, 0, importance.shape[-1] - 1), axis=1)


@dataclasses.dataclass
class ScoringInputs:
  """The state of one prefill after its full layers [0, T), and the measurements on it."""

  cfg: ModelConfig
  layers: dict  # the stacked layer weights
  batch: "object"  # prefill.PrefillBatch
  layer_threshold: int  # T
  x_prev: jax.Array | None  # [B, T, D] input of layer T - 1 (None at T = 0)
  x: jax.Array  # [B, T, D] input of layer T (exact for every token: the layers below ran in full)
  n_probe: int  # bucketed size of the scoring rows
  backend: str

  def _probe(self):
    return compact(self.batch.score_rows, self.n_probe)

  def _layer(self, layer: int):
    return jax.tree.map(lambda w: w[layer], self.layers)

  def _importance(self, q, positions, rows, lse, pool, layer):
    batch = self.batch
    return ops.importance(q, positions, rows, pool["k"], batch.page_table, batch.kv_len, lse,
                          sm_scale=self.cfg.sm_scale, layer=layer, backend=self.backend)

  def attention(self, layer: int, x_in, pool):
    """The scoring rows' attention at `layer` (its K/V in the pool), per token [B, T]; their
    queries from the layer's input x_in for those rows only, their log-sum-exp recomputed by
    the sparse-query kernel on those rows (a few queries: cheap next to a layer)."""
    batch, cfg = self.batch, self.cfg
    idx, valid = self._probe()
    q, _, _ = llama.layer_qkv(self._layer(layer), cfg, take(x_in, idx),
                              jnp.where(valid, take(batch.positions, idx), 0))
    positions = jnp.where(valid, take(batch.positions, idx), -1)
    _, lse = ops.attention(q, positions, pool["k"], pool["v"], batch.page_table, batch.kv_len,
                           sm_scale=cfg.sm_scale, layer=layer, backend=self.backend)
    importance = self._importance(q, positions, valid, lse, pool, layer)
    return token_scores(importance, batch.positions)

  def layer0_attention(self, pool):
    """T = 0: the scoring rows run layer 0 alone (writing their K/V, which the sparse layers
    write again with the same values) and their attention over every token is read. The pool
    is returned so the update stays in place (dropping it would force a copy of the pool)."""
    batch, cfg = self.batch, self.cfg
    idx, valid = self._probe()
    positions = jnp.where(valid, take(batch.positions, idx), -1)
    slots = jnp.where(valid, take(batch.slots, idx), pool_sentinel(pool))

    def attend(q, positions, pool, layer):
      return ops.attention(q, positions, pool["k"], pool["v"], batch.page_table, batch.kv_len,
                           sm_scale=cfg.sm_scale, layer=layer, backend=self.backend)

    def score(q, positions, lse, pool, layer):
      return self._importance(q, positions, valid, lse, pool, layer)

    n_keys = batch.page_table.shape[1] * pool["k"].shape[3]
    importance = jnp.zeros((batch.positions.shape[0], n_keys), jnp.float32)
    _, pool, importance = scan_layers(self.layers, cfg, 0, take(self.x, idx), positions, slots,
                                      pool, attend, score, importance, stop_layer=1,
                                      write_backend=self.backend, ffn_backend=self.backend)
    return token_scores(importance, batch.positions), pool

  def deviation(self, pool, refresh: bool = False):
    """Squared distance [B, T] of every token's fresh K/V at layer T from the pool's (summed
    over kv heads and dims). refresh: write the fresh K/V of every token at layer T."""
    batch, t = self.batch, self.layer_threshold
    _, k, v = llama.layer_qkv(self._layer(t), self.cfg, self.x, batch.positions)
    page, offset = page_and_offset(batch.slots, pool["k"].shape[3])
    page = jnp.clip(page, 0, pool["k"].shape[2] - 1)
    k_old = pool["k"][t][:, page, offset].transpose(1, 2, 0, 3)  # [B, T, K, H]
    v_old = pool["v"][t][:, page, offset].transpose(1, 2, 0, 3)
    dk = (k.astype(jnp.float32) - k_old.astype(jnp.float32)) ** 2
    dv = (v.astype(jnp.float32) - v_old.astype(jnp.float32)) ** 2
    if refresh:
      pool = write_kv(pool, t, batch.slots, k, v, self.backend)
    return jnp.sum(dk + dv, axis=(2, 3)), pool


class DeviceScorer(Protocol):
  """scorer(inputs, pool) -> (scores [B, T] float32, pool). Frozen and hashable (static)."""

  uses_probe: bool  # reads the Sparse-Q rows (the planner sizes the probe)

  def __call__(self, inputs: ScoringInputs, pool) -> tuple[jax.Array, dict]: ...
