"""The Scheduler on the host alone: the real KVStore (numpy), a fake runner in place of the device.

The fake runner does what StepRunner does to the host state (rows joined, dropped and advanced
by the Step's rules; the store's commit after a prefill, so later requests hit the prefix and
segment caches and pin them) and fails where a test says: a "poisoned" request fails every
prefill it is part of, or every decode loop it runs in. Checked: admission by free pages and
rows, the padded admission limit, refill, failure isolation, requests added while a job runs,
and, as a property over random jobs (with cancellations), that the pool's books balance after any of
them.
"""

import collections
import types

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import sparsex_jax as sx
from sparsex_jax.api import RequestOutput
from sparsex_jax.kv import KVStore, PoolExhausted, PoolLayout
from sparsex_jax.planner import NEW
from sparsex_jax.prompt import Prompt
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.scheduler import (Scheduler, ScheduledRequest, Step, StepResult,
                                   admission_limit, prefill_tokens, refill_rows)

PAGE = 4
# What the store reads of a reuse policy: every cache read and written (pins and prefix pages
# are part of the books), or none.
REUSE = types.SimpleNamespace(reads_prefix_cache=True, reads_segment_cache=True,
                              writes_prefix_cache=True, writes_segment_cache=True,
                              method=sx.Naive(), layer_threshold=0)
NO_REUSE = types.SimpleNamespace(reads_prefix_cache=False, reads_segment_cache=False,
                                 writes_prefix_cache=False, writes_segment_cache=False)
RNG = np.random.default_rng(0)
DOCS = [RNG.integers(3, 500, n).astype(np.int32) for n in (8, 5, 12)]


def _store(num_pages):
  return KVStore(PoolLayout(num_pages, PAGE, bytes_per_page=1))


def _request(index, n_prompt, max_new, docs=(), seed=None):
  """A request of `docs` (cacheable) and a question of its own, `n_prompt` tokens in all."""
  rng = np.random.default_rng(index if seed is None else seed)
  segments = [DOCS[d] for d in docs]
  n_question = max(1, n_prompt - sum(s.size for s in segments))
  segments.append(rng.integers(3, 500, n_question).astype(np.int32))
  prompt = Prompt(tuple(segments), (True,) * len(docs) + (False,))
  return ScheduledRequest(index, f"r{index}", prompt,
                          SamplingParams(max_new_tokens=max_new, ignore_eos=True))


class FakeRunner:
  """The engine's side of a step, on the host: rows, tokens, the store's commit, failures."""

  def __init__(self, store, policy, n_rows, poison_prefill=(), poison_decode=(),
               lose_pool=False):
    self.store, self.policy, self.n_rows = store, policy, n_rows
    self.poison_prefill, self.poison_decode = set(poison_prefill), set(poison_decode)
    self.lose_pool = lose_pool
    self.rows: dict[int, list] = {}  # index -> [request, tokens generated]
    self.prefills: list[tuple[int, ...]] = []  # the groups prefilled, in order
    self.decodes: list[tuple[int, ...]] = []  # the rows of each decode loop

  def _lost(self):
    if self.lose_pool:
      self.store.invalidate()  # what KVPool.recover's on_lost does
    return self.lose_pool

  def run(self, step: Step) -> StepResult:
    assert len(step.prefill) == len(step.leases)
    for index in step.drop:
      self.rows.pop(index, None)
    finished = []
    if step.prefill:
      group = tuple(r.index for r in step.prefill)
      self.prefills.append(group)
      assert not set(group) & set(self.rows), "a running request was admitted again"
      if set(group) & self.poison_prefill:
        return StepResult(prefill_error=RuntimeError(f"prefill of {group}"),
                          pool_lost=self._lost())
      plans = [types.SimpleNamespace(labels=np.full(r.prompt.token_ids.size, NEW, np.int8),
                                     page_table=lease.page_table, n_exact=lease.n_exact,
                                     n_continued=lease.n_continued)
               for r, lease in zip(step.prefill, step.leases)]
      with self.store.commit([r.prompt for r in step.prefill], plans, self.policy):
        pass
      for r in step.prefill:
        if r.sampling.max_new_tokens <= 1:
          finished.append((r.index, _output(r, 1)))
        else:
          self.rows[r.index] = [r, 1]
      assert len(self.rows) <= self.n_rows, "more running requests than rows"
    if step.decode_steps and self.rows:
      self.decodes.append(tuple(sorted(self.rows)))
      if set(self.rows) & self.poison_decode:
        return StepResult(tuple(finished), decode_error=RuntimeError("decode"),
                          pool_lost=self._lost())
      n_start, done = len(self.rows), 0
      for _ in range(step.decode_steps):  # decode_loop's rule for ending early
        if not self.rows or (step.stop_after and done >= step.stop_after):
          break
        for index, row in list(self.rows.items()):
          row[1] += 1
          if row[1] >= row[0].sampling.max_new_tokens:
            del self.rows[index]
            finished.append((index, _output(row[0], row[1])))
            done += 1
      assert n_start - len(self.rows) == done
    return StepResult(tuple(finished))


