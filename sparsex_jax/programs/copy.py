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


@functools.partial(jax.jit, donate_argnames=("pool",))
def read_pages(pool, pages):
  """K and V of whole pages [n] of every layer -> (pool, (k, v)), each [L, K, n, S, H].

  The pool is returned unchanged (donated and aliased, so reading does not copy the pool). Pad
  `pages` with the null page 0; the caller drops those rows.
  """
  return pool, (pool["k"][:, :, pages], pool["v"][:, :, pages])


@functools.partial(jax.jit, donate_argnames=("pool",))
def write_pages(pool, pages, k, v):
  """Writes K and V [L, K, n, S, H] into whole pages [n] -> (pool, None).

  Pad `pages` with num_pages (out of range): those writes are dropped (a -1 would wrap).
  """
  return {"k": pool["k"].at[:, :, pages].set(k.astype(pool["k"].dtype), mode="drop"),
          "v": pool["v"].at[:, :, pages].set(v.astype(pool["v"].dtype), mode="drop")}, None


@functools.partial(jax.jit, static_argnames=("first_layer",), donate_argnames=("pool",))
def write_page_layers(pool, pages, k, v, k_scale, v_scale, *, first_layer):
  """Writes layers [first_layer, L) of whole pages [n] -> (pool, None) (the host tier's load).

  k, v: one array per layer [K, n, S, H] (a sequence of L - first_layer), in the pool's dtype or
  8-bit with float32 scales [K, n, S, 1] (None for no scale), dequantised here on the device so
  that only the 8-bit values cross to it. Layers [0, first_layer) of those pages are left as they
  are. Pad `pages` with num_pages (out of range): those writes are dropped.
  """
  def restore(xs, scales, dtype):
    x = jax.numpy.stack(xs)
    if scales is None:
      return x.astype(dtype)
    return (x.astype(jax.numpy.float32) * jax.numpy.stack(scales)).astype(dtype)

  return {"k": pool["k"].at[first_layer:, :, pages].set(
              restore(k, k_scale, pool["k"].dtype), mode="drop"),
          "v": pool["v"].at[first_layer:, :, pages].set(
              restore(v, v_scale, pool["v"].dtype), mode="drop")}, None
