"""The decode programs over the paged pool: one step (decode_step), and many steps in one program
(decode_loop), the loop the engine runs.

decode_loop keeps the whole step on the device: the K/V write, attention, sampling with the row's
own key, the stop-token and length checks, for up to `steps` tokens per call, so the host visits
once per chunk of tokens instead of once per token. A row's key at output step i is
fold_in(PRNGKey(seed), i) with i counted per row (its n_generated), so a request samples the same
tokens whatever its batch, its row, the step its batch was at when it joined, or `steps`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from models import llama
from models.config import ModelConfig
from sparsex_jax.programs import kernels
from sparsex_jax.kv.layout import slot_of
from sparsex_jax.programs.options import COMPILER_OPTIONS
from sparsex_jax.programs.layers import pool_sentinel, scan_layers
from sparsex_jax.sampling import sample, step_keys

# How the decode programs loop over layers (programs/layers.py: scan_layers): "scan" over the
# stacked weights (the engine's); "unrolled" over static slices of them; "per_layer" over separate
# per-layer arrays (the caller passes params whose "layers" is a list, a copy that
# sparsex_jax/research/baselines.py makes). The other two are measured against "scan" by
# scripts/bench_throughput.py.
LAYER_LOOPS = ("scan", "unrolled", "per_layer")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tokens", "positions", "n_generated", "max_new_tokens", "done",
                                "stop_ids", "page_table", "temperature", "top_p", "seeds"],
                   meta_fields=[])
@dataclasses.dataclass
class DecodeRows:
  """The rows of a running batch, as the decode loop reads and returns them ([B] unless said).

  An empty row (no request) is done, with position 0 and a page table of null pages.
  """

  tokens: jax.Array  # int32: the last sampled token, the next step's input
  positions: jax.Array  # int32: that token's position (prompt length + n_generated - 1)
  n_generated: jax.Array  # int32: tokens sampled so far (the first included): the next key's step
  max_new_tokens: jax.Array  # int32
  done: jax.Array  # bool: stopped (stop token or length), or an empty row
  stop_ids: jax.Array  # [B, S] int32 stop tokens of each row, padded with -1
  page_table: jax.Array  # [B, MP] int32 pages of the prompt and max_new_tokens
  temperature: jax.Array  # float32
  top_p: jax.Array  # float32
  seeds: jax.Array  # uint32


def _logits(pool, params, cfg: ModelConfig, tokens, positions, slots, page_table, kv_len,
            backend: str, layer_loop: str):
  """One token per row through every layer: writes its K/V at slots -> (pool, logits [B, V])."""

  def attend(q, _, pool, layer):
    out = kernels.decode_attention(q[:, 0], pool["k"], pool["v"], page_table, kv_len,
                                   sm_scale=cfg.sm_scale, layer=layer, backend=backend)
    return out[:, None], None

  x, pool, _ = scan_layers(params["layers"], cfg, 0, llama.embed(params, tokens[:, None]),
                           positions[:, None], slots[:, None], pool, attend,
                           unroll=layer_loop == "unrolled", ffn_backend=backend)
  return pool, llama.logits(params, cfg, x[:, 0])


@functools.partial(jax.jit, static_argnames=("cfg", "backend", "layer_loop"),
                   donate_argnames=("pool",), compiler_options=COMPILER_OPTIONS)
def decode_step(pool, params, tokens, positions, slots, page_table, kv_len, temperature, top_p,
                seeds, step, *, cfg: ModelConfig, backend: str = "auto",
                layer_loop: str = "scan"):
  """tokens, positions, slots [B] (sentinel slot: a finished or padding row) -> (pool, next [B]).

  Sampling is per row: temperature, top_p, seeds [B]; the row's key is (seed, step). The engine
  runs decode_loop; this single step is the reference it is tested against.
  """
  pool, logits = _logits(pool, params, cfg, tokens, positions, slots, page_table, kv_len, backend,
                         layer_loop)
  return pool, sample(logits, temperature, top_p, step_keys(seeds, step))


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "backend", "layer_loop"),
                   donate_argnames=("pool",), compiler_options=COMPILER_OPTIONS)
def decode_loop(pool, params, rows: DecodeRows, min_active, *, cfg: ModelConfig, steps: int,
                backend: str = "auto", layer_loop: str = "scan"):
  """Up to `steps` decode steps of every row that is not done -> (pool, (rows, tokens)).

  tokens [B, steps] int32: row b's new tokens are tokens[b, :n] with n = rows'.n_generated[b] -
  rows.n_generated[b] (-1 after them). The loop ends early when every row is done, or when fewer
  than `min_active` (int32 scalar) rows are still running: the scheduler then fills the freed rows
  with waiting requests instead of letting them idle to the end of the chunk.
  """
  b, page_size = rows.tokens.shape[0], pool["k"].shape[3]
  last_position = rows.page_table.shape[1] * page_size - 1  # keeps done rows' lookups in range

  def running(carry):
    i, _, r, _ = carry
    return (i < steps) & (jnp.sum(~r.done) >= jnp.maximum(min_active, 1))

  def one_step(carry):
    i, pool, r, out = carry
    active = ~r.done
    position = jnp.minimum(r.positions, last_position)
    slots = jnp.where(active, slot_of(r.page_table, position[:, None], page_size)[:, 0],
                      pool_sentinel(pool))
    pool, logits = _logits(pool, params, cfg, r.tokens, jnp.where(active, r.positions, -1), slots,
                           r.page_table, r.positions + 1, backend, layer_loop)
    nxt = sample(logits, r.temperature, r.top_p, step_keys(r.seeds, r.n_generated))
    n_generated = r.n_generated + active
    stopped = jnp.any(nxt[:, None] == r.stop_ids, axis=1) | (n_generated >= r.max_new_tokens)
    r = dataclasses.replace(
        r, tokens=jnp.where(active, nxt, r.tokens), positions=r.positions + active,
        n_generated=n_generated, done=r.done | (active & stopped))
    out = jax.lax.dynamic_update_slice(out, jnp.where(active, nxt, -1)[:, None], (0, i))
    return i + 1, pool, r, out

  out = jnp.full((b, steps), -1, jnp.int32)
  _, pool, rows, out = jax.lax.while_loop(running, one_step, (jnp.int32(0), pool, rows, out))
  return pool, (rows, out)
