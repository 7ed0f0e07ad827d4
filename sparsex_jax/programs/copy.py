"""The copy program: K/V of every layer from some pool slots to others, unchanged (the KV store
moves a segment computed in context into pages of its own)."""

from __future__ import annotations

import functools

import jax

from sparsex_jax.kv.layout import layer_cuts
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


@functools.partial(jax.jit, static_argnames=("split_layer",), donate_argnames=("pool",))
def read_page_layers(pool, pages, *, split_layer):
  """K and V of whole pages [n], cut along the layers as the host tier keeps them -> (pool,
  (k_parts, v_parts)): ([0, split), [split, L)) for 0 < split_layer < L, else (all,). Each part
  [l, K, n, S, H]. Pad `pages` with the null page 0 (those rows are never loaded back)."""
  cuts = layer_cuts(pool["k"].shape[0], split_layer)

  def parts(x):
    return tuple(x[lo:hi][:, :, pages] for lo, hi in zip(cuts, cuts[1:]))

  return pool, (parts(pool["k"]), parts(pool["v"]))


@functools.partial(jax.jit, donate_argnames=("pool",))
def write_pages(pool, pages, k, v):
  """Writes K and V [L, K, n, S, H] into whole pages [n] -> (pool, None).

  Pad `pages` with num_pages (out of range): those writes are dropped (a -1 would wrap).
  """
  return {"k": pool["k"].at[:, :, pages].set(k.astype(pool["k"].dtype), mode="drop"),
          "v": pool["v"].at[:, :, pages].set(v.astype(pool["v"].dtype), mode="drop")}, None


@functools.partial(jax.jit, static_argnames=("first_layer", "start_layer", "end_layer"),
                   donate_argnames=("pool",))
def write_page_layers(pool, pages, k, v, k_scale, v_scale, *, first_layer, start_layer,
                      end_layer):
  """Writes layers [first_layer, end_layer) of whole pages [n] -> (pool, None) (the host tier's
  load).

  k, v: what the load staged of a host-tier segment or run, one or two arrays [l, K, n, S, H] of
  consecutive layers from start_layer on (the host tier keeps K and V cut at its split layer),
  in the pool's dtype or 8-bit with float32 scales [l, K, n, S, 1] cut the same way (None for no
  scale), dequantised here on the device so that only the 8-bit values cross to it. Staged
  layers outside [first_layer, end_layer) (a threshold above the split) are sliced off here:
  jax has no view of part of a host array, so a slice before the copy would be a host copy per
  load. The pages' other layers are left as they are. Pad `pages` with num_pages (out of
  range): those writes are dropped.
  """
  def write(dst, parts, scales):
    stop = start_layer + sum(part.shape[0] for part in parts)
    if start_layer > first_layer or stop < end_layer:
      raise ValueError(f"staged layers [{start_layer}, {stop}) miss some of "
                       f"[{first_layer}, {end_layer})")
    start = start_layer
    for i, part in enumerate(parts):
      end = start + part.shape[0]
      lo, hi = max(start, first_layer), min(end, end_layer)
      if lo < hi:
        x = part[lo - start:hi - start]
        if scales is not None:
          x = x.astype(jax.numpy.float32) * scales[i][lo - start:hi - start]
        dst = dst.at[lo:hi, :, pages].set(x.astype(dst.dtype), mode="drop")
      start = end
    return dst

  return {"k": write(pool["k"], k, k_scale), "v": write(pool["v"], v, v_scale)}, None
