"""The host-memory tier: segments evicted from the GPU pool, kept in host memory under a byte budget.

Host side, plain numpy (never traced). Three tiers hold a segment's K/V, nearest first:

    pool (device pages, segment_cache.py)  ->  host (this module)  ->  disk (persist.py)

- Down: when the segment cache evicts an entry to free pages, the KV store reads its pages to the
  host (KVStore._spill_to_host) and `put`s it here. When the host budget is full, the least
  recently used unpinned segments go down to the disk tier (the `spill` callback, when a cache dir
  is configured) or are dropped and counted (`dropped`): a segment is never lost unreported.
- Up: a request whose segment misses the pool but hits here gets it copied into fresh pool pages
  before its prefill (KVStore._lease plans the copy as a `HostLoad`; the step runner issues it).
  Only layers [T, L) are needed for a policy with layer threshold T: the full layers [0, T)
  recompute every reused token and write their fresh K/V before any attention reads it, so the
  cached K/V of those layers is never read (docs/TIERS.md). Only those are written to the pool;
  what crosses the bus is the stored array(s) that hold them (Layout, below).

Pins: a segment a lease is loading is pinned (never evicted or spilled) until the lease is
released. A segment is in the pool or here, never both (the KV store moves it).

Layout: each segment's K and V are kept as at most two arrays along the layers, [0, split) and
[split, L) ([l, K, n, S, H] each), `split` the tier's split layer: the engine's default layer
threshold T. A load for that T stages the [split, L) array alone: one transfer per K or V, not
one per layer (round 15 kept one array per layer: issuing 56 per Llama-3-8B segment took about
48 ms of host time per 8K request on the H200, about 57 us an array, docs/TIERS.md). A T above
the split stages the [split, L) array and the write program drops layers [split, T) on the
device (bytes_moved counts them); a T below it stages both arrays. n is padded once, when the
segment arrives, to the page bucket the copy program compiles for (`stored_pages`), so a load
copies nothing on the host.
On a GPU the arrays live in page-locked host memory (`host_memory`): the copy to the device
is then a DMA that runs while the host goes on, at the bus's speed, instead of jax staging
pageable numpy through its own buffer (which took 8 ms per 59 MB segment on the H100, about
7 GB/s, on the host thread: docs/TIERS.md).

Continuations: the continuation cache's blocks (a chat's history as its reuse method computed it,
kv/prefix_cache.py) that the pool evicts come here too, as *runs*: chains of consecutive blocks
read off the device together, one array per K and V for the run (HostRun). A prompt that goes
on with such a history gets those blocks copied into fresh pool pages before its prefill (every
layer: a continued token is read as exact by the full layers too), instead of recomputing them.
Runs share the segments' budget and LRU; below this tier they are dropped and counted (the disk
format holds segments). A run's blocks stay here when they are loaded: their K/V never changes,
so a block the pool evicts again needs no read.

Compact storage: host_dtype "int8" or "fp8" (float8_e4m3fn) keeps K and V in 8 bits with one
float32 scale per token row and kv head (max |x| over the head dimension / the format's max);
the copy to the device carries the 8-bit values and the scales and dequantises on the device
(programs/copy.write_page_layers), so it moves about half the bytes of a 16-bit tier.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import math
import os
import threading
import time
from typing import Callable, NamedTuple

import numpy as np

from sparsex_jax.kv import layout
from sparsex_jax.kv.prefix_cache import as_token_array
from sparsex_jax.kv.segment_cache import find_exact, segment_key

# "native": the pool's own dtype (exact round trip); "int8"/"fp8": 8 bits with per-row scales.
HOST_DTYPES = ("native", "int8", "fp8")
_INT8_MAX = 127.0
_FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def host_memory(device, pool_sharding=None):
  """Where host-tier arrays live, the one place this is decided: a jax sharding in "pinned_host"
  memory of `device` (page-locked, so that the host-to-device copy is a DMA the runtime runs while
  the host and the device go on) on a GPU that has such memory; None, plain numpy (pageable, which
  jax stages through a buffer of its own on each copy), elsewhere: on the CPU there is no bus to
  cross, and pinning would only take memory from the OS. Under a mesh, pool_sharding (the
  pool's): the arrays keep the pool's layout in pinned memory, so that each device copies its own
  KV heads in and out."""
  if device is None or device.platform != "gpu":
    return None
  if "pinned_host" not in {m.kind for m in device.addressable_memories()}:
    return None
  if pool_sharding is not None:
    return pool_sharding.with_memory_kind("pinned_host")
  import jax
  return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


# XLA's pinned host memory on a GPU is one pool per device (a BFC allocator that grows on demand
# up to this many GiB, read once when the GPU client starts), and the same pool stages the
# host-to-device copy of every numpy input a program is given. The host tier lives in it. Round
# 22's load run gave a 64 GiB tier the default 64 GiB pool: allocations failed with "Out of host
# memory" (continuation blocks dropped) and the server stopped answering (docs/serving_log.md).
PINNED_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
PINNED_DEFAULT_GIB = 64
# The tier's share of that pool at most: the rest stages every other transfer and absorbs the
# allocator's rounding over the tier's many padded sizes.
PINNED_TIER_SHARE = 0.75


def pinned_limit_bytes() -> int:
  """The pinned host pool XLA allows this process ($XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, in GiB)."""
  raw = os.environ.get(PINNED_LIMIT_ENV, "").strip()
  try:
    gib = int(raw) if raw else PINNED_DEFAULT_GIB
  except ValueError:
    raise ValueError(f"{PINNED_LIMIT_ENV}={raw!r}: XLA reads a whole number of GiB") from None
  return gib << 30


def pinned_gib_for(budget_bytes: int) -> int:
  """The pinned pool (whole GiB) a tier of budget_bytes needs: budget / PINNED_TIER_SHARE."""
  return math.ceil(int(budget_bytes) / PINNED_TIER_SHARE / 2**30)


def check_pinned_budget(budget_bytes: int) -> None:
  """Raises ValueError if a tier of budget_bytes in pinned host memory does not fit the pool XLA
  allows (at most PINNED_TIER_SHARE of it), naming the setting that would make it fit."""
  limit = pinned_limit_bytes()
  if int(budget_bytes) > PINNED_TIER_SHARE * limit:
    raise ValueError(
        f"host_cache_bytes={int(budget_bytes) / 2**30:.1f} GiB does not fit the pinned host memory "
        f"XLA gives this process: {limit >> 30} GiB ({PINNED_LIMIT_ENV}="
        f"{os.environ.get(PINNED_LIMIT_ENV) or f'unset: {PINNED_DEFAULT_GIB}'}), of which the "
        f"host tier may take {PINNED_TIER_SHARE:.0%} (the rest stages every other host-to-device "
        f"copy). Set {PINNED_LIMIT_ENV}={pinned_gib_for(budget_bytes)} before jax starts (the "
        f"sparsex CLI does this for --host-cache-bytes), or lower host_cache_bytes to "
        f"{PINNED_TIER_SHARE * limit / 2**30:.1f} GiB")


def reserve_pinned_memory(budget_bytes: int) -> bool:
  """Raises XLA's pinned host pool so that a host tier of budget_bytes fits (check_pinned_budget),
  where it is too small, nobody set it, jax has not started its backends (the setting is read
  once, then) and the machine has the memory (at most 90% of its RAM pinned). Returns whether it
  set it; where it did not, the engine's check explains what to do."""
  from jax._src import xla_bridge  # backends_are_initialized: no public equivalent
  need = pinned_gib_for(budget_bytes)
  if os.environ.get(PINNED_LIMIT_ENV) or need <= PINNED_DEFAULT_GIB:
    return False
  if xla_bridge.backends_are_initialized():
    return False
  try:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return False
  if need << 30 > 0.9 * ram:
    return False
  os.environ[PINNED_LIMIT_ENV] = str(need)
  return True


def stored_pages(n_pages: int) -> int:
  """Pages a segment of n_pages is padded to in the host tier: the copy program compiles once per
  padded size, and a bucket of a quarter octave wastes at most 25% (a power of two, up to 100%)."""
  return layout.page_bucket(n_pages, steps_per_octave=4)


# A history evicted from the pool goes to the host tier as runs of consecutive blocks, cut into
# pieces of at most RUN_BLOCKS blocks, each padded to a power of two (run_pages). Evictions cut a
# history anywhere, so its runs have every length; padded as segments are, each length bucket
# was a read program and up to three write programs (the whole run, or its layers below and above
# T), compiled on the engine loop as new lengths came: 32 programs against prefix-only's 11 on a
# CPU run of the serving benchmark (round 19). In pieces: at most six sizes, 1 to 32 pages; the
# padding is that of the last piece of a run, under 32 pages.
RUN_BLOCKS = 32


def run_pages(n_blocks: int) -> int:
  """Pages a piece of a run of n_blocks (<= RUN_BLOCKS) is padded to in the host tier."""
  return layout.page_bucket(n_blocks, steps_per_octave=1)


# ------------------------------------------------------------------------------------------------
# 8-bit storage
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StoredKV:
  """K or V of one segment as the host tier keeps it, or the part of it a load stages: values in
  consecutive layer ranges from start_layer up to the segment's last layer, one array per range
  ([l, K, n, S, H]; the tier keeps at most two, split at its split layer) and, when they are
  8-bit, float32 scales split the same way ([l, K, n, S, 1], one per token row and kv head). The
  arrays are numpy or jax arrays in pinned host memory (`staged`, `host_memory`)."""

  values: tuple
  scale: tuple | None = None
  start_layer: int = 0  # the layer values[0] begins with

  @property
  def nbytes(self) -> int:
    return sum(int(x.nbytes) for x in self.values + (self.scale or ()))

  @property
  def end_layer(self) -> int:
    """One past the last layer held (L for a whole segment)."""
    return self.start_layer + sum(int(x.shape[0]) for x in self.values)

  def covering(self, first: int, end: int | None = None) -> "StoredKV":
    """The arrays that hold layers [first, end) (end None: L), whole (no copy): from the one
    holding layer `first` to the one holding layer end - 1, so they may begin below `first`
    and end above `end` (what a load stages and moves)."""
    start, i = self.start_layer, 0
    while i < len(self.values) and start + int(self.values[i].shape[0]) <= first:
      start += int(self.values[i].shape[0])
      i += 1
    j, stop = i, start
    while j < len(self.values) and (end is None or stop < end):
      stop += int(self.values[j].shape[0])
      j += 1
    return StoredKV(self.values[i:j], None if self.scale is None else self.scale[i:j], start)

  def cut_at(self, layer: int) -> bool:
    """Whether one of the arrays begins at `layer` (a load from it stages nothing below)."""
    start = self.start_layer
    for x in self.values:
      if start == layer:
        return True
      start += int(x.shape[0])
    return False

  def staged(self, memory) -> "StoredKV":
    """The same K or V in `memory` (a jax sharding: pinned host memory); one batched copy."""
    import jax  # the host tier itself is numpy; only staging needs jax
    leaves = jax.device_put(list(self.values + (self.scale or ())), memory)
    n = len(self.values)
    return StoredKV(tuple(leaves[:n]), None if self.scale is None else tuple(leaves[n:]),
                    self.start_layer)


@dataclasses.dataclass(frozen=True)
class Staged:
  """K and V of n_pages already in the tier's form (padded to stored_pages(n_pages), cut at its
  split layer, in its memory), for `put` and `put_run` in place of numpy arrays (v unused)."""

  k: StoredKV
  v: StoredKV
  n_pages: int


def split_layers(x, split_layer: int) -> tuple:
  """x [L, ...] as the tier keeps it: (x[:split], x[split:]) for 0 < split < L, else (x,)."""
  cuts = layout.layer_cuts(x.shape[0], split_layer)
  return tuple(np.ascontiguousarray(x[lo:hi]) for lo, hi in zip(cuts, cuts[1:]))


def _fp8():
  import ml_dtypes  # ships with jax
  return ml_dtypes.float8_e4m3fn


def stored_dtype(host_dtype: str, native):
  """The dtype the tier keeps values of a pool of dtype `native` in (scales: float32)."""
  return {"native": native, "int8": np.int8, "fp8": _fp8()}[host_dtype]


def quantize(x: np.ndarray, host_dtype: str, split_layer: int = 0) -> StoredKV:
  """x [L, ..., H] in host_dtype ("native": kept as it is), in the arrays `split_layers` cuts."""
  if host_dtype == "native":
    return StoredKV(split_layers(x, split_layer))
  if host_dtype not in HOST_DTYPES:
    raise ValueError(f"host_cache_dtype must be one of {HOST_DTYPES}, got {host_dtype!r}")
  x = np.asarray(x, np.float32)
  top = _INT8_MAX if host_dtype == "int8" else _FP8_MAX
  scale = (np.max(np.abs(x), axis=-1, keepdims=True) / top).astype(np.float32)
  # A row of zeros has scale 0: divide by 1 there (its values are 0 whatever the scale).
  scaled = x / np.where(scale > 0, scale, np.float32(1))
  if host_dtype == "int8":
    values = np.clip(np.rint(scaled), -_INT8_MAX, _INT8_MAX).astype(np.int8)
  else:
    values = np.clip(scaled, -_FP8_MAX, _FP8_MAX).astype(_fp8())
  return StoredKV(split_layers(values, split_layer), split_layers(scale, split_layer))


def dequantize(stored: StoredKV, dtype=np.float32) -> np.ndarray:
  """The values back in `dtype`, layers [stored.start_layer, L) (the host-side twin of
  write_page_layers' device dequantise)."""
  values = np.concatenate([np.asarray(x) for x in stored.values])
  if stored.scale is None:
    return values.astype(dtype, copy=False)
  scale = np.concatenate([np.asarray(x) for x in stored.scale])
  return (values.astype(np.float32) * scale).astype(dtype)


# ------------------------------------------------------------------------------------------------
# The tier
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class HostSegment:
  """One segment in host memory (arrays read-only; pin_count is the tier's)."""

  key: str
  token_ids: np.ndarray  # int32 [n]
  positions: np.ndarray  # int32 [n]: where each token's K/V was computed
  namespace: str
  k: StoredKV  # pages padded to stored_pages(n_pages)
  v: StoredKV
  n_pages: int  # the segment's own pages (the rest of the stored ones are zeros)
  pin_count: int = 0

  @property
  def nbytes(self) -> int:
    return self.k.nbytes + self.v.nbytes

  def restored(self, dtype) -> tuple[np.ndarray, np.ndarray]:
    """K, V [L, K, n_pages, S, H] in `dtype` (for the disk tier, which stores the pool dtype)."""
    return (dequantize(self.k, dtype)[:, :, :self.n_pages],
            dequantize(self.v, dtype)[:, :, :self.n_pages])


@dataclasses.dataclass(eq=False)
class HostRun:
  """Consecutive blocks of a continuation chain in host memory (arrays read-only; pin_count is
  the tier's). Block j holds tokens[j] at block index first_depth + j of its prompts, keyed
  block_keys[j] (the continuation cache's chained key); tails[j] are the last tokens of the
  earlier prompts it ended (the whole-prompt rule, prefix_cache.whole_prompt_end)."""

  key: str  # "run:" + the first block's key (hex)
  block_keys: tuple[bytes, ...]
  tokens: np.ndarray  # int32 [n_pages, page_size]
  tails: tuple[frozenset[bytes], ...]
  first_depth: int
  k: StoredKV  # [L, K, run_pages(n_pages), S, H]
  v: StoredKV
  n_pages: int
  pin_count: int = 0

  @property
  def nbytes(self) -> int:
    return self.k.nbytes + self.v.nbytes


def run_key(first_block_key: bytes) -> str:
  return "run:" + first_block_key.hex()


class HostBlock(NamedTuple):
  """Block `index` of a run in the host tier (what a continuation's walk finds there)."""

  run: "HostRun"
  index: int

  @property
  def tails(self) -> frozenset:
    return self.run.tails[self.index]


class _LayerCopy:
  """A copy of layers [first_layer, end_layer) (end None: L) of a host entry (`source`) into
  pool pages: what it stages and the bytes it moves."""

  def parts(self) -> tuple[StoredKV, StoredKV]:
    """The arrays of K and V that hold its layers, whole (no copy)."""
    return (self.source.k.covering(self.first_layer, self.end_layer),
            self.source.v.covering(self.first_layer, self.end_layer))

  @property
  def nbytes(self) -> int:
    """Bytes it moves to the device: the arrays that hold its layers, K and V with their scales
    (exactly its layers when they begin at the tier's split layer; more where an array begins
    lower or ends higher)."""
    k, v = self.parts()
    return k.nbytes + v.nbytes


@dataclasses.dataclass(eq=False)
class RunLoad(_LayerCopy):
  """A copy of layers [first_layer, end_layer) of some blocks of a host run into pool pages the
  lease holds (in its page table, as continued history). pages[j] receives block j of the run;
  -1: not copied. A continued token is read as exact by every layer, so a request needs all of
  them: [0, T) before the prefill's first half, [T, L) before its second (where the prefill runs
  in halves and the run is cut at T: step_runner._host_copies), or every layer before the
  first."""

  pages: np.ndarray  # int32 [source.n_pages]
  source: HostRun  # pinned until the lease is released
  first_layer: int = 0
  end_layer: int | None = None  # None: the model's last layer + 1
  written: bool = False
  staged: object = None
  issue_s: float = 0.0


@dataclasses.dataclass(eq=False)
class HostLoad(_LayerCopy):
  """A copy from the host tier into pool pages that a lease holds (KVStore._lease plans it, the
  step runner issues it before the prefill). `entry` is a SegmentEntry owned by the lease (not in
  the segment cache) whose pages receive layers [first_layer, L) of `source`."""

  entry: object  # SegmentEntry (pages: the lease's own reference)
  source: HostSegment  # pinned until the lease is released
  first_layer: int
  written: bool = False  # the device copy was issued on a pool that is still valid
  staged: object = None  # the device arrays whose copy start_loads started (until written)
  issue_s: float = 0.0  # host time spent issuing it

  end_layer = None  # every load of a segment runs to the model's last layer

  @property
  def pages(self) -> np.ndarray:
    return self.entry.pages


# spill(segment) -> True if the segment is now in the tier below (disk), False if it was dropped.
Spill = Callable[[HostSegment], bool]


class LoadClock:
  """How long each request's host-tier copies were in flight, and how much of that the prefill's
  full layers hid (docs/TIERS.md "What overlaps").

  Nothing on the request's path waits: two waiter threads block (without the GIL) on the staged
  copies and on the first half's output and note when each became ready. A copy still in flight
  when the full layers are done holds the rest of the prefill up: that part is exposed, the rest
  hidden. With no first half (T = 0: every layer copied, none computed first) all of it is
  exposed. Failed copies are not timed (they are counted in failed_loads). A waiter notes a
  time when it gets to its request, so with more requests' copies in flight than waiters the
  later ones read late (the benchmark times one request at a time).
  """

  def __init__(self):
    self._waiters = None  # a thread pool, started at the first timed request
    # (issued, copies ready at, full layers ready at or None) per request not yet summed
    self._pending: list[tuple[float, concurrent.futures.Future, object]] = []
    self._lock = threading.Lock()
    self.timed = 0  # requests whose copies were timed
    self.copy_s = 0.0  # issue to copies ready, summed over those requests
    self.exposed_s = 0.0  # of which after the full layers were done
    self.hidden_s = 0.0  # of which while they ran

  def time(self, staged, full_layers, issued: float) -> None:
    """Times one request's copies (the staged device arrays), issued at `issued`
    (time.perf_counter), against the full layers' output (None: no first half)."""
    if not staged:
      return
    if self._waiters is None:
      self._waiters = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="load-clock")
    copies = self._waiters.submit(_ready_at, staged)
    full = None if full_layers is None else self._waiters.submit(_ready_at, full_layers)
    with self._lock:
      self._pending.append((issued, copies, full))
    self.collect()

  def collect(self, wait: bool = False) -> None:
    """Adds the requests whose copies are ready to the sums (all of them, waiting, with wait)."""
    with self._lock:
      pending, self._pending = self._pending, []
    left = []
    for issued, copies, full in pending:
      if not wait and not (copies.done() and (full is None or full.done())):
        left.append((issued, copies, full))
        continue
      if copies.exception() is not None or (full is not None and full.exception() is not None):
        continue
      ready = copies.result()
      copy = ready - issued
      exposed = copy if full is None else min(copy, max(0.0, ready - full.result()))
      with self._lock:
        self.timed += 1
        self.copy_s += copy
        self.exposed_s += exposed
        self.hidden_s += copy - exposed
    with self._lock:
      self._pending = left + self._pending


