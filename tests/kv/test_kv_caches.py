"""Host-side KV bookkeeping: page allocator, prefix cache and segment cache.

A stateful hypothesis machine drives all three through random request lifecycles against a model
that counts every holder of every page, and a fake KV pool (each slot holds the token id written
there) that exposes any page freed and handed out again while something still reads it.
"""

import collections

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sparsex_jax.kv.allocator import NULL_PAGE, PageAllocator, PoolExhausted
from sparsex_jax.kv.prefix_cache import PrefixCache
from sparsex_jax.kv.segment_cache import SegmentCache, segment_key

S = 4  # page size
NUM_PAGES = 20  # small, so eviction and exhaustion happen often

SYSTEM_PROMPTS = [(), (7, 7, 8, 9, 1, 2, 3, 4), (7, 7, 8, 9, 5, 5, 5, 5, 6)]
SEGMENTS = [tuple(range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate([1, 3, 4, 5, 8, 9])]

prompts = st.builds(
    lambda head, tail: list(head) + tail,
    st.sampled_from(SYSTEM_PROMPTS),
    st.lists(st.integers(0, 5), max_size=10),
).filter(len)


def n_pages_for(n_tokens):
  return -(-n_tokens // S)


def layout(tokens, n_pages, fill=-1):
  """What pages holding `tokens` contiguously from offset 0 contain: [n_pages, S]."""
  out = np.full(n_pages * S, fill, np.int64)
  out[:len(tokens)] = tokens
  return out.reshape(n_pages, S)


class CacheMachine(RuleBasedStateMachine):
  """Requests allocate / share / finish; caches insert / match / pin / evict; pool stays sane."""

  def __init__(self):
    super().__init__()
    self.alloc = PageAllocator(NUM_PAGES, S)
    self.prefix = PrefixCache(self.alloc)
    self.segments = SegmentCache(self.alloc)
    self.pool = np.full((NUM_PAGES, S), -1, np.int64)  # fake KV: the token id in each slot
    self.requests = {}  # id -> (tokens or None, pages [int32], expected pool rows)
    self.held = collections.Counter()  # page -> references held by live requests
    self.pins = collections.Counter()  # segment key -> pins held by the test
    self.next_id = 0

  # ---- helpers ----

  def _add_request(self, tokens, pages, expected):
    self.requests[self.next_id] = (tokens, pages, expected)
    self.held.update(int(p) for p in pages)
    self.next_id += 1

  def _snapshot(self):
    return (self.alloc.refcounts(np.arange(1, NUM_PAGES)).copy(), self.alloc.num_free,
            self.prefix.num_cached_blocks, self.segments.num_entries, self.pool.copy())

  def _allocate(self, n):
    """Allocate, or check that the failure was legitimate and changed nothing."""
    before = self._snapshot()
    available = self.alloc.num_available()
    try:
      pages = self.alloc.allocate(n)
    except PoolExhausted as e:
      assert n > available
      assert f"{n} pages needed" in str(e) and "bigger pool" in str(e)
      after = self._snapshot()
      for a, b in zip(before, after):
        assert np.array_equal(a, b), "PoolExhausted changed the state"
      return None
    assert n <= available
    assert len(pages) == n and not np.any(pages == NULL_PAGE)
    assert np.all(self.alloc.refcounts(pages) == 1)
    self.pool[pages] = -1  # a fresh page's old KV is garbage; the new owner overwrites it
    return pages

  # ---- requests ----

  @rule(tokens=prompts, insert=st.booleans())
  def new_request(self, tokens, insert):
    matched, n_tokens = self.prefix.match(tokens)
    assert n_tokens == len(matched) * S <= len(tokens)
    np.testing.assert_array_equal(self.pool[matched].reshape(-1), tokens[:n_tokens])
    fresh = self._allocate(n_pages_for(len(tokens)) - len(matched))
    if fresh is None:
      self.alloc.decref(matched)  # the request is not admitted: give the matched pages back
      return
    pages = np.concatenate([matched, fresh]).astype(np.int32)
    expected = layout(tokens, len(pages))
    self.pool[fresh] = expected[len(matched):]  # "prefill" writes only the non-cached pages
    self._add_request(tuple(tokens), pages, expected)
    if insert:
      self._insert_prefix(self.next_id - 1)

  @rule(n=st.integers(0, NUM_PAGES + 2))
  def raw_allocate(self, n):
    pages = self._allocate(n)
    if pages is not None:
      expected = np.full((n, S), -100 - self.next_id, np.int64)
      self.pool[pages] = expected
      self._add_request(None, pages, expected)

  @precondition(lambda self: self.requests)
  @rule(data=st.data())
  def share(self, data):
    tokens, pages, expected = self.requests[data.draw(st.sampled_from(sorted(self.requests)))]
    self.alloc.incref(pages)
    self._add_request(tokens, pages, expected)

  @precondition(lambda self: self.requests)
  @rule(data=st.data())
  def finish(self, data):
    rid = data.draw(st.sampled_from(sorted(self.requests)))
    _, pages, _ = self.requests.pop(rid)
    self.held.subtract(int(p) for p in pages)
    self.alloc.decref(pages)

  def _insert_prefix(self, rid):
    tokens, pages, _ = self.requests[rid]
    n_full = len(tokens) // S
    new = self.prefix.insert(tokens, pages)
    assert set(new.tolist()) <= set(range(n_full))
    matched, n_tokens = self.prefix.match(tokens)
    assert n_tokens == n_full * S  # every full block is cached now, no partial block
    np.testing.assert_array_equal(matched[new], pages[new])  # new blocks cache the caller's pages
    self.alloc.decref(matched)

  @precondition(lambda self: any(t is not None for t, _, _ in self.requests.values()))
  @rule(data=st.data())
  def prefix_insert(self, data):
    rid = data.draw(st.sampled_from(
        sorted(r for r, (t, _, _) in self.requests.items() if t is not None)))
    self._insert_prefix(rid)

  # ---- segments ----

  @rule(segment=st.sampled_from(SEGMENTS), offset=st.integers(0, 50), keep=st.booleans())
  def segment_insert(self, segment, offset, keep):
    pages = self._allocate(n_pages_for(len(segment)))
    if pages is None:
      return
    expected = layout(segment, len(pages))
    self.pool[pages] = expected
    positions = offset + np.arange(len(segment))
    existed = segment_key(segment) in self.segments
    entry = self.segments.insert(segment, pages, positions)
    np.testing.assert_array_equal(entry.token_ids, segment)
    # an existing entry wins and references nothing of ours; a new one takes one reference each
    assert np.all(self.alloc.refcounts(pages) == (1 if existed else 2))
    assert existed or np.array_equal(entry.positions, positions)
    if keep:  # the request that computed it lives on
      self._add_request(segment, pages, expected)
    else:
      self.alloc.decref(pages)

  @rule(segment=st.sampled_from(SEGMENTS), pin=st.booleans())
  def segment_lookup(self, segment, pin):
    key = segment_key(segment)
    entry = self.segments.lookup(segment, pin=pin)
    if self.pins[key]:
      assert entry is not None, "a pinned segment was evicted"
    if entry is None:
      return
    assert entry.key == key
    np.testing.assert_array_equal(self.pool[entry.pages], layout(segment, len(entry.pages)))
    if pin:
      self.pins[key] += 1

  @precondition(lambda self: +self.pins)
  @rule(data=st.data())
  def unpin(self, data):
    key = data.draw(st.sampled_from(sorted(+self.pins)))
    self.segments.unpin(self.segments.get(key))
    self.pins[key] -= 1

  @rule(segment=st.sampled_from(SEGMENTS))
  def segment_remove(self, segment):
    key = segment_key(segment)
    if key not in self.segments:
      with pytest.raises(KeyError):
        self.segments.remove(key)
    elif self.pins[key]:
      with pytest.raises(ValueError, match="pinned"):
        self.segments.remove(key)
    else:
      self.segments.remove(key)
      assert key not in self.segments

  # ---- eviction ----

  @rule(n=st.integers(0, NUM_PAGES), which=st.sampled_from(["prefix", "segment"]))
  def evict(self, n, which):
    cache = self.prefix if which == "prefix" else self.segments
    free_before, reclaimable = self.alloc.num_free, cache.num_reclaimable()
    freed = cache.evict(n)
    assert freed == self.alloc.num_free - free_before
    assert freed <= reclaimable
    if n <= reclaimable:
      assert freed >= n
    else:
      assert freed == reclaimable and cache.num_reclaimable() == 0

  # ---- invariants ----

  @invariant()
  def structures_are_consistent(self):
    self.alloc.check_invariants()
    self.prefix.check_invariants()
    self.segments.check_invariants()
    assert self.alloc.num_free + self.alloc.num_used == self.alloc.capacity

  @invariant()
  def refcounts_equal_holders(self):
    expected = collections.Counter(self.held)
    expected.update(self.prefix.cached_pages().tolist())
    expected.update(self.segments.cached_pages().tolist())
    for page in range(1, NUM_PAGES):
      assert self.alloc.refcount(page) == expected[page], f"page {page}"
    assert self.alloc.num_used == len(+expected)

  @invariant()
  def nothing_read_was_overwritten(self):
    for _, pages, expected in self.requests.values():
      np.testing.assert_array_equal(self.pool[pages], expected)
    for block in self.prefix._blocks.values():
      np.testing.assert_array_equal(self.pool[block.page], block.tokens)
    for entry in self.segments._entries.values():
      np.testing.assert_array_equal(self.pool[entry.pages],
                                    layout(entry.token_ids, len(entry.pages)))

  @invariant()
  def pinned_entries_survive(self):
    for key, count in self.pins.items():
      if count:
        assert key in self.segments
        assert self.segments.get(key).pin_count == count


CacheMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
TestCacheMachine = CacheMachine.TestCase


# ---- examples ----


def make(num_pages=16, page_size=4):
  alloc = PageAllocator(num_pages, page_size)
  return alloc, PrefixCache(alloc), SegmentCache(alloc)


def test_allocator_basics():
  alloc = PageAllocator(5, 4)
  assert alloc.capacity == 4 and alloc.num_free == 4
  pages = alloc.allocate(4)
  assert sorted(pages.tolist()) == [1, 2, 3, 4] and pages.dtype == np.int32  # never the null page
  alloc.incref(pages[:1])
  assert alloc.refcount(pages[0]) == 2
  assert alloc.decref(pages) == 3
  assert alloc.decref(pages[:1]) == 1
  with pytest.raises(ValueError, match="free"):
    alloc.decref(pages[:1])
  with pytest.raises(ValueError, match="free"):
    alloc.incref(pages[:1])
  with pytest.raises(ValueError, match="null page"):
    alloc.decref([NULL_PAGE])
  assert alloc.allocate(0).shape == (0,)
  alloc.check_invariants()


def test_decref_is_atomic():
  alloc = PageAllocator(8, 4)
  pages = alloc.allocate(2)
  with pytest.raises(ValueError):
    alloc.decref([pages[0], pages[1], pages[1]])  # page 1 would go below 0
  assert alloc.refcount(pages[0]) == 1 and alloc.refcount(pages[1]) == 1
  alloc.check_invariants()


def test_shared_system_prompt_matches_across_sequences():
  alloc, prefix, _ = make()
  system = [11, 12, 13, 14, 15, 16, 17, 18]
  a = system + [1, 2, 3]
  pages_a = alloc.allocate(3)
  assert prefix.insert(a, pages_a).tolist() == [0, 1]
  b = system + [9, 9]
  pages, n = prefix.match(b)
  assert n == 8 and pages.tolist() == pages_a[:2].tolist()
  assert [alloc.refcount(p) for p in pages] == [3, 3]  # request a, the cache, request b
  assert prefix.hits == 2 and prefix.misses == 0
  alloc.decref(pages)
  alloc.decref(pages_a)
  assert alloc.num_used == 2  # the cache alone keeps the system prompt's two pages


def test_chained_hashes_do_not_match_after_another_prefix():
  alloc, prefix, _ = make()
  x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]
  prefix.insert(x + y, alloc.allocate(2))
  pages, n = prefix.match(z + y)  # block y is cached, but after x, not after z
  assert n == 0 and len(pages) == 0 and prefix.misses == 2
  pages, n = prefix.match(x + z)
  assert n == 4
  alloc.decref(pages)


def test_match_hashes_blocks_only_up_to_its_first_miss(monkeypatch):
  """A lookup of a long prompt whose second block misses hashes two blocks, not all of them
  (an 8K-token prompt is 512 blocks of host time per prefill otherwise)."""
  from sparsex_jax.kv import prefix_cache as pc
  alloc, prefix, _ = make()
  rng = np.random.default_rng(4)
  system = rng.integers(0, 1000, 4).tolist()
  prefix.insert(system, alloc.allocate(1))
  calls = []
  real = pc.hash_tokens
  monkeypatch.setattr(pc, "hash_tokens", lambda *a: calls.append(1) or real(*a))
  prompt = system + rng.integers(0, 1000, 400).tolist()  # 101 full blocks
  pages, n = prefix.match(prompt)
  assert n == 4 and len(calls) == 2 and prefix.misses == 100
  alloc.decref(pages)


def test_partial_last_block_is_not_cached():
  alloc, prefix, _ = make()
  tokens = list(range(10))  # 2 full pages of 4 + 2 tokens
  pages = alloc.allocate(3)
  assert prefix.insert(tokens, pages).tolist() == [0, 1]
  assert prefix.num_cached_blocks == 2 and alloc.refcount(pages[2]) == 1
  matched, n = prefix.match(tokens + [10, 11])  # even once the block is full elsewhere
  assert n == 8
  alloc.decref(matched)


def test_insert_keeps_the_cached_page():
  alloc, prefix, _ = make()
  tokens = list(range(8))
  first, second = alloc.allocate(2), alloc.allocate(2)  # two requests computed the same prompt
  prefix.insert(tokens, first)
  assert prefix.insert(tokens, second).tolist() == []
  assert [alloc.refcount(p) for p in second] == [1, 1]  # not referenced by the cache
  alloc.decref(second)
  assert alloc.refcount(first[0]) == 2


def test_pool_exhausted_leaves_state_unchanged_with_a_clear_message():
  alloc, prefix, segments = make(num_pages=8)  # capacity 7
  live = alloc.allocate(3)
  prefix.insert(list(range(8)), live[:2])  # cached but still held by the request
  cached = alloc.allocate(2)
  segments.insert(list(range(50, 58)), cached, np.arange(8))
  alloc.decref(cached)  # the segment cache alone holds these: evictable
  before = (alloc.refcounts(np.arange(1, 8)).copy(), alloc.num_free, len(prefix), len(segments))
  with pytest.raises(PoolExhausted) as err:
    alloc.allocate(5)  # 2 free + 2 evictable < 5
  msg = str(err.value)
  assert "5 pages needed" in msg and "2 free of 7" in msg
  assert "bigger pool" in msg and "fewer or shorter requests" in msg
  assert err.value.needed == 5 and err.value.num_free == 2
  after = (alloc.refcounts(np.arange(1, 8)), alloc.num_free, len(prefix), len(segments))
  for a, b in zip(before, after):
    assert np.array_equal(a, b)
  # 4 fit, by evicting the segment; the prefix blocks a live request holds are untouched
  assert len(alloc.allocate(4)) == 4 and len(segments) == 0 and len(prefix) == 2


def test_prefix_eviction_is_lru_and_leaves_first():
  alloc, prefix, _ = make()
  seqs = {name: [i] * 4 for i, name in enumerate("abc", start=1)}
  for tokens in seqs.values():
    pages = alloc.allocate(1)
    prefix.insert(tokens, pages)
    alloc.decref(pages)
  chain_pages = alloc.allocate(2)
  prefix.insert([4] * 4 + [5] * 4, chain_pages)  # a two-block chain, most recent
  alloc.decref(chain_pages)
  alloc.decref(prefix.match(seqs["a"])[0])  # a becomes most recent
  order = []
  while len(prefix):
    before = {b.page for b in prefix._blocks.values()}
    assert prefix.evict(1) == 1
    (gone,) = before - {b.page for b in prefix._blocks.values()}
    order.append(gone)
  # b, c (LRU), then the chain's leaf before its parent, then a (touched last)
  assert order == [2, 3, int(chain_pages[1]), int(chain_pages[0]), 1]
  assert prefix.evictions == 5 and alloc.num_used == 0


def test_prefix_block_held_by_a_request_is_not_evicted_nor_its_parent():
  alloc, prefix, _ = make()
  pages = alloc.allocate(2)
  prefix.insert(list(range(8)), pages)
  alloc.decref(pages[:1])  # the request still holds the leaf's page only
  assert prefix.num_reclaimable() == 0 and prefix.evict(10) == 0 and len(prefix) == 2
  alloc.decref(pages[1:])
  assert prefix.num_reclaimable() == 2 and prefix.evict(10) == 2


def test_segment_lru_pinning_and_existing_entries():
  alloc, _, segments = make()
  entries = []
  for i in range(3):
    tokens = list(range(10 * i, 10 * i + 5))
    pages = alloc.allocate(2)
    entries.append(segments.insert(tokens, pages, np.arange(5) + 7))
    alloc.decref(pages)
  assert entries[0].positions.tolist() == list(range(7, 12))
  # inserting an existing segment returns it and references nothing of the caller's
  again = alloc.allocate(2)
  assert segments.insert(list(range(5)), again, np.arange(5)) is entries[0]
  assert [alloc.refcount(p) for p in again] == [1, 1]
  alloc.decref(again)
  assert segments.lookup(list(range(5)), pin=True) is entries[0]  # touched: now most recent
  assert segments.lookup([99]) is None and (segments.hits, segments.misses) == (1, 1)
  assert segments.evict(1) == 2 and segments.get(entries[1].key) is None  # LRU: entry 1
  assert segments.evict(100) == 2 and segments.get(entries[2].key) is None
  assert segments.get(entries[0].key) is entries[0]  # pinned: survives
  with pytest.raises(ValueError, match="pinned"):
    segments.remove(entries[0].key)
  segments.unpin(entries[0])
  with pytest.raises(ValueError, match="not pinned"):
    segments.unpin(entries[0])
  assert segments.evict(1) == 2 and len(segments) == 0 and alloc.num_used == 0
  with pytest.raises(KeyError):
    segments.pin(entries[0])


def test_segment_insert_validates():
  alloc, _, segments = make()
  pages = alloc.allocate(3)
  with pytest.raises(ValueError, match="exactly 2 pages"):
    segments.insert(list(range(5)), pages, np.arange(5))
  with pytest.raises(ValueError, match="one position per token"):
    segments.insert(list(range(5)), pages[:2], np.arange(4))
  with pytest.raises(ValueError, match="empty"):
    segments.insert([], pages[:0], [])
  assert len(segments) == 0 and [alloc.refcount(p) for p in pages] == [1, 1, 1]


def test_allocation_evicts_prefix_then_segments():
  alloc, prefix, segments = make(num_pages=5)  # capacity 4
  pages = alloc.allocate(4)
  prefix.insert(list(range(8)), pages[:2])
  segments.insert(list(range(8)), pages[2:], np.arange(8))
  alloc.decref(pages)
  assert alloc.num_free == 0 and alloc.num_available() == 4
  alloc.allocate(1)  # the prefix evictor is asked first and frees the chain's leaf
  assert len(prefix) == 1 and len(segments) == 1
  alloc.allocate(3)
  assert len(prefix) == 0 and len(segments) == 0 and alloc.num_free == 0


def test_stats_are_plain_dicts():
  alloc, prefix, segments = make()
  pages = alloc.allocate(2)
  prefix.insert(list(range(8)), pages)
  alloc.decref(prefix.match(list(range(9)))[0])
  s = prefix.stats(bytes_per_page=1000)
  assert s["hits"] == 2 and s["cached_blocks"] == 2 and s["cached_bytes"] == 2000
  assert segments.stats(10)["entries"] == 0
  a = alloc.stats(bytes_per_page=10)
  assert a["pages_used"] == 2 and a["bytes_free"] == 130 and a["capacity_pages"] == 15