def _output(request, n):
  return RequestOutput(text="", token_ids=[request.index] * n, stats=None,
                       finish_reason="length", request_id=request.request_id)


def _run(sched, runner, arrivals=None, max_steps=10_000, cancels=None, cancelled=None):
  """The engine's loop; `arrivals`: {step number: requests added before that step}; `cancels`:
  {step number: indices cancelled before that step} (those cancel() took out go in the set
  `cancelled`). Returns the completions in order."""
  arrivals, cancels = dict(arrivals or {}), dict(cancels or {})
  done, n = [], 0
  while sched.has_work or arrivals:
    for r in arrivals.pop(n, []):
      sched.add_request(r)
    for index in cancels.pop(n, []):
      if sched.cancel(index):
        cancelled.add(index)
    step = sched.schedule()
    done += step.failed
    done += sched.update(step, runner.run(step))
    n += 1
    assert n < max_steps
  return done


def _assert_clean(store, capacity):
  """Only the caches hold pages, nothing is pinned, and clearing them frees the whole pool."""
  store.check_invariants()
  assert not store._live
  assert all(store.segment_cache.get(k).pin_count == 0 for k in store.segment_cache.keys())
  store.clear()
  assert store.allocator.num_free == capacity


# ---- admission ---------------------------------------------------------------------------------

def test_admission_is_by_free_pages_and_the_rest_wait_for_pages():
  store = _store(21)  # 20 usable pages of 4 tokens
  # 13 prompt + 7 new tokens = 5 pages each: 4 fit, the fifth waits
  reqs = [_request(i, 13, 7) for i in range(6)]
  sched = Scheduler(store, NO_REUSE, 8, steps_per_visit=3)
  for r in reqs:
    sched.add_request(r)
  step = sched.schedule()
  assert [r.index for r in step.prefill] == [0, 1, 2, 3]
  assert [lease.own_pages.size for lease in step.leases] == [5] * 4
  assert store.allocator.num_free == 0 and list(sched.running) == [0, 1, 2, 3]
  assert step.decode_steps == 3 and step.stop_after == refill_rows(8) == 2
  runner = FakeRunner(store, NO_REUSE, 8)
  assert sched.update(step, runner.run(step)) == []  # 3 steps of 7: nobody finished
  step = sched.schedule()
  assert step.prefill == () and [r.index for r, _ in sched.waiting] == [4, 5]
  done = sched.update(step, runner.run(step))  # tokens 5..7: all four finish
  assert [c.request.index for c in done] == [0, 1, 2, 3]
  assert [len(c.output.token_ids) for c in done] == [7] * 4
  assert store.allocator.num_free == 20
  step = sched.schedule()
  assert [r.index for r in step.prefill] == [4, 5] and step.stop_after == 0  # nobody waits
  assert store.allocator.num_free == 10
  sched.update(step, runner.run(step))
  _run(sched, runner)
  assert sorted(sched.finished) == list(range(6)) and not sched.failed
  _assert_clean(store, 20)


