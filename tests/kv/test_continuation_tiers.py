"""Continuations through the host tier (kv/store.py, kv/prefix_cache.py, kv/host_tier.py), host
side only: a property test over random chat sessions on a tiny pool and host budget, with a numpy
stand-in for the device pool. Each turn continues its session's whole last prompt; the pool
evicts histories (and the exact blocks they continue) to the host tier as runs, and a turn finds
its history in the pool, in the host tier, or partly in each. After every turn: every page of the
turn's exact and continued prefix holds the K/V computed for exactly those tokens (a block loaded
from the host lands in the right page, whole; a block the last turn's decode wrote, its answer,
is continued too), every page is free or referenced by exactly its holders, every host run is
pinned only by live leases, and nothing is left behind."""

import dataclasses
import hashlib

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, event, example, given, settings

from models.config import get_config
from sparsex_jax.kv import KVStore, PoolExhausted, PoolLayout
from sparsex_jax.kv.host_tier import HostTier, finish_loads
from sparsex_jax.labels import EXACT, NEW, REUSED
from sparsex_jax.prompt import Prompt
from sparsex_jax.reuse import ReuseConfig
from tests.kv.test_tier_accounting import NumpyPool

CFG = get_config("tiny")
S = 4
PASSAGES = [np.random.default_rng(50 + i).integers(3, 500, size=n).astype(np.int32)
            for i, n in enumerate((6, 9))]
SYSTEM = np.arange(10, 19, dtype=np.int32)  # 2 full blocks and a bit


def computed(tokens: np.ndarray, block: int):
  """The K/V the simulated prefill writes for block `block` of a prompt: a function of every
  token up to the block's end (what its attention saw), random, never zeros."""
  seed = hashlib.blake2b(tokens[:(block + 1) * S].tobytes(), digest_size=8).digest()
  rng = np.random.default_rng(int.from_bytes(seed, "little"))
  shape = (CFG.n_layers, CFG.n_kv_heads, S, CFG.head_dim)
  return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@dataclasses.dataclass
class Plan:
  """What KVStore.commit reads of a plan."""
  labels: np.ndarray
  page_table: np.ndarray
  n_exact: int
  n_continued: int


def _labels(prompt, lease):
  labels = np.full(prompt.token_ids.size, NEW, np.int8)
  labels[:lease.n_exact] = EXACT
  for i in lease.hits:
    start, end = prompt.spans[i][:2]
    labels[max(start, lease.n_exact):end] = REUSED
  return labels


TURN = st.tuples(st.sampled_from(["turn", "turn", "turn", "pressure"]), st.integers(0, 2),
                 st.integers(0, len(PASSAGES) - 1), st.integers(1, 9))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=st.lists(TURN, min_size=6, max_size=30), num_pages=st.integers(12, 24),
       host_pages=st.integers(0, 24), t=st.sampled_from([1, 2]))
@example(jobs=[("turn", 0, 0, 3), ("turn", 0, 0, 3), ("pressure", 0, 0, 9), ("turn", 0, 0, 3)],
         num_pages=16, host_pages=24, t=1)
