"""Exact prefix cache (vLLM style): full pages of KV keyed by a chained hash of their tokens.

One block is one full page: `page_size` token ids at positions i*S .. i*S+S-1 of some prompt. Its
key chains the key of the block before it, h_i = blake2b(h_{i-1} || int32 bytes of block i), so a
block matches only after the very same tokens from position 0: its KV (RoPE at those positions,
attention over that exact context) is then exactly right and is shared, not copied. A partial last
page is never cached: its free slots will be written by the request that owns it.

Reference counts live in the PageAllocator: the cache holds one reference on each cached page, and
`match` takes one more for the caller. A page whose count is 1 is held by the cache alone and can
be evicted. Eviction order is LRU, leaves first: a block is only evicted once it has no cached
children, so the cache is always a forest of chains rooted at position 0.

The same structure serves the KV store's continuation cache (`whole_prompts=True`): the blocks of
earlier prompts from their first approximate block on (a reuse method's K/V), keyed by the same
chain from position 0 but stored from `first_block` (the blocks before it are the exact cache's),
and served only to a prompt that continues a whole earlier prompt (a chat's next turn): `match`
stops at the deepest block that ended an inserted prompt and after which the new prompt goes on
with that prompt's last tokens (those of its partial last page, never cached). There a block's
parent may be absent (it is the exact cache's), so child counts are kept per parent key,
present or not.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Iterator

import numpy as np

from sparsex_jax.kv.allocator import NULL_PAGE, PageAllocator, as_page_array

ROOT_KEY = b""  # the "parent" of block 0


def as_token_array(token_ids) -> np.ndarray:
  """Token ids as a flat int32 array; ids outside int32 raise instead of wrapping silently."""
  ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
    raise ValueError("token ids must fit in int32")
  return ids.astype(np.int32)


def cache_counters(cache) -> dict:
  """The counters every cache reports: hits, misses, hit rate, evictions, pool occupancy."""
  asked = cache.hits + cache.misses
  return {"hits": cache.hits, "misses": cache.misses,
          "hit_rate": cache.hits / asked if asked else 0.0, "evictions": cache.evictions,
          "pages_used": cache.allocator.num_used, "pages_free": cache.allocator.num_free}


def namespace_root(namespace: str = "") -> bytes:
  """The hash chain's root for a namespace (docs/SECURITY.md): the default one ("") keeps the
  plain content hash; any other salts every key, so equal tokens under two namespaces never
  share a prefix block, a segment entry or a file name."""
  if not namespace:
    return ROOT_KEY
  return hashlib.blake2b(b"sparsex-namespace\0" + namespace.encode("utf-8"),
                         digest_size=16).digest()


def hash_tokens(token_ids: np.ndarray, parent: bytes = ROOT_KEY) -> bytes:
  """blake2b (16 bytes) of `parent` then the little-endian int32 bytes of the tokens.

  Stable across processes and platforms, unlike Python's salted hash().
  """
  h = hashlib.blake2b(digest_size=16)
  h.update(parent)
  h.update(np.ascontiguousarray(token_ids, dtype="<i4").tobytes())
  return h.digest()


def _continues(tokens: np.ndarray, start: int, tail: bytes) -> bool:
  """tokens[start:] begins with `tail` (int32 bytes)."""
  want = np.frombuffer(tail, np.int32)
  return tokens.size >= start + want.size and np.array_equal(tokens[start:start + want.size], want)


def whole_prompt_end(tokens: np.ndarray, first_block: int, tails: list[set[bytes]],
                     page_size: int) -> int:
  """How many of a matched run of blocks (from block first_block; `tails`: each block's) a
  prompt may continue: up to the deepest block that ended an earlier prompt whose last tokens
  (the block's tail) this prompt goes on with; 0 if none did."""
  n = len(tails)
  while n and not any(_continues(tokens, (first_block + n) * page_size, tail)
                      for tail in tails[n - 1]):
    n -= 1
  return n


@dataclasses.dataclass(eq=False)
class _Block:
  key: bytes
  parent: bytes  # for block 0: its namespace's root (namespace_root)
  tokens: np.ndarray  # int32 [page_size], kept to rule out hash collisions on match
  page: int
  depth: int  # block index in its prompt
  # whole_prompts caches: the last tokens (int32 bytes, those of a partial last page) of each
  # inserted prompt whose last full block this is.
  tails: set[bytes] = dataclasses.field(default_factory=set)
  # whole_prompts caches: the exact cache's block this one continues (its first stored block),
  # held there until this block goes (`hold` / `release`).
  anchor: bytes | None = None
  # The root of its namespace's chain (namespace_root), which the block's key descends from.
  root: bytes = ROOT_KEY


class PrefixCache:
  """Chained-hash cache of full KV pages from position 0, with LRU leaf-first eviction."""

  def __init__(self, allocator: PageAllocator, whole_prompts: bool = False):
    """whole_prompts: `match` returns only runs that end where an inserted prompt ended."""
    self.allocator = allocator
    self.whole_prompts = whole_prompts
    self.page_size = allocator.page_size
    # Ordered least recently used first. Invariant: every block comes before its parent (a touch
    # moves the whole chain to the end, parents last), so one forward scan evicts leaves first.
    self._blocks: collections.OrderedDict[bytes, _Block] = collections.OrderedDict()
    self._page_to_key: dict[int, bytes] = {}
    self._children: collections.Counter[bytes] = collections.Counter()  # cached children per key
    # Blocks another cache's blocks continue (the continuation cache's anchors): never evicted
    # while held, or the continuation would be unreachable (its match starts after them).
    self._held: collections.Counter[bytes] = collections.Counter()
    self.on_remove: Callable[[_Block], object] | None = None
    # Sees every block one `evict` removes, at once and before their pages are released (their
    # K/V is still in the pool): the KV store spills continuations to the host tier with it.
    # Not called by `clear` or `drop_all`.
    self.on_evict: Callable[[list[_Block]], object] | None = None
    self.hits = 0  # blocks served by match
    self.misses = 0  # full blocks asked for by match but not served
    self.evictions = 0  # blocks evicted
    allocator.add_evictor(self.evict, self.num_reclaimable)

  @property
  def num_cached_blocks(self) -> int:
    return len(self._blocks)

  def __len__(self) -> int:
    return len(self._blocks)

  def cached_pages(self) -> np.ndarray:
    """The pages the cache holds a reference on (int32, one per cached block)."""
    return np.fromiter(self._page_to_key.keys(), np.int32, len(self._page_to_key))

  def block_keys(self, tokens: np.ndarray, namespace: str) -> Iterator[bytes]:
    """The chained key of each full block, lazily: a lookup stops hashing at its first miss (an
    8K-token prompt is 512 blocks; a RAG prompt usually matches only its system prompt)."""
    parent, size = namespace_root(namespace), self.page_size
    for i in range(len(tokens) // size):
      parent = hash_tokens(tokens[i * size:(i + 1) * size], parent)
      yield parent

  def _touch(self, chain: list[_Block]) -> None:
    # Deepest first, so each parent ends up more recent than its children.
    for block in reversed(chain):
      self._blocks.move_to_end(block.key)

  def match(self, token_ids, namespace: str = "", first_block: int = 0) -> tuple[np.ndarray, int]:
    """(pages int32 [m], (first_block + m) * page_size): the longest run of cached full blocks
    from block `first_block` on (0: from position 0), among the blocks cached under `namespace`.

    Takes one reference on each returned page for the caller, who decrefs them when the request
    ends. A caller that needs the last prompt token's logits should match token_ids[:-1], so that
    token is always computed (its query is needed and shared pages must not be written).
    """
    tokens = as_token_array(token_ids)
    chain = []
    for i, key in enumerate(self.block_keys(tokens, namespace)):
      if i < first_block:
        continue
      block = self.get(key, tokens[i * self.page_size:(i + 1) * self.page_size])
      if block is None:
        break
      chain.append(block)
    if self.whole_prompts:  # back to the end of a whole earlier prompt that this one continues
      chain = chain[:whole_prompt_end(tokens, first_block, [b.tails for b in chain],
                                      self.page_size)]
    self.take(chain, asked=max(len(tokens) // self.page_size - first_block, 0))
    pages = np.asarray([b.page for b in chain], np.int32)
    return pages, (first_block + len(chain)) * self.page_size

  def get(self, key: bytes, tokens: np.ndarray) -> _Block | None:
    """The cached block of this key if it holds exactly these tokens (a hash collision does not
    match); no reference taken, nothing counted."""
    block = self._blocks.get(key)
    if block is None or not np.array_equal(block.tokens, tokens):
      return None
    return block

  def take(self, chain: list[_Block], asked: int) -> None:
    """Serves blocks `get` found (a chain, shallowest first): one reference on each page for the
    caller, touched in the LRU; counts them as hits and the rest of `asked` as misses."""
    self.hits += len(chain)
    self.misses += asked - len(chain)
    self.allocator.incref(np.asarray([b.page for b in chain], np.int32))
    self._touch(chain)

  def chain_to(self, key: bytes) -> list[_Block]:
    """The cached blocks from the chain's root to the block `key`, root first (held blocks and
    their ancestors are always all cached)."""
    chain = []
    block = self._blocks.get(key)
    while block is not None:
      chain.append(block)
      block = self._blocks.get(block.parent) if block.depth else None
    return chain[::-1]

  def hold(self, key: bytes) -> None:
    """Keeps a cached block (and so its ancestors) from eviction until `release`."""
    if key not in self._blocks:
      raise KeyError("hold: no such cached block")
    self._held[key] += 1

  def release(self, key: bytes) -> None:
    if self._held[key] <= 1:
      self._held.pop(key, None)
    else:
      self._held[key] -= 1

  def block_key(self, token_ids, namespace: str, n_blocks: int) -> bytes:
    """The chained key of block n_blocks - 1 of token_ids (n_blocks >= 1)."""
    tokens = as_token_array(token_ids)
    for i, key in enumerate(self.block_keys(tokens, namespace)):
      if i == n_blocks - 1:
        return key
    raise ValueError(f"{tokens.size} tokens have fewer than {n_blocks} full blocks")

  def insert(self, token_ids, pages, namespace: str = "", first_block: int = 0,
             anchor: Callable[[], bytes] | None = None) -> np.ndarray:
    """Caches the full blocks of a sequence whose KV lives in `pages` (page i: tokens i*S..i*S+S-1),
    under `namespace`; blocks before `first_block` are keyed (the chain runs from position 0)
    but not stored, and their pages are not looked at. A whole_prompts cache keeps the tokens
    after the last full block, which a continuing prompt must repeat. `anchor`: for a new first
    stored block, returns the key of the block it continues in another cache, which that cache
    holds (the caller's hold) until this block is removed (`on_remove` tells the caller).

    Returns the indices (int32) of the blocks newly cached; the cache takes its own reference on
    each of their pages. A block already cached keeps its cached page (the caller's page for that
    block is left alone). The caller keeps its own references either way. Extra pages (a partial
    last page) are ignored. Validated before any change.
    """
    tokens = as_token_array(token_ids)
    pages = as_page_array(pages)
    size = self.page_size
    keys = list(self.block_keys(tokens, namespace))
    root = namespace_root(namespace)
    if len(pages) < len(keys):
      raise ValueError(f"{len(keys)} full blocks need {len(keys)} pages, got {len(pages)}")
    if first_block and not self.whole_prompts:
      raise ValueError("an exact prefix cache stores every block from position 0")
    new = []
    for i, key in enumerate(keys):
      if i < first_block:
        continue
      block = self._blocks.get(key)
      if block is None:
        new.append(i)
      elif not np.array_equal(block.tokens, tokens[i * size:(i + 1) * size]):
        raise RuntimeError("prefix-cache hash collision (blake2b-128): refusing to insert")
    new_pages = pages[new]
    if np.any(new_pages == NULL_PAGE):
      raise ValueError("cannot cache the null page 0")
    if len(np.unique(new_pages)) != len(new_pages):
      raise ValueError("two blocks of one sequence cannot share a page")
    already = [int(p) for p in new_pages if int(p) in self._page_to_key]
    if already:
      raise ValueError(f"page(s) {already[:8]} already cache other blocks: "
                       "write new KV to new pages")
    if np.any(self.allocator.refcounts(new_pages) < 1):
      raise ValueError("can only cache pages in use (allocated and written)")

    self.allocator.incref(new_pages)
    chain = []
    for i, key in enumerate(keys):
      if i < first_block:
        continue
      block = self._blocks.get(key)
      if block is None:
        parent = keys[i - 1] if i else root
        block = _Block(key, parent, tokens[i * size:(i + 1) * size].copy(), int(pages[i]), i,
                       root=root)
        if i == first_block and first_block and anchor is not None:
          block.anchor = anchor()
        self._blocks[key] = block
        self._page_to_key[block.page] = key
        self._children[parent] += 1
      chain.append(block)
    if chain and self.whole_prompts:
      chain[-1].tails.add(tokens[len(keys) * size:].tobytes())
    self._touch(chain)
    return np.asarray(new, np.int32)

  def _forget(self, block: _Block) -> None:
    """Drops the block from the tree; its page reference is the caller's to release."""
    del self._blocks[block.key]
    del self._page_to_key[block.page]
    self._children[block.parent] -= 1
    if not self._children[block.parent]:
      del self._children[block.parent]
    self.evictions += 1
    if self.on_remove is not None:
      self.on_remove(block)

  def evict(self, n_pages: int) -> int:
    """Frees up to n_pages (or a little more) LRU leaf blocks held by the cache alone.

    A block whose page a live request still holds (refcount > 1) stays, and so do its ancestors.
    `on_evict` sees the blocks removed before their pages are released. Returns the number of
    pages freed.
    """
    return self._evict(n_pages, notify=True)

  def _evict(self, n_pages: int, notify: bool) -> int:
    removed = []
    # Children mostly precede parents in the LRU order, so a parent is visited after its children
    # have had their chance to go and becomes evictable in the same scan. Not always: a
    # continuation stored from block i on is touched from there, and its parent, an older block
    # that another turn forked from, stays before it. So scan again while a scan frees something.
    progress = True
    while progress and len(removed) < n_pages:
      progress = False
      for key in list(self._blocks):
        if len(removed) >= n_pages:
          break
        block = self._blocks[key]
        if (not self._children[block.key] and key not in self._held
            and self.allocator.refcount(block.page) == 1):  # the cache's is the last reference
          self._forget(block)
          removed.append(block)
          progress = True
    if notify and removed and self.on_evict is not None:
      self.on_evict(removed)
    # One release for the scan (each page is in one block: the refcounts read above still hold).
    return self.allocator.decref([b.page for b in removed])

  def drop_all(self) -> None:
    """Forgets every block, held by a live request or not (their K/V is gone: the pool was lost).
    The cache's references are released; a live request's own references stay with it."""
    pages = self.cached_pages()
    self._blocks.clear()
    self._page_to_key.clear()
    self._children.clear()
    self._held.clear()
    self.allocator.decref(pages)

  def clear(self) -> int:
    """Drops every block no live request holds (not counted as evictions); returns pages freed."""
    evictions = self.evictions
    freed = self._evict(self.allocator.num_pages, notify=False)
    self.evictions = evictions
    return freed

  def num_reclaimable(self) -> int:
    """How many pages evict() could free now: blocks whose whole cached subtree is cache-only."""
    kept_children: dict[bytes, int] = collections.defaultdict(int)
    refcounts = self.allocator.refcounts(self._pages_in_lru_order())
    n = 0
    for block, rc in zip(self._blocks.values(), refcounts):
      if rc == 1 and kept_children[block.key] == 0 and block.key not in self._held:
        n += 1
      elif block.depth:
        kept_children[block.parent] += 1
    return n

  def _pages_in_lru_order(self) -> np.ndarray:
    return np.fromiter((b.page for b in self._blocks.values()), np.int32, len(self._blocks))

  def check_invariants(self) -> None:
    """Raises AssertionError if blocks, pages, child counts or the LRU order disagree."""

    def check(cond, msg):
      if not cond:
        raise AssertionError(msg)

    order = {key: i for i, key in enumerate(self._blocks)}
    children: collections.Counter[bytes] = collections.Counter()
    for key, block in self._blocks.items():
      check(block.key == key and self._page_to_key.get(block.page) == key, "page map is stale")
      check(self.allocator.refcount(block.page) >= 1, f"cached page {block.page} is free")
      check(block.page != NULL_PAGE, "the null page is cached")
      children[block.parent] += 1
      # A continuation's first stored block has its parent in the exact cache, and a match
      # from a later block touches only what it returns: neither rule holds there.
      if block.depth and not self.whole_prompts:
        check(block.parent in self._blocks, "a cached block's parent was evicted")
        check(order[block.parent] > order[key], "a parent is older than its child in LRU order")
      check(block.key == hash_tokens(block.tokens, block.parent), "block key is not its hash")
    check(children == +self._children, "child count is stale")
    check(all(key in self._blocks for key in self._held), "a held block was removed")
    check(len(self._page_to_key) == len(self._blocks), "page map size differs from block count")

  def stats(self, bytes_per_page: int = 0) -> dict:
    """Counters and occupancy as a plain dict (hits and misses count blocks)."""
    return cache_counters(self) | {
        "cached_blocks": self.num_cached_blocks,
        "cached_tokens": self.num_cached_blocks * self.page_size,
        "cached_bytes": self.num_cached_blocks * bytes_per_page,
    }