def test_a_request_that_can_never_fit_fails_alone_at_admission():
  store = _store(11)  # 10 usable pages
  reqs = [_request(0, 9, 3), _request(1, 50, 2), _request(2, 30, 3), _request(3, 6, 2)]
  sched = Scheduler(store, NO_REUSE, 2, steps_per_visit=4)
  for r in reqs:
    sched.add_request(r)
  step = sched.schedule()
  # 1 needs 13 pages of 10 (too large for the pool: ValueError) and fails at once; 2 needs 9 and
  # waits behind 0 (3 pages held) instead of failing: pages come back when 0 finishes
  assert [(c.request.index, type(c.error)) for c in step.failed] == [(1, ValueError)]
  assert "pool too small" in str(step.failed[0].error)
  assert [r.index for r in step.prefill] == [0]
  runner = FakeRunner(store, NO_REUSE, 2)
  done = list(step.failed) + sched.update(step, runner.run(step)) + _run(sched, runner)
  assert sorted(c.request.index for c in done) == [0, 1, 2, 3]
  assert sorted(sched.finished) == [0, 2, 3] and list(sched.failed) == [1]
  _assert_clean(store, 10)


def test_pool_exhausted_with_nothing_running_fails_the_request():
  store = _store(11)
  # pinned by someone outside the job (another engine call): never evictable
  entry = store.segment_cache.insert(DOCS[2], store.allocator.allocate(3), np.arange(12))
  store.allocator.decref(entry.pages)
  store.segment_cache.pin(entry)
  sched = Scheduler(store, NO_REUSE, 4, steps_per_visit=2)
  sched.add_request(_request(0, 30, 2))  # 8 pages, 7 free
  step = sched.schedule()
  assert isinstance(step.failed[0].error, PoolExhausted) and not step.prefill
  assert not sched.has_work and store.allocator.num_free == 7
  store.segment_cache.unpin(entry)
  _assert_clean(store, 10)


def test_admission_stops_at_a_padded_size_and_refills_when_a_quarter_is_free():
  store = _store(601)  # enough pages for every row: only rows limit admission
  n_rows = 64
  # the first 64 run 9 tokens; 17 of them stop after 2, the others after 30
  lengths = [2] * 17 + [30] * 47 + [5] * 40
  reqs = [_request(i, 5, n) for i, n in enumerate(lengths)]
  sched = Scheduler(store, NO_REUSE, n_rows, steps_per_visit=8)
  for r in reqs:
    sched.add_request(r)
  runner = FakeRunner(store, NO_REUSE, n_rows)
  step = sched.schedule()
  assert len(step.prefill) == 64  # an empty batch is filled whole
  assert step.stop_after == 16 == refill_rows(n_rows)
  done = sched.update(step, runner.run(step))
  assert len(done) == 17  # the loop stopped after the 17 short ones finished at step 2
  assert runner.rows[17][1] == 2  # and ran no further
  step = sched.schedule()
  # 17 rows free: 16 admitted (17 would pad to 32), the 17th waits for the next loop
  assert len(step.prefill) == 16 == admission_limit(17, 47, 64)
  assert [r.index for r in step.prefill] == list(range(64, 80))
  with pytest.raises(RuntimeError, match="before update"):
    sched.schedule()
  sched.update(step, runner.run(step))
  _run(sched, runner)
  assert sorted(sched.finished) == list(range(104))
  assert max(len(g) for g in runner.prefills[1:]) <= 16
  _assert_clean(store, store.allocator.capacity)


def test_a_prefill_group_stops_at_its_token_budget():
  """max_prefill_tokens bounds a group's padded tokens (bucket(requests) x bucket(longest)):
  64-token prompts, a 256-token budget: groups of 4; a 300-token prompt over the budget runs
  alone; None lets the rows alone limit a group."""
  assert prefill_tokens(3, 50) == 4 * 64 and prefill_tokens(1, 300) == 320
  store = _store(400)
  reqs = [_request(i, 64, 2) for i in range(10)] + [_request(10, 300, 2)]
  sched = Scheduler(store, NO_REUSE, 16, steps_per_visit=4, max_prefill_tokens=256)
  for r in reqs:
    sched.add_request(r)
  runner = FakeRunner(store, NO_REUSE, 16)
  _run(sched, runner)
  assert runner.prefills[:3] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9)]
  assert (10,) in runner.prefills and sorted(sched.finished) == list(range(11))
  _assert_clean(store, store.allocator.capacity)
  unbounded = Scheduler(_store(400), NO_REUSE, 16, steps_per_visit=4, max_prefill_tokens=None)
  for r in reqs:
    unbounded.add_request(r)
  assert len(unbounded.schedule().prefill) == 11
  with pytest.raises(ValueError, match="max_prefill_tokens"):
    Scheduler(store, NO_REUSE, 16, steps_per_visit=4, max_prefill_tokens=0)


