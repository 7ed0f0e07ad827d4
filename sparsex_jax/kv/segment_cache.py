"""Segment cache: a segment's KV keyed by the content of its tokens, wherever it was computed.

Unlike the prefix cache, a hit here does not mean the KV is right for the new request: it was
computed at other positions (fixed exactly by re-rotating K) and after other context (approximated
by SparseX's sparse recomputation). So an entry records the absolute position each token's KV was
computed at (`positions`): position 0 onwards for a segment computed alone, its place in the
prompt for one computed in context.

Layout: a segment's tokens sit contiguously from offset 0 of its first page: token i lives in
pages[i // S] at offset i % S, so an n-token segment owns ceil(n / S) pages and shares none with
the request it was copied from (the engine copies a segment's KV out of a request's pages, since a
segment rarely starts at a page boundary there).

Reference counts live in the PageAllocator: the cache holds one reference on each page of each
entry. The prefill only reads an entry's pages (it gathers them into the request's pages), so a
request pins the entry instead of taking page references; pinned entries are never evicted.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import numpy as np

from sparsex_jax.kv.allocator import NULL_PAGE, PageAllocator, as_page_array
from sparsex_jax.kv.prefix_cache import (as_token_array, cache_counters, hash_tokens,
                                         namespace_root)


def segment_key(token_ids, namespace: str = "") -> str:
  """Content key of a segment: hex blake2b-128 of its int32 token ids (stable across runs),
  salted by its namespace (namespace_root)."""
  return hash_tokens(as_token_array(token_ids), namespace_root(namespace)).hex()


def _read_only(arr: np.ndarray) -> np.ndarray:
  arr = np.array(arr, copy=True)
  arr.flags.writeable = False
  return arr


@dataclasses.dataclass(eq=False)
class SegmentEntry:
  """One cached segment. Arrays are read-only copies; pin_count is the cache's."""

  key: str
  token_ids: np.ndarray  # int32 [n]
  pages: np.ndarray  # int32 [ceil(n / page_size)]; token i at pages[i // S], offset i % S
  positions: np.ndarray  # int32 [n]: the absolute position token i's KV was computed at
  pin_count: int = 0
  namespace: str = ""  # only requests of this namespace see the entry

  @property
  def num_tokens(self) -> int:
    return len(self.token_ids)


def find_exact(entries, token_ids, namespace: str = ""):
  """The entry of `entries` (key -> an object with .token_ids) for exactly these tokens, or None.
  A key is a content hash: an entry whose tokens differ (a collision) is not theirs. Shared by
  the pool's segment cache and the host tier."""
  tokens = as_token_array(token_ids)
  entry = entries.get(segment_key(tokens, namespace))
  if entry is None or not np.array_equal(entry.token_ids, tokens):
    return None
  return entry


