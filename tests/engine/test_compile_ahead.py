"""Compiling a prefill ahead (step_runner.prefill_compile, the server's compile thread): the
prefill that follows compiles nothing, as jax itself reports its backend compilations; also a
prefill split in two around host-tier loads, whose second half's input shapes come from the
first half's compilation."""

import jax
import pytest

import sparsex_jax as sx
from sparsex_jax import step_runner
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