# ---- requests that arrive while the job runs ---------------------------------------------------

def test_add_request_between_steps_joins_the_running_batch():
  store = _store(40)
  sched = Scheduler(store, REUSE, 4, steps_per_visit=2)
  runner = FakeRunner(store, REUSE, 4)
  sched.add_request(_request(0, 10, 9, docs=(0,)))
  sched.add_request(_request(1, 7, 9))
  step = sched.schedule()
  sched.update(step, runner.run(step))
  assert list(sched.running) == [0, 1] and not sched.waiting
  # arrives while 0 and 1 run: admitted into a free row at the next step, reusing doc 0
  late = _request(2, 16, 3, docs=(1, 0))
  sched.add_request(late)
  step = sched.schedule()
  assert [r.index for r in step.prefill] == [2]
  assert list(step.leases[0].hits) == [1]  # doc 0's segment-cache entry, pinned for the request
  assert store.segment_cache.get(step.leases[0].hits[1].key).pin_count == 1
  done = sched.update(step, runner.run(step))
  assert runner.decodes[-1] == (0, 1, 2)  # decoded together with the running ones
  assert [c.request.index for c in done] == [2]  # 3 tokens: 1 at prefill, 2 in the loop
  with pytest.raises(ValueError, match="index 2 was already added"):
    sched.add_request(late)
  done += _run(sched, runner, arrivals={1: [_request(3, 5, 4)]})
  assert [c.request.index for c in done] == [2, 0, 1, 3]  # 0, 1 reach 9 as 3 reaches 3 of 4
  assert [len(sched.finished[i].token_ids) for i in range(4)] == [9, 9, 3, 4]
  _assert_clean(store, 39)


def test_a_request_whose_program_is_not_ready_keeps_its_place_holding_nothing():
  """`ready` False (a server compiling its prefill program on another thread): the lease is
  given back, the request keeps its place, the running requests decode, a ready request behind
  it goes first, and it is admitted once ready, before the requests that came after it."""
  store = _store(40)
  compiled = {0, 2}
  sched = Scheduler(store, REUSE, 4, steps_per_visit=2,
                    ready=lambda request, lease: request.index in compiled)
  runner = FakeRunner(store, REUSE, 4)
  for r in (_request(0, 8, 9), _request(1, 12, 3, docs=(0,)), _request(2, 5, 9)):
    sched.add_request(r)
  step = sched.schedule()
  assert [r.index for r in step.prefill] == [0, 2]  # 1 is compiling: 2 goes past it
  assert [r.index for r, _ in sched.waiting] == [1]
  sched.update(step, runner.run(step))
  sched.add_request(_request(3, 6, 3))
  for _ in range(2):  # 1 still compiling, 3 not either: both wait, 0 and 2 decode
    step = sched.schedule()
    assert not step.prefill and step.decode_steps == 2
    assert [r.index for r, _ in sched.waiting] == [1, 3]
    used = store.allocator.num_used
    sched.update(step, runner.run(step))
    assert len(store._live) == 2  # only the leases of 0 and 2 are held
  assert store.allocator.num_used == used
  compiled |= {1, 3}
  step = sched.schedule()
  assert [r.index for r in step.prefill] == [1, 3]
  sched.update(step, runner.run(step))
  _run(sched, runner)
  assert sorted(sched.finished) == [0, 1, 2, 3]
  _assert_clean(store, 39)


# ---- failures ----------------------------------------------------------------------------------

def test_a_failing_prefill_in_a_group_is_retried_alone_and_charged_to_its_request():
  store = _store(40)
  reqs = [_request(i, 6 + i, 4) for i in range(5)]
  sched = Scheduler(store, NO_REUSE, 4, steps_per_visit=2)
  for r in reqs:
    sched.add_request(r)
  runner = FakeRunner(store, NO_REUSE, 4, poison_prefill={2})
  done = _run(sched, runner)
  assert list(sched.failed) == [2] and "prefill of (2,)" in str(sched.failed[2])
  assert sorted(sched.finished) == [0, 1, 3, 4]
  assert runner.prefills[0] == (0, 1, 2, 3)  # failed as a group, then each alone:
  assert runner.prefills[1:5] == [(0,), (1,), (2,), (3,)]
  # a solo request runs alone: nothing joins it, its decode loops hold it only
  assert runner.decodes[:2] == [(0,), (0,)]
  assert [c.request.index for c in done if c.error is not None] == [2]
  _assert_clean(store, 39)


