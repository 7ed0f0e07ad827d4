"""The copy program: K/V of every layer from some pool slots to others, unchanged (the KV store
moves a segment computed in context into pages of its own)."""

from __future__ import annotations

import functools

import jax

from sparsex_jax.programs.layers import gather_kv, scatter_kv


@functools.partial(jax.jit, donate_argnames=("pool",))
def copy_slots(pool, src_slots, dst_slots):
  """Copies K/V of every layer from src_slots to dst_slots [B, T] -> (pool, None).

  Sentinel dst slots are dropped; src slots must be valid (pad them with any real slot).
  """
  k, v = gather_kv(pool, src_slots)
  return scatter_kv(pool, dst_slots, k, v), None
