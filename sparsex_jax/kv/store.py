"""The KV store: the one owner of the page allocator, the prefix cache and the segment cache.

Host side, plain numpy. A batch of requests `acquire`s what its prefill needs (exact prefix pages,
pinned segment-cache entries, pages of its own, and copies planned from the host tier) as
`Leases`, a context manager that always gives everything back; after the prefill, `commit`
registers what the caches should keep. The device pool's values are never touched here: a commit
only says which slots to copy where, a lease which host segments to copy into which pages. The one
exception is the host tier's spill: a segment the pool evicts is read off the device through
`page_io` (the engine's KVPool) before its pages are freed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Any, Iterator, NamedTuple, Protocol, Sequence

import numpy as np

from sparsex_jax.kv.allocator import PageAllocator, PoolExhausted
from sparsex_jax.kv.host_tier import (RUN_BLOCKS, HostBlock, HostLoad, HostRun, HostSegment,
                                     HostTier, RunLoad, Staged, StoredKV, run_pages,
                                     stored_pages)
from sparsex_jax.kv.layout import PoolLayout
from sparsex_jax.kv.prefix_cache import PrefixCache, hash_tokens, whole_prompt_end
from sparsex_jax.kv.segment_cache import SegmentCache, SegmentEntry, segment_key
from sparsex_jax.labels import REUSED
from sparsex_jax.prompt import Prompt


class ReusePolicy(Protocol):
  """What the store reads of a resolved reuse policy (sparsex_jax/reuse: ReusePolicy), named here
  so that kv/ imports nothing above it."""

  method: Any  # its as_record() salts the continuation cache
  layer_threshold: int
  reads_prefix_cache: bool
  reads_segment_cache: bool
  writes_prefix_cache: bool
  writes_segment_cache: bool


class LabelledPrompt(Protocol):
  """What a commit reads of a plan (planner.RequestPlan): where each token's K/V came from."""

  labels: np.ndarray  # [n] int8, EXACT / REUSED / NEW
  page_table: np.ndarray  # [n_pages] int32
  n_exact: int  # prefix tokens referenced through the page table
  n_continued: int  # the last of them, from the continuation cache (approximate)


def continuation_namespace(namespace: str, policy: ReusePolicy) -> str:
  """The continuation cache's chains are salted apart from the exact cache's, by namespace (as
  every cache is) and by the reuse policy that computed them: equal tokens never turn an
  approximate block into an exact one, and an ablation of r or T never continues another
  setting's K/V."""
  fields = sorted((k, v) for k, v in policy.method.as_record().items()
                  if k not in ("read_caches", "update_caches"))
  return f"{namespace}\0continuation\0{fields!r}\0T={policy.layer_threshold}"


class _Spilled(NamedTuple):
  """A block on its way from the continuation cache to the host tier."""

  key: bytes
  tokens: np.ndarray
  tails: frozenset
  page: int
  depth: int


@dataclasses.dataclass(eq=False)
class Lease:
  """The cache resources one request holds from acquire until release."""

  exact_pages: np.ndarray  # prefix-cache pages (one reference each), a prefix of page_table
  own_pages: np.ndarray  # pages allocated for the request (one reference each)
  hits: dict[int, SegmentEntry]  # segment index -> segment-cache entry (pinned), or a host load's
  page_size: int
  host_pins: list[HostSegment] = dataclasses.field(default_factory=list)  # pinned in the host tier
  loads: list[HostLoad] = dataclasses.field(default_factory=list)  # host -> pool copies (own pages)
  # Continued history copied from the host tier into pages of exact_pages (every layer; when:
  # step_runner._host_copies).
  run_loads: list[RunLoad] = dataclasses.field(default_factory=list)
  run_pins: list[HostRun] = dataclasses.field(default_factory=list)  # their runs, pinned
  # The last pages of exact_pages that came from the continuation cache: an earlier prompt's K/V
  # as its reuse method computed it (approximate), continued by this prompt.
  continued_pages: int = 0

  @property
  def n_exact(self) -> int:
    return int(self.exact_pages.size) * self.page_size

  @property
  def n_continued(self) -> int:
    return self.continued_pages * self.page_size

  @property
  def page_table(self) -> np.ndarray:
    return np.concatenate([self.exact_pages, self.own_pages]).astype(np.int32)