def test_turns_continue_from_any_tier_with_the_right_kv_and_leak_nothing(jobs, num_pages,
                                                                        host_pages, t):
  bytes_per_page = 2 * CFG.n_layers * CFG.n_kv_heads * S * CFG.head_dim * 4
  layout = PoolLayout(num_pages, S, bytes_per_page)
  io = NumpyPool(num_pages)
  tier = HostTier(host_pages * bytes_per_page, split_layer=t)
  store = KVStore(layout, tier)
  store.page_io = io
  policy = ReuseConfig("sparsex", layer_threshold=t).resolve(CFG)
  full = ReuseConfig("full").resolve(CFG)
  for i, passage in enumerate(PASSAGES):  # cached alone: the first turns reuse them
    with store.acquire([Prompt((passage,), (True,))], full, 0) as leases:
      store.keep_alone(Prompt((passage,), (True,)), leases[0])
  histories: dict[int, list[np.ndarray]] = {}
  rng = np.random.default_rng(0)
  continued_from_host = 0
  into_answer = 0  # turns that continued past their last prompt, into the answer's blocks
  last_prompt: dict[int, int] = {}
  for kind, session, passage, n_new in jobs:
    if kind == "pressure":  # another request's allocation: the pool evicts
      short = min(n_new, store.allocator.num_reclaimable())
      store.allocator.decref(store.allocator.allocate(store.allocator.num_free + short))
      store.check_invariants()
      continue
    history = histories.get(session) or [SYSTEM, PASSAGES[passage]]
    new = rng.integers(600, 900, size=n_new).astype(np.int32)
    prompt = Prompt(tuple(history) + (new,), (False,) + (True,) * (len(history) - 1) + (False,))
    answer = rng.integers(900, 999, size=int(rng.integers(1, 7))).astype(np.int32)
    hits_before = tier.run_hits
    try:
      leases = store.acquire([prompt], policy, answer.size)
    except (PoolExhausted, ValueError):
      store.check_invariants()
      continue
    with leases:
      lease = leases[0]
      finish_loads(tier, lease.run_loads, io)
      finish_loads(tier, lease.loads, io)
      ids = prompt.token_ids
      into_answer += lease.n_exact > last_prompt.get(session, ids.size)
      last_prompt[session] = ids.size
      for b in range(lease.n_exact // S):  # exact and continued: as computed for these tokens
        k, v = computed(ids, b)
        page = lease.page_table[b]
        np.testing.assert_array_equal(io.k[:, :, page], k, err_msg=f"block {b}")
        np.testing.assert_array_equal(io.v[:, :, page], v, err_msg=f"block {b}")
      for b in range(lease.n_exact // S, ids.size // S):  # the prefill computes the rest
        io.k[:, :, lease.page_table[b]], io.v[:, :, lease.page_table[b]] = computed(ids, b)
      plan = Plan(_labels(prompt, lease), lease.page_table, lease.n_exact, lease.n_continued)
      with store.commit([prompt], [plan], policy) as copies:
        for src, dst in zip(copies.src_slots, copies.dst_slots):  # segments computed in context
          for x in (io.k, io.v):
            flat = x.reshape(CFG.n_layers, CFG.n_kv_heads, -1, CFG.head_dim)
            flat[:, :, dst] = flat[:, :, src]
      store.check_invariants()
      # The decode loop writes the K/V of every answer token but the last; then it is kept.
      fed = np.concatenate([ids, answer[:-1]])
      for b in range(ids.size // S, fed.size // S):
        io.k[:, :, lease.page_table[b]], io.v[:, :, lease.page_table[b]] = computed(fed, b)
      store.keep_output(prompt, plan, answer, policy)
      store.check_invariants()
    continued_from_host += tier.run_hits - hits_before
    histories[session] = [np.concatenate([*history, new, answer])]
    store.check_invariants()
    assert store.allocator.num_used == store.num_cached_pages  # nothing live is left
    assert all(tier.get(key).pin_count == 0 for key in tier.keys())
  event(f"blocks continued from the host tier: {'some' if continued_from_host else 'none'}")
  event(f"continuation blocks dropped: {'some' if tier.run_blocks_dropped else 'none'}")
  event(f"turns continued into an answer: {'some' if into_answer else 'none'}")


def _store_with_history_on_host(namespace=""):
  """A store whose one history (system prompt, a passage cached alone, a question) the pool
  evicted to the host tier; returns (store, the prompt that continues it)."""
  bytes_per_page = 2 * CFG.n_layers * CFG.n_kv_heads * S * CFG.head_dim * 4
  store = KVStore(PoolLayout(32, S, bytes_per_page), HostTier(64 * bytes_per_page, split_layer=1))
  store.page_io = NumpyPool(32)
  policy = ReuseConfig("sparsex", layer_threshold=1).resolve(CFG)
  full = ReuseConfig("full").resolve(CFG)
  alone = Prompt((PASSAGES[1],), (True,), namespace)
  with store.acquire([alone], full, 0) as leases:
    store.keep_alone(alone, leases[0])
  first = Prompt((SYSTEM, PASSAGES[1], np.array([7, 8, 9], np.int32)), (False, True, False),
                 namespace)
  with store.acquire([first], policy, 1) as leases:
    plan = Plan(_labels(first, leases[0]), leases[0].page_table, leases[0].n_exact,
                leases[0].n_continued)
    with store.commit([first], [plan], policy):
      pass
  store.continuation_cache.evict(10**6)
  return store, policy, first


def test_a_turn_that_finds_no_pages_for_its_host_blocks_leaves_nothing_behind(monkeypatch):
  """The pool cannot give pages to the history blocks found in the host tier: acquire fails
  (PoolExhausted) with every pool reference and host pin given back, and the next try, with
  pages, continues the history from the host."""
  store, policy, first = _store_with_history_on_host()
  tier = store.host_tier
  assert tier.stats()["continuation_blocks"] > 0
  turn = Prompt((first.token_ids, np.array([5, 5, 5, 5, 5], np.int32)), (False, False))
  allocate = store.allocator.allocate

  def exhausted(n):
    raise PoolExhausted(n, 0, 31)

  monkeypatch.setattr(store.allocator, "allocate", exhausted)
  used = store.allocator.num_used
  try:
    store.acquire([turn], policy, 1)
    raise AssertionError("acquire should have failed")
  except PoolExhausted:
    pass
  store.check_invariants()
  assert store.allocator.num_used == used == store.num_cached_pages
  assert all(tier.get(key).pin_count == 0 for key in tier.keys())
  monkeypatch.setattr(store.allocator, "allocate", allocate)
  with store.acquire([turn], policy, 1) as leases:
    assert leases[0].run_loads and leases[0].n_continued > 0
  store.check_invariants()


def test_a_history_on_the_host_tier_is_continued_only_in_its_namespace_and_policy():
  """Runs are keyed by the continuation cache's chain, salted by namespace and reuse setting:
  another tenant's identical turn, or another setting of the method, continues nothing from
  the host tier (it reuses the passage afresh); the owner's turn continues all of it."""
  store, policy, first = _store_with_history_on_host("tenant-a")
  more = np.array([5, 5, 5, 5, 5], np.int32)
  other_tenant = Prompt(first.segments + (more,), first.cacheable + (False,), "tenant-b")
  other_setting = ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.5).resolve(CFG)
  owner = Prompt(first.segments + (more,), first.cacheable + (False,), "tenant-a")
  for prompt, pol in ((other_tenant, policy), (owner, other_setting)):
    with store.acquire([prompt], pol, 1) as leases:
      assert leases[0].n_continued == 0 and not leases[0].run_loads
  with store.acquire([owner], policy, 1) as leases:
    n_full = first.token_ids.size // S  # the exact system prompt's blocks, then the history
    assert leases[0].n_exact == n_full * S and leases[0].n_continued > 0
    assert leases[0].run_loads
  store.check_invariants()
