"""Compiling a prefill ahead (step_runner.prefill_compile, the server's compile thread): the
prefill that follows compiles nothing, as jax itself reports its backend compilations; also a
prefill split in two around host-tier loads, whose second half's input shapes come from the
first half's compilation; and the server's slot-copy and host-tier programs, compiled ahead while
it is idle."""

import time

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from sparsex_jax import scheduler, step_runner
from tests.engine.test_engine import _engine, _ids

_COMPILED: list[str] = []  # jit'd function names, as jax reports their backend compiles
jax.monitoring.register_event_duration_secs_listener(
    lambda event, _, fun_name="", **__: _COMPILED.append(fun_name)
    if event == "/jax/core/compile/backend_compile_duration" else None)

PASSAGES = [_ids(20, 301), _ids(26, 302)]


def _prefills(names) -> list[str]:
  return [n for n in names if "prefill" in n]


@pytest.mark.parametrize("host_loads", [False, True], ids=["whole", "halves"])
def test_a_prefill_compiled_ahead_compiles_nothing_when_it_runs(host_loads):
  eng = _engine(host_cache_bytes=1 << 22 if host_loads else None)
  eng.cache_segments(PASSAGES)
  if host_loads:
    eng.store.segment_cache.evict(10**6)  # the passages are loaded back from the host tier
  policy = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3).resolve(eng.config)
  prompt = eng.tokenize(sx.Request([sx.Segment(_ids(7, 303), cache=False),
                                    sx.Segment(PASSAGES[0]), sx.Segment(PASSAGES[1]),
                                    sx.Segment(_ids(9, 304), cache=False)]), 4)
  with eng.store.acquire([prompt], policy, [4]) as leases:
    assert bool(leases[0].loads) == host_loads
    key, compile_now = step_runner.prefill_compile(eng, [prompt], leases, policy)
    assert key not in eng.kv.log
    start = len(_COMPILED)
    keys = compile_now()
    ahead = _prefills(_COMPILED[start:])
    assert ahead == (["jit(prefill_full_layers)", "jit(prefill_rest)"] if host_loads
                     else ["jit(prefill)"])
    start = len(_COMPILED)
    step_runner.prefill_and_commit(eng, [prompt], leases, policy)
    assert _prefills(_COMPILED[start:]) == []  # (a load's write program may compile here)
  assert key in eng.kv.log and all(k in eng.kv.log for k in keys) and len(keys) == len(ahead)


def test_a_server_compiles_every_slot_copy_width_ahead_while_idle():
  """The server's CompileAhead (entrypoints/serve/compiling.py) compiles each width of the copy
  that caches segments computed in context, one at a time between admissions; a commit that
  then copies compiles nothing, and its segment is cached."""
  from sparsex_jax import planner
  from sparsex_jax.entrypoints.serve.compiling import CompileAhead
  eng = _engine(num_pages=250)  # a pool shape of its own: no other test compiled its copies
  policy = sx.ReuseConfig("sparsex", layer_threshold=1).resolve(eng.config)
  ahead = CompileAhead(eng, policy)
  widths = planner.copy_widths(min(eng.config.max_seq_len, eng.layout.sentinel))
  assert widths == [16, 32, 64, 128, 256, 512, 1024] and ahead.background_pending == 7
  segment = _ids(37, 305)  # 37 slots: copies pad to 64
  prompt = eng.tokenize(sx.Request([sx.Segment(_ids(5, 306), cache=False), sx.Segment(segment),
                                    sx.Segment(_ids(3, 307), cache=False)]), 4)
  request = scheduler.ScheduledRequest(0, "r0", prompt, sx.SamplingParams(max_new_tokens=4))
  start = len(_COMPILED)
  try:
    with eng.store.acquire([prompt], policy, [4]) as leases:
      deadline = time.monotonic() + 120
      while not (ahead.ready(request, leases[0]) and ahead.background_pending == 0):
        assert time.monotonic() < deadline, "the copies did not compile"
        time.sleep(0.05)
      compiled_ahead = _COMPILED[start:]
      assert compiled_ahead.count("jit(copy_slots)") == len(widths)
      start = len(_COMPILED)
      step_runner.prefill_and_commit(eng, [prompt], leases, policy)
      assert "jit(copy_slots)" not in _COMPILED[start:]
  finally:
    ahead.close()
  assert eng.store.contains_segment(segment)  # the copy ran: the segment is cached
  prefix_only = CompileAhead(eng, sx.ReuseConfig("prefix").resolve(eng.config))
  assert prefix_only.background_pending == 0  # a policy that caches no segments copies nothing
  prefix_only.close()