def test_a_failing_decode_loop_makes_every_running_request_solo():
  store = _store(40)
  sched = Scheduler(store, NO_REUSE, 4, steps_per_visit=2)
  for i in range(3):
    sched.add_request(_request(i, 5, 6))
  runner = FakeRunner(store, NO_REUSE, 4, poison_decode={1})
  step = sched.schedule()
  done = sched.update(step, runner.run(step))
  assert done == [] and not sched.running  # all three back in the queue, solo, in order
  assert [(r.index, solo) for r, solo in sched.waiting] == [(0, True), (1, True), (2, True)]
  assert store.allocator.num_free == 39
  step = sched.schedule()
  assert sorted(step.drop) == [0, 1, 2] and [r.index for r in step.prefill] == [0]
  sched.update(step, runner.run(step))
  _run(sched, runner, max_steps=50)
  assert runner.rows == {}  # the failed one's row was dropped too
  assert list(sched.failed) == [1] and sorted(sched.finished) == [0, 2]
  _assert_clean(store, 39)


def test_a_lost_pool_restarts_the_running_requests_from_their_prompts():
  store = _store(40)
  sched = Scheduler(store, REUSE, 4, steps_per_visit=1)
  runner = FakeRunner(store, REUSE, 4)
  for i in range(2):
    sched.add_request(_request(i, 9, 5, docs=(1,)))
  step = sched.schedule()
  sched.update(step, runner.run(step))
  assert store.segment_cache.num_entries == 1
  sched.add_request(_request(2, 9, 5, docs=(1,)))
  runner.poison_prefill, runner.lose_pool = {2}, True
  step = sched.schedule()
  assert 0 in step.leases[0].hits
  done = sched.update(step, runner.run(step))
  assert [(c.request.index, c.error is not None) for c in done] == [(2, True)]
  # the K/V of 0 and 1 went with the pool: they wait again (not solo) and leave their rows
  assert [(r.index, solo) for r, solo in sched.waiting] == [(0, False), (1, False)]
  assert store.segment_cache.num_entries == 0
  runner.lose_pool = False
  step = sched.schedule()
  assert sorted(step.drop) == [0, 1] and [r.index for r in step.prefill] == [0, 1]
  sched.update(step, runner.run(step))
  _run(sched, runner)
  assert sorted(sched.finished) == [0, 1] and list(sched.failed) == [2]
  _assert_clean(store, 39)


def test_close_gives_back_everything_held():
  store = _store(40)
  sched = Scheduler(store, REUSE, 4, steps_per_visit=1)
  for i in range(6):
    sched.add_request(_request(i, 10, 8, docs=(i % 2,)))
  runner = FakeRunner(store, REUSE, 4)
  for _ in range(2):
    step = sched.schedule()
    sched.update(step, runner.run(step))
  assert len(sched.running) == 4 and len(store._live) == 4
  sched.close()  # what generate does when on_error="raise" ends the job
  assert not sched.running
  _assert_clean(store, 39)


def test_cancel_frees_a_waiting_or_running_request_between_steps():
  store = _store(40)
  sched = Scheduler(store, REUSE, 2, steps_per_visit=1)
  for i in range(3):
    sched.add_request(_request(i, 10, 8, docs=(i % 2,)))
  runner = FakeRunner(store, REUSE, 2)
  step = sched.schedule()
  sched.update(step, runner.run(step))
  assert list(sched.running) == [0, 1] and [r.index for r, _ in sched.waiting] == [2]
  assert sched.cancel(2) and not sched.waiting  # waiting: leaves the queue, never leased
  assert sched.cancel(0)  # running: its leases are back at once, its row dropped next step
  assert list(sched.running) == [1] and len(store._live) == 1
  step = sched.schedule()
  assert step.drop == (0,)
  sched.update(step, runner.run(step))
  assert 0 not in runner.rows
  assert not sched.cancel(0) and not sched.cancel(7)  # gone, or never known
  step = sched.schedule()
  with pytest.raises(RuntimeError, match="between schedule"):
    sched.cancel(1)
  sched.update(step, runner.run(step))
  _run(sched, runner)
  assert list(sched.finished) == [1] and 0 not in sched.failed
  _assert_clean(store, 39)


