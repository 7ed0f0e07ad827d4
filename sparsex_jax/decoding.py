"""The decode loop: paged decode of a prefilled batch until every row stops.

Host side: one device step per token, stop tokens and lengths checked here. Rows that finished
(and padding rows) write to the sentinel slot, so their pages are never touched again.
"""

from __future__ import annotations

import numpy as np

from models.config import ModelConfig
from sparsex_jax.kv.layout import PoolLayout
from sparsex_jax.programs import KVPool
from sparsex_jax.programs.decode import decode_step
from sparsex_jax.sampling import finish, is_finished


def decode(pool: KVPool, params, cfg: ModelConfig, layout: PoolLayout, first: np.ndarray,
           prompt_lens: list[int], page_table: np.ndarray, *, max_new_tokens: list[int],
           stops: list[frozenset[int]], temperature: np.ndarray, top_p: np.ndarray,
           seeds: np.ndarray, backend: str = "auto") -> list[tuple[list[int], str]]:
  """Continues every real row (len(prompt_lens) of the padded batch) from its first sampled token.

  first, temperature, top_p, seeds: [B] over the padded batch; max_new_tokens and stops: per real
  row; page_table [B, MP] covers each row's prompt and max_new_tokens. Returns (tokens, finish
  reason) per real row.
  """
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