@pytest.mark.parametrize("host_dtype", ["native", "int8"])
def test_a_server_compiles_the_host_tiers_reads_and_writes_ahead(host_dtype):
  """With a host tier, CompileAhead also compiles the programs that evict pages into the tier and
  load them back (step_runner.host_tier_compiles): every padded size and layer range, while the
  server is idle. An eviction and a load that follow compile none of them, and the reused
  segment's prefill equals the one from the device cache (to 8-bit rounding in an int8 tier)."""
  from sparsex_jax.entrypoints.serve.compiling import CompileAhead
  num_pages = {"native": 251, "int8": 247}[host_dtype]  # pool shapes of their own
  eng = _engine(num_pages=num_pages, host_cache_bytes=1 << 22, host_cache_dtype=host_dtype)
  policy = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3).resolve(eng.config)
  eng.host_tier.split_layer = policy.layer_threshold  # as `sparsex serve` sets it
  ahead = CompileAhead(eng, policy)
  thunks = step_runner.host_tier_compiles(eng, policy)
  # a segment's stored sizes up to 1024 tokens / 4 per page (quarter octaves: 28) with one read
  # and one write ([1, 3)); a run's powers of two up to 32 (6) with one read and three writes
  assert len(thunks) == 28 * 2 + 6 * 4
  keys = {thunk()[0] for thunk in thunks}  # some coincide (on the CPU, reads pad to powers of 2)
  start = len(_COMPILED)
  try:
    deadline = time.monotonic() + 300
    while ahead.background_pending:
      assert time.monotonic() < deadline, "the background programs did not compile"
      ahead.compile_idle()
      time.sleep(0.02)
  finally:
    ahead.close()
  host_programs = [n for n in _COMPILED[start:] if "page" in n]
  assert len(host_programs) == len(keys) and all(key in ahead.keys for key in keys)
  prompt = eng.tokenize(sx.Request([sx.Segment(_ids(7, 303), cache=False),
                                    sx.Segment(PASSAGES[0]), sx.Segment(PASSAGES[1]),
                                    sx.Segment(_ids(9, 304), cache=False)]), 4)
  pool_only = _engine(num_pages=num_pages)  # the same prompt with its segments in the device cache
  pool_only.cache_segments(PASSAGES)
  with pool_only.store.acquire([prompt], policy, [4]) as leases:
    _, from_pool, _ = step_runner.prefill_and_commit(pool_only, [prompt], leases, policy)
  eng.cache_segments(PASSAGES)
  start = len(_COMPILED)
  eng.store.segment_cache.evict(10**6)  # evicted into the host tier
  assert len(eng.host_tier) == 2
  with eng.store.acquire([prompt], policy, [4]) as leases:
    assert len(leases[0].loads) == 2
    _, from_host, _ = step_runner.prefill_and_commit(eng, [prompt], leases, policy)
  assert [n for n in _COMPILED[start:] if "page" in n] == []
  tolerance = 1e-5 if host_dtype == "native" else 2e-2
  np.testing.assert_allclose(np.asarray(from_host.logits), np.asarray(from_pool.logits),
                             rtol=tolerance, atol=tolerance)


def test_a_program_compiling_ahead_cannot_describe_is_skipped_not_raised():
  """Compiling ahead is an optimisation: a background program whose arguments fail to build is
  skipped with a warning (it compiles when it runs), and the next one still compiles; one whose
  compile fails is not counted among the programs compiled ahead."""
  from sparsex_jax.entrypoints.serve.compiling import CompileAhead
  eng = _engine()
  ahead = CompileAhead(eng, sx.ReuseConfig("prefix").resolve(eng.config))
  compiled = []

  def broken():
    raise ValueError("no such shape")

  def fails_to_compile():
    raise RuntimeError("the compiler gave up")

  ahead._background = [broken, lambda: (("a key",), lambda: compiled.append(1) or [("a key",)]),
                       lambda: (("another key",), fails_to_compile)]
  try:
    with pytest.warns(UserWarning, match="skipped a program.*no such shape"):
      ahead.compile_idle()
    deadline = time.monotonic() + 30
    while ahead.background_pending:
      assert time.monotonic() < deadline
      ahead.compile_idle()
      time.sleep(0.01)
  finally:
    ahead.close()
  # A program whose compile failed is not counted as compiled ahead (it compiles when it runs).
  assert compiled == [1] and ahead.keys == {("a key",)}
