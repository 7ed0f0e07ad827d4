"""The KV pool's geometry and slot arithmetic, in one place.

The pool holds, for K and V each, [L, K, P, S, H]: layers, kv heads, pages, page size, head dim.
A request's token at absolute position j lives in page page_table[j // S], offset j % S, i.e. at
the flat slot page_table[j // S] * S + j % S. Slots of padding tokens are the out-of-range
sentinel P * S, whose writes are dropped (`.at[].set(mode="drop")`; a -1 would wrap).

Everything here is plain integer arithmetic, so the same helpers serve host numpy arrays (the
planner, the caches) and traced jax arrays (the device programs).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from models.config import ModelConfig

DEFAULT_POOL_BYTES = 1 << 30


def slot_of(page_table, positions, page_size: int):
  """Flat pool slots of `positions` in a request whose pages are `page_table` (same leading
  dims: [n_pages] with [n], or [B, n_pages] with [B, n])."""
  page_index = positions // page_size
  if page_table.ndim == 1:
    pages = page_table[page_index]
  else:  # row b of positions indexes row b of the table (numpy and jax alike)
    rows = np.arange(page_table.shape[0]).reshape((-1,) + (1,) * (page_index.ndim - 1))
    pages = page_table[rows, page_index]
  return pages * page_size + positions % page_size


def page_and_offset(slots, page_size: int):
  """The inverse of slot_of: (page, offset) of flat slots."""
  return slots // page_size, slots % page_size


def page_bucket(n_pages: int, steps_per_octave: int = 1) -> int:
  """The page count a copy of n_pages is padded to, so that the copy programs compile once per
  bucket: a power of two (steps_per_octave=1, up to 100% padding) or steps_per_octave sizes per
  octave (4: at most 25% padding, for the host tier, whose copies are kept padded)."""
  n = max(1, int(n_pages))
  step = max(1, (1 << (n.bit_length() - 1)) // steps_per_octave)
  return -(-n // step) * step


def layer_cuts(n_layers: int, split_layer: int) -> list[int]:
  """Where the host tier cuts a page's layers: [0, split, L] for 0 < split < L (layers [0, T)
  and [T, L) kept apart, so a load can copy [T, L) alone), else [0, L]."""
  return [0, split_layer, n_layers] if 0 < split_layer < n_layers else [0, n_layers]


def pad_pages(x, n: int) -> np.ndarray:
  """K or V [L, K, n_pages, S, H] with zero pages up to n (a no-op when it has n)."""
  x = np.asarray(x)
  if x.shape[2] == n:
    return x
  return np.pad(x, [(0, 0), (0, 0), (0, n - x.shape[2]), (0, 0), (0, 0)])


@dataclasses.dataclass(frozen=True)
class PoolLayout:
  """Pages, page size and per-page bytes of one engine's pool."""

  num_pages: int
  page_size: int
  bytes_per_page: int

  @classmethod
  def for_model(cls, cfg: ModelConfig, *, page_size: int = 16, num_pages: int | None = None,
                kv_pool_bytes: int | None = None) -> "PoolLayout":
    """A pool of `num_pages`, or as many pages as `kv_pool_bytes` (default 1 GiB) holds."""
    if page_size < 1 or page_size & (page_size - 1):
      raise ValueError(f"page_size must be a power of two, got {page_size}")
    itemsize = np.dtype(cfg.jnp_dtype).itemsize
    bytes_per_page = 2 * cfg.n_layers * cfg.n_kv_heads * page_size * cfg.head_dim * itemsize
    if num_pages is None:
      num_pages = max(8, (kv_pool_bytes or DEFAULT_POOL_BYTES) // bytes_per_page)
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
    return cls(int(num_pages), int(page_size), int(bytes_per_page))

  @property
  def sentinel(self) -> int:
    """The slot padding tokens write to: one past the last slot, so the write is dropped."""
    return self.num_pages * self.page_size

  def pages_for(self, n_tokens: int) -> int:
    return math.ceil(n_tokens / self.page_size)

  def slot_of(self, page_table, positions):
    return slot_of(page_table, positions, self.page_size)

  def pool_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    return (cfg.n_layers, cfg.n_kv_heads, self.num_pages, self.page_size, cfg.head_dim)