class SegmentCache:
  """Content-hash -> SegmentEntry, with pinning and LRU eviction of cache-only entries."""

  def __init__(self, allocator: PageAllocator):
    self.allocator = allocator
    self.page_size = allocator.page_size
    # Least recently used first: the order is the LRU clock.
    self._entries: collections.OrderedDict[str, SegmentEntry] = collections.OrderedDict()
    self._num_pages = 0
    self.hits = 0  # lookups that found the segment
    self.misses = 0  # lookups that did not
    self.evictions = 0  # entries evicted (remove() does not count)
    # Called with each entry evict() is about to drop, while its pages still hold its K/V: the
    # KV store moves it down to the host tier (kv/host_tier.py). None: evicted entries are gone.
    self.on_evict: Callable[[SegmentEntry], None] | None = None
    allocator.add_evictor(self.evict, self.num_reclaimable)

  @property
  def num_entries(self) -> int:
    return len(self._entries)

  @property
  def num_pages(self) -> int:
    """Pages held by cached entries."""
    return self._num_pages

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def keys(self) -> list[str]:
    """Keys of the cached segments, least recently used first."""
    return list(self._entries)

  def get(self, key: str) -> SegmentEntry | None:
    """The entry under `key`, without counting a hit or touching the LRU order."""
    return self._entries.get(key)

  def cached_pages(self) -> np.ndarray:
    """All pages the cache holds a reference on (int32)."""
    if not self._entries:
      return np.zeros(0, np.int32)
    return np.concatenate([e.pages for e in self._entries.values()]).astype(np.int32)

  def _touch(self, entry: SegmentEntry) -> None:
    self._entries.move_to_end(entry.key)

  def lookup(self, token_ids, pin: bool = False, namespace: str = "") -> SegmentEntry | None:
    """The cached entry for exactly these tokens, or None. Counts a hit or miss; touches the LRU.

    pin=True pins a hit at once: do that (or pin() before the next allocate) when the entry must
    survive the allocation of the request's own pages, which may evict.
    """
    entry = find_exact(self._entries, token_ids, namespace)
    if entry is None:
      self.misses += 1
      return None
    self.hits += 1
    self._touch(entry)
    if pin:
      entry.pin_count += 1
    return entry

  def insert(self, token_ids, pages, positions, namespace: str = "") -> SegmentEntry:
    """Caches a segment whose KV the caller wrote to `pages` (token i at pages[i//S], i % S).

    The cache takes one reference on each page; the caller keeps its own and usually decrefs
    them right after. If the segment is already cached, nothing of the caller's is referenced or
    released and the existing entry is returned (touched). Validated before any change.
    """
    tokens = as_token_array(token_ids)
    n = len(tokens)
    if n == 0:
      raise ValueError("cannot cache an empty segment")
    key = segment_key(tokens, namespace)
    existing = self._entries.get(key)
    if existing is not None:
      if not np.array_equal(existing.token_ids, tokens):
        raise RuntimeError("segment-cache hash collision (blake2b-128): refusing to insert")
      self._touch(existing)
      return existing
    pages = as_page_array(pages)
    n_pages = -(-n // self.page_size)
    if len(pages) != n_pages:
      raise ValueError(f"a {n}-token segment needs exactly {n_pages} pages of {self.page_size} "
                       f"(stored from offset 0 of its first page), got {len(pages)}")
    if np.any(pages == NULL_PAGE):
      raise ValueError("cannot cache the null page 0")
    if len(np.unique(pages)) != n_pages:
      raise ValueError("a segment's pages must be distinct")
    if np.any(self.allocator.refcounts(pages) < 1):
      raise ValueError("can only cache pages in use (allocated and written)")
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if len(positions) != n:
      raise ValueError(f"need one position per token: {n} tokens, {len(positions)} positions")
    if n and (positions.min() < 0 or positions.max() > np.iinfo(np.int32).max):
      raise ValueError("positions must be in [0, 2**31)")

    self.allocator.incref(pages)
    entry = SegmentEntry(key, _read_only(tokens), _read_only(pages.astype(np.int32)),
                         _read_only(positions.astype(np.int32)), namespace=namespace)
    self._entries[key] = entry
    self._num_pages += n_pages
    self._touch(entry)
    return entry

  def pin(self, entry: SegmentEntry) -> None:
    """Keeps `entry` from eviction until a matching unpin(); pins nest."""
    if self._entries.get(entry.key) is not entry:
      raise KeyError(f"segment {entry.key[:12]} is no longer cached: look it up again")
    entry.pin_count += 1

  def unpin(self, entry: SegmentEntry) -> None:
    if entry.pin_count <= 0:
      raise ValueError(f"unpin of segment {entry.key[:12]} that is not pinned")
    entry.pin_count -= 1

  def _drop(self, entry: SegmentEntry) -> int:
    if self._entries.get(entry.key) is not entry:  # dropped meanwhile (the pool was lost)
      return 0
    del self._entries[entry.key]
    self._num_pages -= len(entry.pages)
    return self.allocator.decref(entry.pages)

  def remove(self, key: str) -> int:
    """Drops an unpinned entry now; returns the number of pages freed (0 if others hold them)."""
    entry = self._entries.get(key)
    if entry is None:
      raise KeyError(f"segment {key[:12]} is not cached")
    if entry.pin_count:
      raise ValueError(f"segment {key[:12]} is pinned ({entry.pin_count}): unpin it first")
    return self._drop(entry)

  def _evictable(self, entry: SegmentEntry) -> bool:
    # Refcount 1 on every page: only this cache holds them, so dropping the entry frees them all.
    return entry.pin_count == 0 and bool(np.all(self.allocator.refcounts(entry.pages) == 1))

  def evict(self, n_pages: int) -> int:
    """Evicts least recently used unpinned, cache-only entries until n_pages are freed.

    Whole entries go, so it may free more than asked. Returns the number of pages freed.
    """
    freed = 0
    for entry in list(self._entries.values()):
      if freed >= n_pages:
        break
      if self._evictable(entry):
        if self.on_evict is not None:
          self.on_evict(entry)
        freed += self._drop(entry)
        self.evictions += 1
    return freed

  def drop_all(self) -> None:
    """Forgets every entry, pinned or not (their K/V is gone: the pool was lost). A pin holder
    still unpins its entry object; the entry is just no longer findable."""
    for entry in list(self._entries.values()):
      self._drop(entry)

  def clear(self) -> int:
    """Drops every evictable entry (not counted as evictions); returns the pages freed."""
    freed = 0
    for entry in list(self._entries.values()):
      if self._evictable(entry):
        freed += self._drop(entry)
    return freed

  def num_reclaimable(self) -> int:
    """How many pages evict() could free now."""
    return sum(len(e.pages) for e in self._entries.values() if self._evictable(e))

  def check_invariants(self) -> None:
    """Raises AssertionError if entries, page counts or pins are inconsistent."""

    def check(cond, msg):
      if not cond:
        raise AssertionError(msg)

    total = 0
    for key, entry in self._entries.items():
      check(entry.key == key == segment_key(entry.token_ids, entry.namespace),
            "entry key is not its content hash")
      check(entry.pin_count >= 0, "negative pin count")
      check(len(entry.pages) == -(-entry.num_tokens // self.page_size), "wrong page count")
      check(len(entry.positions) == entry.num_tokens, "wrong number of positions")
      check(np.all(self.allocator.refcounts(entry.pages) >= 1), f"segment {key[:12]} page is free")
      total += len(entry.pages)
    check(total == self._num_pages, "page count is stale")

  def stats(self, bytes_per_page: int = 0, namespace: str | None = None) -> dict:
    """Counters and occupancy as a plain dict (hits and misses count lookups). With a namespace:
    that namespace's entries only, and no counters (they mix every namespace's lookups)."""
    if namespace is not None:
      mine = [e for e in self._entries.values() if e.namespace == namespace]
      n_pages = sum(len(e.pages) for e in mine)
      return {"entries": len(mine), "pinned_entries": sum(1 for e in mine if e.pin_count),
              "cached_pages": n_pages, "cached_tokens": sum(e.num_tokens for e in mine),
              "cached_bytes": n_pages * bytes_per_page}
    return cache_counters(self) | {
        "entries": self.num_entries,
        "pinned_entries": sum(1 for e in self._entries.values() if e.pin_count),
        "cached_pages": self.num_pages,
        "cached_tokens": sum(e.num_tokens for e in self._entries.values()),
        "cached_bytes": self.num_pages * bytes_per_page,
    }
