"""The host side of decoding: one device decode loop over a RunningBatch.

`visit` runs one decode_loop (up to `steps_per_visit` tokens per row, stop tokens and lengths
checked on the device) and hands its tokens to the batch. The per-token host loop it replaced,
and static batching's decode to the end, are kept as references in
sparsex_jax/research/baselines.py.
"""

from __future__ import annotations

import jax
import numpy as np

from models.config import ModelConfig
from sparsex_jax.batching import RunningBatch
from sparsex_jax.programs import KVPool
from sparsex_jax.programs.decode import decode_loop

STEPS_PER_VISIT = 32


def visit(pool: KVPool, params, cfg: ModelConfig, batch: RunningBatch, *,
          steps_per_visit: int = STEPS_PER_VISIT, min_active: int = 1,
          backend: str = "auto") -> int:
  """One device loop over the batch's running rows; returns the tokens it generated.

  The loop ends after steps_per_visit steps, when every row is done, or when fewer than
  min_active rows still run (the caller has requests waiting for rows).
  """
  rows, tokens = pool.run(decode_loop, params, batch.device_rows(), np.int32(min_active), cfg=cfg,
                          steps=int(steps_per_visit), backend=backend)
  # One transfer for the whole output (rows and tokens), not one per field.
  return batch.advance(*jax.device_get((rows, tokens)))