def _ready_at(tree) -> float:
  import jax
  jax.block_until_ready(tree)
  return time.perf_counter()


class HostTier:
  """key -> HostSegment, LRU under a byte budget, with pins; overflow goes to `spill`."""

  def __init__(self, budget_bytes: int, host_dtype: str = "native", spill: Spill | None = None,
               memory=None, split_layer: int = 0):
    """memory: a jax sharding in pinned host memory to keep the arrays in (None: numpy).
    split_layer: where each segment's K and V are cut in two (the layer threshold most loads
    use, so that they stage one array each; 0 or >= L: kept whole). Segments keep the cut they
    were stored with, so changing it affects only those put afterwards."""
    if int(budget_bytes) < 0:
      raise ValueError(f"host_cache_bytes must be >= 0, got {budget_bytes}")
    if host_dtype not in HOST_DTYPES:
      raise ValueError(f"host_cache_dtype must be one of {HOST_DTYPES}, got {host_dtype!r}")
    self.budget_bytes = int(budget_bytes)
    self.host_dtype = host_dtype
    self.spill = spill
    self.memory = memory
    self.split_layer = int(split_layer)
    # Segments and continuation runs, least recently used first.
    self._entries: collections.OrderedDict[str, HostSegment | HostRun] = collections.OrderedDict()
    self._run_blocks: dict[bytes, tuple[HostRun, int]] = {}  # block key -> its run, its index
    self.bytes_used = 0
    self.hits = 0  # lookups that found the segment here
    self.misses = 0
    self.received = 0  # segments put here (evicted from the pool)
    self.bytes_in = 0  # bytes those segments took here
    self.spilled = 0  # segments sent down to the disk tier
    self.dropped: set[str] = set()  # keys dropped for want of room and of a disk tier
    self.loads = 0  # host -> pool copies issued
    self.failed_loads = 0  # copies whose transfer or pool write failed (their request failed)
    self.bytes_moved = 0  # bytes those copies staged (layers [T, L), from split_layer if T > it)
    self.bytes_all_layers = 0  # what the same copies would have moved with every layer
    self.load_issue_s = 0.0  # host time to issue the copies (they complete on the device)
    # Continuation runs (counted in blocks, one block = one pool page).
    self.run_blocks_received = 0  # blocks the pool evicted that were kept here
    self.run_blocks_dropped = 0  # blocks dropped for want of room (no tier below holds them)
    self.run_hits = 0  # blocks found here by a prompt continuing them (per lookup, as hits are)
    self.run_loads = 0  # copies of (parts of) runs issued
    self.run_blocks_loaded = 0  # blocks those copies wrote into the pool
    self.run_bytes_moved = 0
    self.spill_reads = 0  # reads of evicted pages sent here (segments and pieces of runs)
    self.spill_read_s = 0.0  # host time sending evicted pages here (a dispatch into pinned host
                             # memory, or a blocking read to numpy: KVStore._read_for_host)
    self.clock = LoadClock()  # the copies' time in flight, hidden and exposed

  def __contains__(self, key: str) -> bool:
    return key in self._entries

  def __len__(self) -> int:
    return len(self._entries)

  def keys(self) -> list[str]:
    """Least recently used first."""
    return list(self._entries)

  def get(self, key: str) -> HostSegment | None:
    return self._entries.get(key)

  def lookup(self, token_ids, namespace: str = "", pin: bool = False) -> HostSegment | None:
    """The segment for exactly these tokens, or None; counts a hit or miss, touches the LRU."""
    seg = find_exact(self._entries, token_ids, namespace)
    if seg is None:
      self.misses += 1
      return None
    self.hits += 1
    self._entries.move_to_end(seg.key)
    if pin:
      seg.pin_count += 1
    return seg

  def pin(self, seg: HostSegment | HostRun) -> None:
    """Keeps an entry from eviction (until `unpin`); the caller found it here."""
    seg.pin_count += 1

  def unpin(self, seg: HostSegment | HostRun) -> None:
    if seg.pin_count <= 0:
      raise ValueError(f"unpin of host segment {seg.key[:12]} that is not pinned")
    seg.pin_count -= 1

  def has_block(self, block_key: bytes) -> bool:
    return block_key in self._run_blocks

  def run_block(self, block_key: bytes, tokens: np.ndarray) -> HostBlock | None:
    """The run holding this continuation block and its index there, if the block holds exactly
    these tokens; touches the run in the LRU. Counted by the caller (run_hits), which may not
    take every block it finds (the whole-prompt rule)."""
    found = self._run_blocks.get(block_key)
    if found is None:
      return None
    run, j = found
    if not np.array_equal(run.tokens[j], tokens):
      return None
    self._entries.move_to_end(run.key)
    return HostBlock(run, j)

  def put_run(self, block_keys, tokens: np.ndarray, tails, first_depth: int,
              k: "np.ndarray | Staged", v: np.ndarray | None) -> bool:
    """Keeps consecutive continuation blocks (block_keys[j]: tokens[j], tails[j]) with their K/V
    [L, K, n, S, H] (n = len(block_keys); or `Staged`), making room as `put` does. Blocks
    already here must not be passed. Returns True if the run is here, False if it was dropped
    (counted)."""
    n = len(block_keys)
    if n == 0:
      return True
    if n > RUN_BLOCKS:
      raise ValueError(f"put_run: {n} blocks, more than a piece's {RUN_BLOCKS}")
    if any(key in self._run_blocks for key in block_keys):
      raise ValueError("put_run: a block of the run is already in the host tier")
    k, v, n_pages = self._stored(k, v, run_pages)
    if n_pages != n:
      raise ValueError(f"put_run: {n} blocks, K/V of {n_pages} pages")
    run = HostRun(run_key(block_keys[0]), tuple(block_keys),
                  _read_only(np.asarray(tokens, np.int32).reshape(n, -1)),
                  tuple(frozenset(t) for t in tails), int(first_depth), k, v, n)
    if not self._keep(run):
      return False
    for j, key in enumerate(run.block_keys):
      self._run_blocks[key] = (run, j)
    self.run_blocks_received += n
    return True

  def put(self, token_ids, positions, k: "np.ndarray | Staged", v: np.ndarray | None,
          namespace: str = "") -> bool:
    """Keeps a segment's K/V [L, K, n_pages, S, H] (stored in host_dtype; or K and V already
    `Staged`, v None); evicts least recently used unpinned entries down a tier to make room.
    Returns True if it is here; a segment that cannot fit (bigger than the budget, or
    everything else pinned) goes down itself."""
    tokens = as_token_array(token_ids)
    key = segment_key(tokens, namespace)
    if key in self._entries:
      self._entries.move_to_end(key)
      return True
    k, v, n_pages = self._stored(k, v)
    seg = HostSegment(key, _read_only(tokens), _read_only(np.asarray(positions, np.int32)),
                      namespace, k, v, n_pages)
    self.received += 1
    self.dropped.discard(key)
    if not self._keep(seg):
      return False
    self.bytes_in += seg.nbytes
    return True

  def _keep(self, entry: HostSegment | HostRun) -> bool:
    """Adds an entry, making room for it; one that cannot fit (bigger than the budget, or
    everything else pinned) goes down a tier itself (False)."""
    if entry.nbytes > self.budget_bytes or not self._make_room(entry.nbytes):
      self._send_down(entry)
      return False
    self._entries[entry.key] = entry
    self.bytes_used += entry.nbytes
    return True

  def _stored(self, k, v, padded=stored_pages) -> tuple[StoredKV, StoredKV, int]:
    """K and V [L, K, n_pages, S, H] as this tier keeps them (padded to padded(n_pages), in
    host_dtype, cut at split_layer, staged in `memory`), and n_pages. `Staged` K and V (read
    straight into host memory by the pool, KVPool.read_pages_into) are kept as they are."""
    if isinstance(k, Staged):
      return k.k, k.v, k.n_pages
    n_pages = int(k.shape[2])
    k, v = layout.pad_pages(k, padded(n_pages)), layout.pad_pages(v, padded(n_pages))
    k, v = (quantize(x, self.host_dtype, self.split_layer) for x in (k, v))
    if self.memory is not None:
      k, v = k.staged(self.memory), v.staged(self.memory)
    return k, v, n_pages

  def reads_into_memory(self) -> bool:
    """Whether evicted pages can be read straight into this tier's memory as it keeps them
    (pinned host memory, the pool's dtype): then an eviction waits for nothing."""
    return self.memory is not None and self.host_dtype == "native"

  def _make_room(self, n_bytes: int) -> bool:
    free = self.budget_bytes - self.bytes_used
    if free >= n_bytes:
      return True
    victims = []
    for seg in self._entries.values():
      if seg.pin_count:
        continue
      victims.append(seg)
      free += seg.nbytes
      if free >= n_bytes:
        break
    if free < n_bytes:  # evicting would not make room: evict nothing
      return False
    for seg in victims:
      self._remove(seg)
      self._send_down(seg)
    return True

  def _send_down(self, seg: HostSegment | HostRun) -> None:
    if isinstance(seg, HostRun):  # the disk tier holds segments only
      self.run_blocks_dropped += seg.n_pages
      return
    kept = False
    if self.spill is not None:
      kept = bool(self.spill(seg))
    if kept:
      self.spilled += 1
    else:
      self.dropped.add(seg.key)

  def _remove(self, seg: HostSegment | HostRun) -> None:
    del self._entries[seg.key]
    self.bytes_used -= seg.nbytes
    if isinstance(seg, HostRun):
      for key in seg.block_keys:
        del self._run_blocks[key]

  def remove(self, key: str) -> HostSegment:
    """Takes a segment out (it moved up to the pool). A lease that pinned it keeps its object."""
    seg = self._entries[key]
    self._remove(seg)
    return seg

  def clear(self) -> int:
    """Drops every unpinned segment (not sent down: an explicit clear); returns how many."""
    gone = [s for s in self._entries.values() if not s.pin_count]
    for seg in gone:
      self._remove(seg)
    return len(gone)

  def stored_nbytes(self, x: np.ndarray) -> int:
    """Bytes K (or V) [L, K, n_pages, S, H] takes here (pages padded as `put` pads them)."""
    size = x.size // x.shape[2] * stored_pages(x.shape[2])
    if self.host_dtype == "native":
      return int(size * x.itemsize)
    return int(size + 4 * (size // x.shape[-1]))  # 1-byte values, a float32 scale per row

  def note_load(self, load: HostLoad | RunLoad, issue_s: float) -> None:
    if isinstance(load, RunLoad):
      self.run_loads += 1
      if load.first_layer == 0:  # (a block copied in two parts counts once)
        self.run_blocks_loaded += int(np.count_nonzero(load.pages >= 0))
      self.run_bytes_moved += load.nbytes
      self.load_issue_s += issue_s
      return
    self.loads += 1
    self.bytes_moved += load.nbytes
    self.bytes_all_layers += load.source.nbytes
    self.load_issue_s += issue_s

  def check_invariants(self) -> None:
    total = 0
    n_blocks = 0
    for key, seg in self._entries.items():
      if isinstance(seg, HostRun):
        if key != run_key(seg.block_keys[0]):
          raise AssertionError("host run key is not its first block's")
        if any(self._run_blocks.get(b) != (seg, j) for j, b in enumerate(seg.block_keys)):
          raise AssertionError(f"host run {key[:16]}: block index is stale")
        n_blocks += seg.n_pages
      elif seg.key != key or key != segment_key(seg.token_ids, seg.namespace):
        raise AssertionError("host segment key is not its content hash")
      if seg.pin_count < 0:
        raise AssertionError("negative host pin count")
      total += seg.nbytes
    if n_blocks != len(self._run_blocks):
      raise AssertionError("the block index holds blocks of no run")
    if total != self.bytes_used:
      raise AssertionError(f"host tier bytes are stale ({self.bytes_used}, entries hold {total})")
    if self.bytes_used > self.budget_bytes:
      raise AssertionError(f"host tier over budget ({self.bytes_used} > {self.budget_bytes})")

  def stats(self) -> dict:
    return {
        "budget_bytes": self.budget_bytes, "dtype": self.host_dtype,
        "memory": "numpy" if self.memory is None else self.memory.memory_kind,
        "split_layer": self.split_layer,
        "entries": len(self._entries),
        "continuation_runs": sum(isinstance(e, HostRun) for e in self._entries.values()),
        "continuation_blocks": len(self._run_blocks),
        "continuation_blocks_received": self.run_blocks_received,
        "continuation_blocks_dropped": self.run_blocks_dropped,
        "continuation_hits": self.run_hits, "continuation_loads": self.run_loads,
        "continuation_blocks_loaded": self.run_blocks_loaded,
        "continuation_bytes_moved": self.run_bytes_moved,
        "pinned_entries": sum(1 for s in self._entries.values() if s.pin_count),
        "bytes_used": self.bytes_used, "hits": self.hits, "misses": self.misses,
        "received": self.received, "bytes_in": self.bytes_in, "spilled_to_disk": self.spilled,
        "dropped": len(self.dropped), "loads": self.loads,
        "failed_loads": self.failed_loads, "bytes_moved": self.bytes_moved,
        "bytes_all_layers": self.bytes_all_layers,
        "load_issue_s": round(self.load_issue_s, 6), "spill_read_s": round(self.spill_read_s, 6),
        "spill_reads": self.spill_reads,
        **self.load_times(),
    }

  def load_times(self, wait: bool = False) -> dict:
    """The copies' time in flight per timed request: hidden behind the full layers or exposed
    (LoadClock; with wait, after every copy issued so far is ready)."""
    self.clock.collect(wait)
    return {"loads_timed": self.clock.timed, "load_copy_s": round(self.clock.copy_s, 6),
            "load_hidden_s": round(self.clock.hidden_s, 6),
            "load_exposed_s": round(self.clock.exposed_s, 6)}


def _read_only(arr: np.ndarray) -> np.ndarray:
  arr = np.array(arr, copy=True)
  arr.flags.writeable = False
  return arr


def start_loads(tier: HostTier, loads, io) -> None:
  """Starts each pending load's host-to-device copy (`io.stage_page_layers`: asynchronous,
  nothing waits for the device here). The step runner starts them before it dispatches the
  prefill's full layers, which never read layers [T, L) of a reused segment."""
  with _failing_loads(tier, loads):
    for load in loads:
      if load.written or load.staged is not None or load.first_layer >= load.source.k.end_layer:
        continue
      t0 = time.perf_counter()
      k, v = load.parts()
      load.staged = (io.stage_page_layers(k, v), k.start_layer)
      load.issue_s += time.perf_counter() - t0


def finish_loads(tier: HostTier, loads, io) -> None:
  """Dispatches each pending load's write into its pool pages (`io.write_page_layers`; starting
  its copy first if start_loads did not) and marks it written."""
  start_loads(tier, loads, io)
  with _failing_loads(tier, loads):
    for load in loads:
      if load.written:
        continue
      t0 = time.perf_counter()
      if load.staged is not None:
        staged, start = load.staged
        io.write_page_layers(load.pages, staged, load.first_layer, start, load.end_layer)
      load.staged, load.written = None, True
      load.issue_s += time.perf_counter() - t0
      tier.note_load(load, load.issue_s)


@contextlib.contextmanager
def _failing_loads(tier: HostTier, loads):
  """On a failed copy or write: counts the loads left unwritten (stats' failed_loads) and drops
  their device copies, so that nothing holds device memory for a request that is failing. The
  host copies stay: the lease's release unpins them, and a retry loads them again."""
  try:
    yield
  except BaseException:
    pending = [load for load in loads if not load.written]
    tier.failed_loads += len(pending)
    for load in pending:
      load.staged = None
    raise