# ---- the books balance after any job -----------------------------------------------------------

jobs = st.fixed_dictionaries({
    "requests": st.lists(st.tuples(
        st.lists(st.integers(0, 2), max_size=2, unique=True),  # cached docs
        st.integers(1, 12),  # question tokens
        st.integers(1, 8),  # max_new_tokens
        st.integers(0, 6),  # arrival step
        st.sampled_from(["ok", "ok", "ok", "prefill", "decode", "cancel"])),
        min_size=1, max_size=12),
    "pages": st.integers(6, 40), "rows": st.integers(1, 6), "steps": st.integers(1, 4),
    "reuse": st.booleans(), "lose_pool": st.booleans(),
    "max_prefill_tokens": st.sampled_from([None, 16, 32, 64, 200]),
    "compile_steps": st.integers(0, 3)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs)
def test_every_request_ends_once_and_the_pool_balances(job):
  store = _store(job["pages"])
  capacity = store.allocator.capacity
  policy = REUSE if job["reuse"] else NO_REUSE
  arrivals, reqs, poison = {}, [], {"prefill": set(), "decode": set()}
  cancels, cancelled = {}, set()
  for i, (docs, n_question, max_new, arrival, fate) in enumerate(job["requests"]):
    n_docs = sum(DOCS[d].size for d in docs)
    r = _request(i, n_docs + n_question, max_new, docs=docs)
    reqs.append(r)
    arrivals.setdefault(arrival, []).append(r)
    if fate == "cancel":  # the client goes away a few steps after it came
      cancels.setdefault(arrival + i % 4, []).append(i)
    elif fate != "ok":
      poison[fate].add(i)
  budget = job["max_prefill_tokens"]
  asked = collections.Counter()

  def ready(request, lease):  # each request's program "compiles" for its first few asks
    asked[request.index] += 1
    return asked[request.index] > job["compile_steps"]

  sched = Scheduler(store, policy, job["rows"], steps_per_visit=job["steps"],
                    max_prefill_tokens=budget, ready=ready)
  runner = FakeRunner(store, policy, job["rows"], poison["prefill"], poison["decode"],
                      job["lose_pool"])
  done = _run(sched, runner, arrivals, cancels=cancels, cancelled=cancelled)
  if budget is not None:  # a group of several prompts stays within the token budget
    for group in runner.prefills:
      longest = max(reqs[i].prompt.token_ids.size for i in group)
      assert len(group) == 1 or prefill_tokens(len(group), longest) <= budget, group
  # every request ended exactly once, finished, failed or cancelled, and was reported as it ended
  # (a cancelled one never is)
  assert sorted(c.request.index for c in done) == sorted(set(range(len(reqs))) - cancelled)
  assert not set(sched.finished) & set(sched.failed)
  assert not (set(sched.finished) | set(sched.failed)) & cancelled
  assert len(sched.finished) + len(sched.failed) + len(cancelled) == len(reqs)
  for r in reqs:
    if r.index in cancelled:
      continue
    too_big = -(-(r.prompt.token_ids.size + r.sampling.max_new_tokens) // PAGE) > capacity
    fails = (too_big or r.index in poison["prefill"]
             or (r.index in poison["decode"] and r.sampling.max_new_tokens > 1))
    assert (r.index in sched.failed) == fails, r.index  # nobody pays for another's failure
    if not fails:
      assert len(sched.finished[r.index].token_ids) == r.sampling.max_new_tokens
  assert not sched.running and not sched._leases and not sched._solo
  _assert_clean(store, capacity)


def test_forget_drops_an_ended_request_s_record():
  """A long-lived caller forgets each request it has reported: nothing of it stays."""
  store = _store(40)
  sched = Scheduler(store, NO_REUSE, 2, steps_per_visit=4)
  sched.add_request(_request(0, 6, 2))
  sched.add_request(_request(1, 500, 2))  # too large for the pool: fails at admission
  runner = FakeRunner(store, NO_REUSE, 2)
  step = sched.schedule()
  done = list(step.failed) + sched.update(step, runner.run(step)) + _run(sched, runner)
  assert sorted(c.request.index for c in done) == [0, 1]
  assert list(sched.finished) == [0] and list(sched.failed) == [1]
  for c in done:
    sched.forget(c.request.index)
  assert not sched.finished and not sched.failed
  _assert_clean(store, 39)