class Leases(list):
  """The leases of one batch, released together when the `with` block ends (however it ends)."""

  def __init__(self, store: "KVStore", leases: Sequence[Lease]):
    super().__init__(leases)
    self._store = store

  def __enter__(self) -> "Leases":
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def release(self) -> None:
    for lease in self:
      self._store.release(lease)


@dataclasses.dataclass
class SlotCopies:
  """Copies the device must make before a commit completes: src_slots[i] -> dst_slots[i]."""

  src_slots: list[np.ndarray] = dataclasses.field(default_factory=list)
  dst_slots: list[np.ndarray] = dataclasses.field(default_factory=list)

  def __bool__(self) -> bool:
    return bool(self.src_slots)


class KVStore:
  """Allocator + prefix cache + segment cache of one pool."""

  def __init__(self, layout: PoolLayout, host_tier: HostTier | None = None):
    """host_tier: where segments the pool evicts go (kv/host_tier.py); then `page_io` (the
    engine's KVPool) must be set before the first eviction."""
    self.layout = layout
    self.allocator = PageAllocator(layout.num_pages, layout.page_size)
    # Registration order is eviction order: prefix blocks, then continuations, then segments.
    # (Continuations evicted after segments lost at 32 requests/s in round 16: the agents' shared
    # outputs went instead; tag research-round16-continuations-evicted-last. One LRU over the
    # three caches lost in round 17's simulation: sessions taking turns are a cyclic pattern,
    # which LRU thrashes; tag research-round17-one-lru. docs/serving_log.md.)
    self.prefix_cache = PrefixCache(self.allocator)
    # Prompts prefilled with reuse, as computed, for the prompts that continue them (a chat's
    # next turn): their K/V after the first reused token is approximate, so they never enter the
    # exact prefix cache, but the next turn must not recompute or re-blend the history the model
    # already answered from (docs/DESIGN.md, "Continuations").
    self.continuation_cache = PrefixCache(self.allocator, whole_prompts=True)
    self.segment_cache = SegmentCache(self.allocator)
    # A continuation's match starts after its prompt's exact blocks: the exact block it
    # continues is held (never evicted) while the continuation's first block lives.
    self.continuation_cache.on_remove = self._release_anchor
    self.host_tier = host_tier
    self.page_io = None
    if host_tier is not None:
      self.segment_cache.on_evict = self._spill_to_host
      self.continuation_cache.on_evict = self._spill_runs
    self._live: dict[int, Lease] = {}
    self.output_tokens_kept = 0  # generated tokens cached after their decode (keep_output)

  # ---- acquire / release ----

  def acquire(self, prompts: Sequence[Prompt], policy: ReusePolicy,
              max_new_tokens: int | Sequence[int]) -> Leases:
    """Looks up, pins and allocates for every prompt (room for its prompt and max_new_tokens,
    one value or one per prompt); all or nothing (PoolExhausted, ValueError).

    Use the result as a context manager: `with store.acquire(...) as leases: ...`.
    """
    if isinstance(max_new_tokens, (int, np.integer)):
      max_new_tokens = [int(max_new_tokens)] * len(prompts)
    leases = Leases(self, [])
    try:
      for prompt, n_new in zip(prompts, max_new_tokens, strict=True):
        leases.append(self._lease(prompt, policy, n_new))
    except BaseException:
      leases.release()
      raise
    return leases

  def _lease(self, prompt: Prompt, policy: ReusePolicy, max_new_tokens: int) -> Lease:
    layout = self.layout
    ids = prompt.token_ids
    n = ids.size
    total_pages = layout.pages_for(n + max(max_new_tokens, 1))
    if total_pages > self.allocator.capacity:
      raise ValueError(
          f"pool too small: a request of {n} + {max_new_tokens} tokens needs {total_pages} pages "
          f"of {layout.page_size} tokens, the pool has {self.allocator.capacity}; pass a larger "
          f"num_pages or kv_pool_bytes to Engine")
    lease = Lease(np.zeros(0, np.int32), np.zeros(0, np.int32), {}, layout.page_size)
    from_host: dict[int, HostSegment] = {}
    self._live[id(lease)] = lease
    try:
      if policy.reads_prefix_cache:
        last = (n - 1) // layout.page_size  # the last token is always computed
        pages, _ = self.prefix_cache.match(ids, prompt.namespace)
        keep = min(pages.size, last)
        self.allocator.decref(pages[keep:])
        lease.exact_pages = pages[:keep]
        if policy.reads_segment_cache:  # a reuse method: continue an earlier prompt's K/V
          self._continue(prompt, policy, lease, keep, last)
      if policy.reads_segment_cache:
        for i, (start, end, seg_ids, cacheable) in enumerate(prompt.spans):
          if not cacheable or end <= lease.n_exact:
            continue
          # Pinned at once: allocating the request's own pages below may evict.
          entry = self.segment_cache.lookup(seg_ids, pin=True, namespace=prompt.namespace)
          if entry is not None:
            lease.hits[i] = entry
          elif self.host_tier is not None:  # pinned too: the allocations below may spill
            seg = self.host_tier.lookup(seg_ids, prompt.namespace, pin=True)
            if seg is not None:
              lease.host_pins.append(seg)
              from_host[i] = seg
      n_own = total_pages - lease.exact_pages.size
      if lease.run_loads:  # pages for the continued blocks found in the host tier
        self._allocate_run_pages(lease)
      try:
        lease.own_pages = self.allocator.allocate(n_own)
      except PoolExhausted:
        if not lease.hits and not from_host:
          raise
        # Reuse holds the hits' pages and needs the request's own besides; under pressure give the
        # hits back (evictable again) and compute those segments afresh, as mode "full" would.
        self._unpin(lease)
        from_host = {}
        lease.own_pages = self.allocator.allocate(n_own)
      self._plan_loads(lease, from_host, policy)
    except BaseException:
      self.release(lease)
      raise
    return lease

  def _continue(self, prompt: Prompt, policy, lease: Lease, keep: int, last: int) -> None:
    """Continues an earlier prompt's K/V from block `keep` on (the exact blocks end there): its
    blocks in the pool's continuation cache, then, where those end, its blocks in the host tier
    (runs), up to the deepest block that ended a prompt this one goes on with; at most up to
    block `last`. Pool blocks are referenced at once; host blocks are pinned and get pages and
    a copy (RunLoad) in `_allocate_run_pages`."""
    ids, size = prompt.token_ids, self.layout.page_size
    cache, tier = self.continuation_cache, self.host_tier
    namespace = continuation_namespace(prompt.namespace, policy)
    found = []  # per block from `keep` on: a pool _Block, or a HostBlock
    for i, key in enumerate(cache.block_keys(ids, namespace)):
      if i < keep:
        continue
      tokens = ids[i * size:(i + 1) * size]
      block = cache.get(key, tokens)
      if block is None and tier is not None:
        block = tier.run_block(key, tokens)
      if block is None:
        break
      found.append(block)
    tails = [b.tails for b in found]
    found = found[:min(whole_prompt_end(ids, keep, tails, size), last - keep)]
    in_pool = [b for b in found if not isinstance(b, HostBlock)]
    cache.take(in_pool, asked=max(ids.size // size - keep, 0))
    lease.continued_pages = len(found)
    if len(in_pool) == len(found):
      lease.exact_pages = np.concatenate(
          [lease.exact_pages, [b.page for b in in_pool]]).astype(np.int32)
      return
    # Host blocks: their table slots are filled when their pages are allocated.
    table = [-1 if isinstance(b, HostBlock) else b.page for b in found]
    lease.exact_pages = np.concatenate([lease.exact_pages, table]).astype(np.int32)
    loads: dict[int, RunLoad] = {}
    for slot, b in enumerate(found, start=keep):
      if isinstance(b, HostBlock):
        run, j = b
        if id(run) not in loads:
          tier.pin(run)
          lease.run_pins.append(run)
          loads[id(run)] = RunLoad(np.full(run.n_pages, -1, np.int32), run)
        loads[id(run)].pages[j] = slot  # a slot of exact_pages for now; a page once allocated
    tier.run_hits += len(found) - len(in_pool)
    lease.run_loads = list(loads.values())

  def _allocate_run_pages(self, lease: Lease) -> None:
    """Pages for the continued blocks the host tier holds (marked -1 in exact_pages), each run
    load told where its blocks go. All or nothing (PoolExhausted: the lease is released)."""
    slots = np.flatnonzero(lease.exact_pages < 0)
    pages = self.allocator.allocate(slots.size)
    table = lease.exact_pages.copy()
    table[slots] = pages
    for load in lease.run_loads:
      taken = load.pages >= 0
      load.pages[taken] = table[load.pages[taken]]
    lease.exact_pages = table

  def _spill_runs(self, blocks) -> None:
    """The continuation cache's on_evict: keeps the evicted blocks in the host tier as runs of
    consecutive blocks, each read off the device in one call (inside the allocation that
    evicts: a dispatch into pinned host memory on a GPU, else a blocking copy).

    A chain whose first block continued exact blocks (its anchor: those are the prefix cache's,
    and may go once the anchor is released) takes them along, keyed as the continuation's, so
    that it stays reachable after they leave the pool. Blocks the tier already holds (loaded
    from it, unchanged since; or another history's same exact blocks) are not read again: a run
    ends before them."""
    tier = self.host_tier
    chains: list[list[_Spilled]] = []  # consecutive blocks, shallowest first
    end_of: dict[bytes, list[_Spilled]] = {}  # a chain's last key -> the chain
    for block in sorted(blocks, key=lambda b: b.depth):
      chain = end_of.pop(block.parent, None)
      if chain is None:
        chain = self._anchor_blocks(block)
        chains.append(chain)
      chain.append(_Spilled(block.key, block.tokens, frozenset(block.tails), block.page,
                            block.depth))
      end_of[block.key] = chain
    runs: list[list[_Spilled]] = []
    seen: set[bytes] = set()
    for chain in chains:
      run = []
      for b in chain:
        if tier.has_block(b.key) or b.key in seen:  # a run ends before a block the tier holds
          if run:
            runs.append(run)
          run = []
          continue
        if len(run) == RUN_BLOCKS:  # a full piece
          runs.append(run)
          run = []
        seen.add(b.key)
        run.append(b)
      if run:
        runs.append(run)
    t0 = time.perf_counter()
    for run in runs:  # one read each, padded to run_pages (RUN_BLOCKS: why)
      try:
        tier.spill_reads += 1
        k, v = self._read_for_host(np.asarray([b.page for b in run], np.int32), run_pages)
        tier.put_run([b.key for b in run], np.stack([b.tokens for b in run]),
                     [b.tails for b in run], run[0].depth, k, v)
      except Exception as e:  # pylint: disable=broad-except
        warnings.warn(f"{len(run)} continuation blocks evicted but not kept in the host "
                      f"tier: {e}", stacklevel=2)
        tier.run_blocks_dropped += len(run)
    tier.spill_read_s += time.perf_counter() - t0

  def _anchor_blocks(self, block) -> list["_Spilled"]:
    """The exact blocks a continuation's first block continues, keyed as the continuation's
    chain (their K/V is as that prompt computed it: exact), root first; [] for a block that is
    not a continuation's first."""
    if block.anchor is None:
      return []
    exact = self.prefix_cache.chain_to(block.anchor)
    out, key = [], block.root
    for b in exact:
      key = hash_tokens(b.tokens, key)
      out.append(_Spilled(key, b.tokens, frozenset(), b.page, b.depth))
    if len(exact) != block.depth or key != block.parent:  # not while the anchor is held
      return []
    return out

  def _plan_loads(self, lease: Lease, from_host: dict[int, HostSegment], policy) -> None:
    """Pages for each host-tier hit, and the copy that fills layers [T, L) of them (every layer
    when T = 0). Best effort: a hit that finds no pages is computed afresh, as on a miss."""
    if not from_host:
      return
    first_layer = int(policy.layer_threshold)
    for i, seg in from_host.items():
      try:
        pages = self.allocator.allocate(seg.n_pages)
      except PoolExhausted:
        continue
      # The lease's own entry, never in the segment cache: a partial copy (layers [T, L)) must
      # not serve a request of another threshold. The lease pins it once (released in _unpin).
      entry = SegmentEntry(seg.key, seg.token_ids, pages, seg.positions, pin_count=1,
                           namespace=seg.namespace)
      lease.loads.append(HostLoad(entry, seg, first_layer))
      lease.hits[i] = entry

  def _unpin(self, lease: Lease) -> None:
    loaded = {id(load.entry) for load in lease.loads}
    for entry in lease.hits.values():
      if id(entry) in loaded:
        entry.pin_count -= 1
      else:
        self.segment_cache.unpin(entry)
    lease.hits = {}
    for load in lease.loads:
      if self._promotable(load):
        # Every layer is in the pool now: the segment moves up (the pool holds it, the host no
        # longer does), so its next request needs no copy.
        self.segment_cache.insert(load.entry.token_ids, load.entry.pages, load.entry.positions,
                                  load.entry.namespace)
        if self.host_tier.get(load.source.key) is load.source:
          self.host_tier.remove(load.source.key)
      self.allocator.decref(load.entry.pages)
    lease.loads = []
    for seg in lease.host_pins:
      self.host_tier.unpin(seg)
    lease.host_pins = []

  def _leave_host(self, key: str) -> None:
    """A segment now cached whole in the pool leaves the host tier (one copy, nearest first); a
    lease loading it keeps its pinned object."""
    if self.host_tier is not None and key in self.host_tier:
      self.host_tier.remove(key)

  def _promotable(self, load: HostLoad) -> bool:
    return (load.written and load.first_layer == 0
            and load.source.key not in self.segment_cache)

  def _read_for_host(self, pages, padded=stored_pages) -> tuple:
    """K, V of pool pages for the host tier: read straight into its pinned host memory without
    waiting where it can (`Staged`, None; padded to padded(n) pages), else as numpy arrays (a
    blocking copy)."""
    if self.host_tier.reads_into_memory():
      n = len(pages)
      k, v = self.page_io.read_pages_into(pages, padded(n), self.host_tier.split_layer,
                                          self.host_tier.memory)
      return Staged(StoredKV(k), StoredKV(v), n), None
    return self.page_io.read_pages(pages)

  def _spill_to_host(self, entry: SegmentEntry) -> None:
    """The segment cache's on_evict: reads the entry's K/V off the device into the host tier
    (inside the allocation that evicts: a dispatch into pinned host memory on a GPU, else a
    blocking device-to-host copy)."""
    t0 = time.perf_counter()
    self.host_tier.spill_reads += 1
    try:
      k, v = self._read_for_host(entry.pages)
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"segment {entry.key[:12]} evicted but not read to the host tier: {e}",
                    stacklevel=2)
      self.host_tier.dropped.add(entry.key)
      return
    self.host_tier.spill_read_s += time.perf_counter() - t0
    try:  # staging into pinned host memory can fail (host memory exhausted): drop, counted
      self.host_tier.put(entry.token_ids, entry.positions, k, v, entry.namespace)
    except Exception as e:  # pylint: disable=broad-except
      warnings.warn(f"segment {entry.key[:12]} evicted but not kept in the host tier: {e}",
                    stacklevel=2)
      self.host_tier.dropped.add(entry.key)

  def release(self, lease: Lease) -> None:
    """Drops a lease's page references and pins (idempotent)."""
    self._unpin(lease)
    for run in lease.run_pins:  # its loads' pages are among exact_pages
      self.host_tier.unpin(run)
    lease.run_pins, lease.run_loads = [], []
    for name in ("exact_pages", "own_pages"):
      pages = getattr(lease, name)
      if pages.size:  # (-1: a host block's page, not allocated yet when acquire failed)
        self.allocator.decref(pages[pages >= 0])
        setattr(lease, name, np.zeros(0, np.int32))
    self._live.pop(id(lease), None)

  # ---- after a prefill ----

  def keep_alone(self, prompt: Prompt, lease: Lease) -> None:
    """Hands a prompt computed alone from position 0 to the segment cache (its own pages, no copy).

    Only the segment cache keeps a reference once the lease is released: a page held by two
    caches could never be evicted (eviction frees pages only one holder references).
    """
    n = prompt.token_ids.size
    entry = self.segment_cache.insert(prompt.token_ids,
                                      lease.page_table[:self.layout.pages_for(n)],
                                      np.arange(n, dtype=np.int32), prompt.namespace)
    self._leave_host(entry.key)

  @contextlib.contextmanager
  def commit(self, prompts: Sequence[Prompt], plans: Sequence[LabelledPrompt],
             policy: ReusePolicy) -> Iterator[SlotCopies]:
    """After a prefill: registers the exact prefix blocks, and yields the copies that move each
    cacheable segment computed in context (it missed the segment cache) into pages of its own.
    When the `with` block ends cleanly the copied segments are cached; if it raises, their pages
    are freed and nothing is cached.

    Only full blocks before the first approximate token (the first reused one, or the first of a
    continuation) become prefix blocks: the K/V after it is approximate and must never be served
    as an exact hit. A prompt with any approximate K/V goes whole into the continuation cache, for
    the prompts that continue it. Caching is best effort: a full pool skips a segment instead of
    failing the request.
    """
    copies, pending = SlotCopies(), []
    layout = self.layout
    for prompt, plan in zip(prompts, plans):
      if policy.writes_prefix_cache:
        self._keep_blocks(prompt.token_ids, prompt.namespace, plan, policy)
      if not policy.writes_segment_cache:
        continue
      for start, end, seg_ids, cacheable in prompt.spans:
        if not cacheable or np.any(plan.labels[start:end] == REUSED):
          continue
        if segment_key(seg_ids, prompt.namespace) in self.segment_cache:
          continue
        try:
          pages = self.allocator.allocate(layout.pages_for(end - start))
        except PoolExhausted:  # caching is best effort
          continue
        positions = np.arange(start, end, dtype=np.int32)
        pending.append((seg_ids, pages, positions, prompt.namespace))
        copies.src_slots.append(layout.slot_of(plan.page_table, positions))
        copies.dst_slots.append(layout.slot_of(pages, positions - start))
    try:
      yield copies
    except BaseException:
      for _, pages, _, _ in pending:
        self.allocator.decref(pages)
      raise
    for seg_ids, pages, positions, namespace in pending:
      self._leave_host(self.segment_cache.insert(seg_ids, pages, positions, namespace).key)
      self.allocator.decref(pages)

  def keep_output(self, prompt: Prompt, plan: LabelledPrompt, generated: Sequence[int],
                  policy: ReusePolicy) -> int:
    """After a request finished decoding, before its lease is released: caches the K/V its decode
    loop wrote, that of every generated token but the last (the only one never fed back), as
    `commit` caches the prompt's. A chat's next turn resends the answer after the prompt, so it
    continues past the answer instead of computing it again (vLLM caches generated blocks the
    same way). The answer's K/V is exact if the whole prompt's was (prefix cache) and an
    approximate history's continuation otherwise; served only as a whole, as every continuation
    is, so a later prompt gets exactly the state this decode had. Best effort: nothing is
    allocated. Returns the number of generated tokens now in full cached blocks."""
    fed = np.asarray(generated, np.int32)[:-1]
    if not policy.writes_prefix_cache or not fed.size:
      return 0
    n = prompt.token_ids.size
    tokens = np.concatenate([prompt.token_ids, fed])
    if tokens.size // self.layout.page_size <= n // self.layout.page_size:
      return 0  # no block the prompt's commit did not already see
    self._keep_blocks(tokens, prompt.namespace, plan, policy)
    kept = int(tokens.size // self.layout.page_size * self.layout.page_size - n)
    self.output_tokens_kept += kept
    return kept

  def _keep_blocks(self, tokens: np.ndarray, namespace: str, plan: LabelledPrompt,
                   policy: ReusePolicy) -> None:
    """Caches the full blocks of `tokens` (the plan's prompt, then possibly what its decode fed
    back), whose K/V is in plan.page_table: exact ones in the prefix cache; from the first block
    with approximate K/V on (a reused token, or a continued one), the whole sequence in the
    continuation cache, for the prompts that continue it."""
    layout = self.layout
    exact_until = tokens.size  # an exact prompt: what its decode wrote is exact too
    reused = np.flatnonzero(plan.labels == REUSED)
    if reused.size:
      exact_until = int(reused[0])
    if plan.n_continued:  # the continued history is approximate from where it began
      exact_until = min(exact_until, plan.n_exact - plan.n_continued)
    n_blocks = exact_until // layout.page_size
    if n_blocks:
      self.prefix_cache.insert(tokens[:n_blocks * layout.page_size], plan.page_table[:n_blocks],
                               namespace)
    n_full = tokens.size // layout.page_size
    if policy.reads_segment_cache and n_blocks < n_full:
      self.continuation_cache.insert(
          tokens, plan.page_table[:n_full], continuation_namespace(namespace, policy),
          first_block=n_blocks, anchor=lambda: self._hold_anchor(tokens, namespace, n_blocks))

  # ---- maintenance ----

  def _hold_anchor(self, tokens: np.ndarray, namespace: str, n_blocks: int) -> bytes:
    key = self.prefix_cache.block_key(tokens, namespace, n_blocks)
    self.prefix_cache.hold(key)
    return key

  def _release_anchor(self, block) -> None:
    if block.anchor is not None:
      self.prefix_cache.release(block.anchor)

  def contains_segment(self, token_ids, namespace: str = "") -> bool:
    """In the pool or in the host tier."""
    key = segment_key(token_ids, namespace)
    return key in self.segment_cache or (self.host_tier is not None and key in self.host_tier)

  def invalidate(self) -> None:
    """The device pool was lost: forget every cached block and segment (live requests keep their
    own references and release them as usual)."""
    self.prefix_cache.drop_all()
    self.continuation_cache.drop_all()
    self.segment_cache.drop_all()
    for lease in self._live.values():  # their copies went with the pool: never promote them
      for load in lease.loads:
        load.written = False

  def clear(self) -> int:
    """Drops every cached block and segment that no live request holds; returns pages freed."""
    if self.host_tier is not None:
      self.host_tier.clear()
    # Continuations first: they release the exact blocks they hold.
    freed = self.continuation_cache.clear()
    return freed + self.prefix_cache.clear() + self.segment_cache.clear()

  @property
  def num_cached_pages(self) -> int:
    """Pages the caches hold (each holds its own pages; no page is in two)."""
    return (self.prefix_cache.cached_pages().size + self.continuation_cache.cached_pages().size
            + self.segment_cache.num_pages)

  def stats(self, namespace: str | None = None) -> dict:
    """Counters over every namespace (the operator's view); with a namespace, only that
    namespace's segment-cache entries (what a caller of that namespace may be shown)."""
    bpp = self.layout.bytes_per_page
    if namespace is not None:
      return {"segment_cache": self.segment_cache.stats(bpp, namespace)}
    out = {"pool": self.allocator.stats(bpp), "prefix_cache": self.prefix_cache.stats(bpp),
           "continuation_cache": self.continuation_cache.stats(bpp),
           "segment_cache": self.segment_cache.stats(bpp),
           "output_tokens_kept": self.output_tokens_kept}
    if self.host_tier is not None:
      out["host_tier"] = self.host_tier.stats()
    return out

  def check_invariants(self) -> None:
    """Every page's refcount equals the references the caches and the live leases hold."""
    self.allocator.check_invariants()
    self.prefix_cache.check_invariants()
    self.continuation_cache.check_invariants()
    self.segment_cache.check_invariants()
    held = np.zeros(self.layout.num_pages, np.int64)
    for pages in (self.prefix_cache.cached_pages(), self.continuation_cache.cached_pages(),
                  self.segment_cache.cached_pages()):
      np.add.at(held, pages.astype(np.int64), 1)
    pins: dict[str, int] = {}
    for lease in self._live.values():
      np.add.at(held, lease.exact_pages[lease.exact_pages >= 0].astype(np.int64), 1)
      np.add.at(held, lease.own_pages.astype(np.int64), 1)
      for load in lease.loads:
        np.add.at(held, load.entry.pages.astype(np.int64), 1)
      for entry in lease.hits.values():
        if self.segment_cache.get(entry.key) is entry:  # not a host load's own entry
          pins[entry.key] = pins.get(entry.key, 0) + 1
    refcounts = self.allocator.refcounts(np.arange(self.layout.num_pages))
    bad = np.flatnonzero(held != refcounts)
    if bad.size:
      raise AssertionError(f"pages {bad[:8].tolist()}: refcounts {refcounts[bad[:8]].tolist()} "
                           f"but caches and live requests hold {held[bad[:8]].tolist()}")
    for key in self.segment_cache.keys():
      entry = self.segment_cache.get(key)
      if entry.pin_count != pins.get(key, 0):
        raise AssertionError(f"segment {key[:12]} has {entry.pin_count} pins, live requests "
                             f"hold {pins.get(key, 0)}")
    if self.host_tier is not None:
      self.host_tier.check_invariants()
      host_pins: dict[int, int] = {}
      for lease in self._live.values():
        for seg in lease.host_pins + lease.run_pins:
          host_pins[id(seg)] = host_pins.get(id(seg), 0) + 1
      for key in self.host_tier.keys():
        seg = self.host_tier.get(key)
        if isinstance(seg, HostRun):
          if seg.pin_count != host_pins.get(id(seg), 0):
            raise AssertionError(f"host run {key[:16]} has {seg.pin_count} pins, live requests "
                                 f"hold {host_pins.get(id(seg), 0)}")
          continue
        if key in self.segment_cache:
          raise AssertionError(f"segment {key[:12]} is in the pool and the host tier")
        if seg.pin_count != host_pins.get(id(seg), 0):
          raise AssertionError(f"host segment {key[:12]} has {seg.pin_count} pins, live "
                               f"requests hold {host_pins.get(id(seg), 0)}")
