"""Ref-counted page allocator for the paged KV pool (host side: plain numpy, never traced).

The device pool holds `num_pages` pages of `page_size` token slots each (see docs/CONTRACTS.md).
This module only decides which page ids are in use; it never touches KV values.

- Page 0 is the null page. It is never handed out, so page tables can be padded with 0 and the
  padding always names a valid page (masked by kv_len on the device). Capacity is num_pages - 1.
- Every page in use has a reference count: one per holder (a live request, the prefix cache, the
  segment cache). A page returns to the free list when its count drops to 0.
- Caches register evictors. When `allocate` finds too few free pages it asks them, in registration
  order, to drop entries that nobody else references, before it gives up with PoolExhausted.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

NULL_PAGE = 0

# evictor(n_pages_needed) -> n_pages_freed; reclaimable() -> how many it could free right now.
Evictor = Callable[[int], int]
Reclaimable = Callable[[], int]


class PoolExhausted(RuntimeError):
  """Not enough KV pages, even after evicting every cached page that no live request holds."""

  def __init__(self, needed: int, num_free: int, capacity: int, reclaimable: int | None = None):
    self.needed = needed
    self.num_free = num_free
    self.capacity = capacity
    self.reclaimable = reclaimable
    if reclaimable is None:
      evicted = "after evicting every unreferenced cached page"
    else:
      evicted = f"and only {reclaimable} more could be evicted from the caches; nothing was evicted"
    super().__init__(
        f"KV page pool exhausted: {needed} pages needed, {num_free} free of {capacity} "
        f"({evicted}). Use a bigger pool (more pages), or run fewer or shorter requests "
        f"at once.")


def as_page_array(pages) -> np.ndarray:
  """Page ids (int, list or array) as a flat int64 array, for validation before any mutation."""
  return np.asarray(pages, dtype=np.int64).reshape(-1)


class PageAllocator:
  """Hands out page ids with reference counts. Page 0 is reserved as the null page."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is the reserved null page), "
                       f"got {num_pages}")
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    self.num_pages = int(num_pages)
    self.page_size = int(page_size)
    self._refcount = np.zeros(self.num_pages, np.int32)
    self._is_free = np.ones(self.num_pages, bool)
    self._is_free[NULL_PAGE] = False
    # A stack, reversed so a fresh allocator hands out 1, 2, 3, ...: page tables of a fresh pool
    # read naturally in logs and tests. Freed pages are reused first (LIFO).
    self._free: list[int] = list(range(self.num_pages - 1, NULL_PAGE, -1))
    self._evictors: list[tuple[Evictor, Reclaimable | None]] = []
    self.peak_used = 0  # most pages in use at once since the last reset_peak (benchmarks)

  # ---- capacity ----

  @property
  def capacity(self) -> int:
    """Pages that can ever be handed out (num_pages - 1: the null page is reserved)."""
    return self.num_pages - 1

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return self.capacity - len(self._free)

  def num_reclaimable(self) -> int | None:
    """Pages the evictors could free now, or None when some evictor cannot say."""
    total = 0
    for _, reclaimable in self._evictors:
      if reclaimable is None:
        return None
      total += int(reclaimable())
    return total

  def num_available(self) -> int:
    """Free pages plus pages evictable now: what `allocate` can deliver (admission control).

    An evictor without a reclaimable() estimate counts as 0 here.
    """
    return self.num_free + sum(int(r()) for _, r in self._evictors if r is not None)

  # ---- allocation ----

  def add_evictor(self, evictor: Evictor, reclaimable: Reclaimable | None = None) -> None:
    """Registers a cache's evictor; they run in registration order when pages run short.

    With `reclaimable` from every evictor, a failing `allocate` evicts nothing (it checks first).
    """
    self._evictors.append((evictor, reclaimable))

  def allocate(self, n: int) -> np.ndarray:
    """n fresh pages (int32 [n]), each with refcount 1; evicts cached pages first if needed.

    Raises PoolExhausted, with no page allocated, when even eviction cannot make n pages free.
    """
    n = int(n)
    if n < 0:
      raise ValueError(f"cannot allocate a negative number of pages ({n})")
    if n > len(self._free):
      self._evict_for(n)
    if n > len(self._free):
      raise PoolExhausted(n, len(self._free), self.capacity)
    # The last n of the free list, most recently freed first (as n pops would give them): one
    # slice, not a Python loop over the 2K pages of a 32K-token request.
    start = len(self._free) - n
    out = np.asarray(self._free[start:][::-1], np.int32)
    del self._free[start:]
    self._refcount[out] = 1
    self._is_free[out] = False
    self.peak_used = max(self.peak_used, self.num_used)
    return out

  def reset_peak(self) -> None:
    self.peak_used = self.num_used

  def _evict_for(self, n: int) -> None:
    reclaimable = self.num_reclaimable()
    # Evicting and then failing anyway would throw cached KV away for nothing (a scheduler may
    # probe allocate() every step while the pool is full), so fail before evicting when we can tell.
    if reclaimable is not None and len(self._free) + reclaimable < n:
      raise PoolExhausted(n, len(self._free), self.capacity, reclaimable)
    for evictor, _ in self._evictors:
      short = n - len(self._free)
      if short <= 0:
        break
      evictor(short)

  # ---- reference counts ----

  def _check_ids(self, arr: np.ndarray, what: str) -> None:
    bad = arr[(arr <= NULL_PAGE) | (arr >= self.num_pages)]
    if bad.size:
      raise ValueError(f"{what}: page ids must be in [1, {self.num_pages}), got {bad[:8].tolist()}"
                       f" (page 0 is the reserved null page)")

  def incref(self, pages) -> None:
    """One more holder for each listed page (repeats count twice). Pages must be in use."""
    arr = as_page_array(pages)
    if arr.size == 0:
      return
    self._check_ids(arr, "incref")
    free = arr[self._is_free[arr]]
    if free.size:
      raise ValueError(f"incref of free page(s) {np.unique(free)[:8].tolist()}: allocate first")
    np.add.at(self._refcount, arr, 1)

  def decref(self, pages) -> int:
    """One holder fewer for each listed page; returns how many pages became free.

    Checked before any change: a decref below 0 (of a free page) raises and changes nothing.
    """
    arr = as_page_array(pages)
    if arr.size == 0:
      return 0
    self._check_ids(arr, "decref")
    # Work in the listed pages only, never over the whole pool: a pass over 24K refcounts cost
    # 33 us per call, paid per page when evictions released one block at a time.
    pages, counts = np.unique(arr, return_counts=True)
    held = self._refcount[pages]
    over = pages[counts > held]
    if over.size:
      raise ValueError(f"decref of free page(s) {over[:8].tolist()} (refcounts "
                       f"{self._refcount[over[:8]].tolist()}): double free")
    left = held - counts.astype(np.int32)
    self._refcount[pages] = left
    freed = pages[left == 0]
    self._is_free[freed] = True
    self._free.extend(freed.tolist())
    return int(freed.size)

  def refcount(self, page: int) -> int:
    """Holders of `page` (0 when free; the null page is always 0)."""
    return int(self._refcount[int(page)])

  def refcounts(self, pages) -> np.ndarray:
    """Holders of each listed page (int32), vectorised for the caches' eviction scans."""
    return self._refcount[as_page_array(pages)]

  # ---- checks and stats ----

  def check_invariants(self) -> None:
    """Raises AssertionError if the free list and the reference counts disagree."""

    def check(cond, msg):
      if not cond:
        raise AssertionError(msg)

    free = np.asarray(self._free, np.int64)
    check(len(set(self._free)) == len(self._free), "a page is on the free list twice")
    check(not np.any(free == NULL_PAGE), "the null page is on the free list")
    check(not self._is_free[NULL_PAGE] and self._refcount[NULL_PAGE] == 0,
          "the null page is marked free or referenced")
    mask = np.zeros(self.num_pages, bool)
    mask[free] = True
    check(np.array_equal(mask, self._is_free), "free list and free mask disagree")
    check(np.all(self._refcount >= 0), "negative refcount")
    check(np.all(self._refcount[free] == 0), "a free page is referenced")
    used = ~self._is_free
    used[NULL_PAGE] = False
    check(np.all(self._refcount[used] >= 1), "a page in use has refcount 0 (leaked)")
    check(self.num_free + self.num_used == self.capacity, "free + used != capacity")

  def stats(self, bytes_per_page: int = 0) -> dict:
    """Pool occupancy as a plain dict (bytes are pages * bytes_per_page, K and V of all layers)."""
    return {
        "capacity_pages": self.capacity,
        "pages_used": self.num_used,
        "pages_free": self.num_free,
        "peak_pages_used": self.peak_used,
        "bytes_used": self.num_used * bytes_per_page,
        "bytes_free": self.num_free * bytes_per_page,
        "bytes_capacity": self.capacity * bytes_per_page,
    }
