"""The host side of decoding: device loops over a RunningBatch, and the old per-token loop.

`visit` runs one decode_loop (up to `steps_per_visit` tokens per row, stop tokens and lengths
checked on the device) and hands its tokens to the batch. `decode` decodes a prefilled static
batch to the end that way. `decode_per_step` is the loop the engine used before: one device step
per token, stops checked on the host; it stays as the reference the device loop is tested
against (token for token).
"""

from __future__ import annotations

import jax
import numpy as np

from models.config import ModelConfig
from sparsex_jax.batching import DecodingRequest, RunningBatch, stop_width
from sparsex_jax.kv.layout import PoolLayout
from sparsex_jax.programs import KVPool
from sparsex_jax.programs.decode import decode_loop, decode_step
from sparsex_jax.sampling import finish, is_finished

STEPS_PER_VISIT = 32


def visit(pool: KVPool, params, cfg: ModelConfig, batch: RunningBatch, *,
          steps_per_visit: int = STEPS_PER_VISIT, min_active: int = 1, backend: str = "auto",
          layer_loop: str = "scan") -> int:
  """One device loop over the batch's running rows; returns the tokens it generated.

  The loop ends after steps_per_visit steps, when every row is done, or when fewer than
  min_active rows still run (the caller has requests waiting for rows).
  """
  rows, tokens = pool.run(decode_loop, params, batch.device_rows(), np.int32(min_active), cfg=cfg,
                          steps=int(steps_per_visit), backend=backend, layer_loop=layer_loop)
  # One transfer for the whole output (rows and tokens), not one per field.
  return batch.advance(*jax.device_get((rows, tokens)))


def decode(pool: KVPool, params, cfg: ModelConfig, layout: PoolLayout, first: np.ndarray,
           prompt_lens: list[int], page_table: np.ndarray, *, max_new_tokens: list[int],
           stops: list[frozenset[int]], temperature: np.ndarray, top_p: np.ndarray,
           seeds: np.ndarray, backend: str = "auto", steps_per_visit: int = STEPS_PER_VISIT,
           layer_loop: str = "scan") -> list[tuple[list[int], str]]:
  """Continues every real row (len(prompt_lens) of the padded batch) from its first sampled token
  with device loops, until every row stops (static batching: nobody joins).

  first, temperature, top_p, seeds: [B] over the padded batch; max_new_tokens and stops: per real
  row; page_table [B, MP] covers each row's prompt and max_new_tokens. Returns (tokens, finish
  reason) per real row.
  """
  n_real, b = len(prompt_lens), first.shape[0]
  batch = RunningBatch(b, page_table.shape[1], stop_width(stops), layout)
  seqs = [DecodingRequest(i, [int(first[i])], stops[i], max_new_tokens[i])
          for i in range(n_real)]
  for i, seq in enumerate(seqs):
    if not seq.done:
      batch.join(seq, prompt_lens[i], page_table[i], temperature=float(temperature[i]),
                 top_p=float(top_p[i]), seed=int(seeds[i]))
  while batch.n_running:
    visit(pool, params, cfg, batch, steps_per_visit=steps_per_visit, backend=backend,
          layer_loop=layer_loop)
    batch.finished()
  return [seq.result() for seq in seqs]


def decode_per_step(pool: KVPool, params, cfg: ModelConfig, layout: PoolLayout,
                    first: np.ndarray, prompt_lens: list[int], page_table: np.ndarray, *,
                    max_new_tokens: list[int], stops: list[frozenset[int]],
                    temperature: np.ndarray, top_p: np.ndarray, seeds: np.ndarray,
                    backend: str = "auto") -> list[tuple[list[int], str]]:
  """As `decode`, one device step per token from the host (the reference)."""
  n_real, b = len(prompt_lens), first.shape[0]
  outs = [[int(first[i])] for i in range(n_real)]
  done = np.ones(b, bool)
  done[:n_real] = [is_finished(o, stops[i], max_new_tokens[i]) for i, o in enumerate(outs)]
  pos = np.zeros(b, np.int32)
  pos[:n_real] = prompt_lens
  tokens = np.zeros(b, np.int32)
  tokens[:n_real] = first[:n_real]
  last_slot = page_table.shape[1] * layout.page_size - 1  # keeps padding rows' lookups in range
  for step in range(1, max(max_new_tokens)):
    if done.all():
      break
    slots = layout.slot_of(page_table, np.minimum(pos, last_slot)[:, None])[:, 0]
    slots = np.where(done, layout.sentinel, slots).astype(np.int32)
    q_pos = np.where(done, -1, pos).astype(np.int32)
    nxt = np.asarray(pool.run(decode_step, params, tokens, q_pos, slots, page_table, pos + 1,
                              temperature, top_p, seeds, np.int32(step), cfg=cfg,
                              backend=backend))
    for i in range(n_real):
      if not done[i]:
        outs[i].append(int(nxt[i]))
        done[i] = is_finished(outs[i], stops[i], max_new_tokens[i])
    tokens = nxt.astype(np.int32)
    pos = pos + 1
  return [finish(o, stops[i]) for i, o in enumerate(outs)]
