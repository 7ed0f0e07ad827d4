"""Issue 9's cases, each as a test: no lost work, no leaked pages, no silent garbage.

Numbered as in the issue: (1) a bad request late in a batch, (2) a failure after the donated
prefill, (3) pages and pins on a failing planner, (4) sampling independent of batch layout,
(5) corrupt weights, (6) pool pressure with reuse, (7) cache state between modes, (8) unclear input
errors; then a property test over random jobs with injected failures.
"""

import warnings

import gguf
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import sparsex_jax as sx
from models import loaders
from sparsex_jax import programs
from sparsex_jax.entrypoints import cli
from tests.engine.test_engine import CFG, PARAMS, _engine, _full_logits, _ids

GREEDY = sx.SamplingParams(max_new_tokens=3, ignore_eos=True)


def _clean_pool(eng):
  """Only the caches hold pages; nothing is pinned (no live request left anything behind)."""
  eng.store.check_invariants()
  assert not eng.store._live
  assert eng.store.allocator.num_used == eng.store.num_cached_pages
  assert all(eng.store.segment_cache.get(k).pin_count == 0 for k in eng.store.segment_cache.keys())


# (1) ---------------------------------------------------------------------------------------------

def test_1_bad_request_is_found_before_any_device_work_and_others_still_run():
  eng = _engine(max_batch_size=16)
  good = [sx.Request([sx.Segment(_ids(9 + i, i))], id=f"q{i}") for i in range(19)]
  bad = sx.Request([sx.Segment([1, 99999])], id="bad")
  with pytest.raises(sx.RequestError, match=r"request 19 \(id 'bad'\): token id 99999") as err:
    eng.generate(good + [bad], GREEDY)
  assert eng.num_compilations == 0  # validated before anything ran: nothing was lost
  assert err.value.index == 19 and err.value.outputs == [None] * 20

  outs = eng.generate(good + [bad], GREEDY, on_error="return")
  assert [o.finish_reason for o in outs[:19]] == ["length"] * 19
  assert outs[19].finish_reason == "error" and "token id 99999" in outs[19].error
  assert outs[19].request_id == "bad" and outs[3].request_id == "q3"
  alone = eng.generate([good[17]], GREEDY)[0]
  assert outs[17].token_ids == alone.token_ids
  _clean_pool(eng)


# (2) ---------------------------------------------------------------------------------------------

def _failing_after_donation(monkeypatch, program_name="prefill", fail_on=1):
  """Makes the engine's `program_name` run (consuming the donated pool) and then raise."""
  import sparsex_jax.step_runner as step_runner
  real = getattr(step_runner, program_name)
  calls = {"n": 0}

  def failing(pool, *args, **kw):
    calls["n"] += 1
    out = real(pool, *args, **kw)
    if calls["n"] == fail_on:
      assert pool["k"].is_deleted()  # the pool really was donated
      raise RuntimeError("device failure after the prefill")
    return out

  failing.__name__ = real.__name__
  monkeypatch.setattr(step_runner, program_name, failing)
  return calls


def test_2_failure_after_donated_prefill_leaves_a_working_engine(monkeypatch):
  eng = _engine()
  doc, q = _ids(14, 4), _ids(5, 6)
  eng.cache_segments([doc])
  req = sx.Request([sx.Segment(_ids(6, 1), cache=False), sx.Segment(doc),
                    sx.Segment(q, cache=False)], id="r")
  _failing_after_donation(monkeypatch)
  with pytest.raises(sx.RequestError, match="request 0 .id 'r'.: device failure"):
    eng.generate([req], GREEDY)
  assert eng.kv.times_lost == 1 and not eng.pool["k"].is_deleted()
  # The cached segment's K/V went with the pool: the cache forgot it, the bookkeeping is whole.
  assert eng.store.segment_cache.num_entries == 0
  _clean_pool(eng)
  monkeypatch.undo()
  logits = eng.prefill_logits(req, reuse=sx.ReuseConfig("full"))
  np.testing.assert_allclose(logits, _full_logits(_ids(6, 1) + doc + q), rtol=1e-4, atol=1e-4)
  out = eng.generate([req], GREEDY)[0]
  assert out.finish_reason == "length" and len(out.token_ids) == 3


def test_2_failed_copy_in_commit_rolls_back(monkeypatch):
  eng = _engine()
  _failing_after_donation(monkeypatch, "copy_slots")
  req = sx.Request([sx.Segment(_ids(10, 7)), sx.Segment(_ids(3, 8), cache=False)])
  with pytest.raises(RuntimeError, match="device failure"):
    eng.prefill_logits(req)
  _clean_pool(eng)
  assert eng.store.segment_cache.num_entries == 0 and eng.kv.is_valid()


# (3) ---------------------------------------------------------------------------------------------

def test_3_bad_seed_is_refused_and_a_failing_scorer_leaks_nothing(monkeypatch):
  with pytest.raises(ValueError, match="seed must be an int in"):
    sx.ReuseConfig("random", seed=-5)
  eng = _engine()
  doc = _ids(14, 4)
  eng.cache_segments([doc])
  req = sx.Request([sx.Segment(_ids(5, 2), cache=False), sx.Segment(doc)])

  def broken(self, plan, layer_threshold):
    raise RuntimeError("scorer failed")

  monkeypatch.setattr(sx.Random, "select", broken)
  for _ in range(3):
    with pytest.raises(sx.RequestError, match="scorer failed"):
      eng.generate([req], GREEDY, reuse=sx.ReuseConfig("random"))
    _clean_pool(eng)
  assert eng.store.segment_cache.num_entries == 1  # still cached, unpinned, evictable
  assert eng.store.segment_cache.num_reclaimable() == eng.store.segment_cache.num_pages


# (4) ---------------------------------------------------------------------------------------------

def test_4_samples_depend_only_on_the_request_and_its_seed():
  sp = sx.SamplingParams(max_new_tokens=8, temperature=1.3, seed=11, ignore_eos=True)
  target = sx.Request([sx.Segment(_ids(12, 77))])
  others = [sx.Request([sx.Segment(_ids(7 + i, 90 + i))]) for i in range(5)]
  alone = _engine().generate([target], sp)[0].token_ids
  for batch_size, position, pages in ((16, 0, 256), (16, 3, 256), (2, 5, 256), (4, 2, 40)):
    reqs = others[:position] + [target] + others[position:]
    outs = _engine(max_batch_size=batch_size, num_pages=pages).generate(reqs, sp)
    assert outs[position].token_ids == alone, (batch_size, position, pages)
  # per-request sampling: the same request with another seed in the same batch differs
  other_seed = sx.Request(target.segments, sampling=sx.SamplingParams(
      max_new_tokens=8, temperature=1.3, seed=12, ignore_eos=True))
  a, b = _engine().generate([target, other_seed], sp)
  assert a.token_ids == alone and b.token_ids != alone


# (5) ---------------------------------------------------------------------------------------------

def _tiny_gguf(tmp_path):
  from tests.models.test_gguf import write_tiny_llama
  path = tmp_path / "tiny.gguf"
  write_tiny_llama(path, np.random.default_rng(0))
  return path


def test_5_corrupt_weights_name_the_file_and_tensor(tmp_path):
  path = _tiny_gguf(tmp_path)
  reader = gguf.GGUFReader(str(path))
  target = next(t for t in reader.tensors if t.name == "blk.1.attn_norm.weight")  # F32
  offset = int(target.data_offset)
  del reader
  raw = bytearray(path.read_bytes())
  raw[offset:offset + 64] = b"\xff" * 64  # NaN bit patterns
  corrupt = tmp_path / "corrupt.gguf"
  corrupt.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match=r"corrupt.gguf: tensor blk.1.attn_norm.weight has 16 "
                                       r"non-finite values"):
    loaders.load_gguf(corrupt)

  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(path.read_bytes()[:-500])
  with pytest.raises(ValueError, match=r"truncated.gguf.*(truncated or corrupt)"):
    loaders.load_gguf(truncated)
  loaders.load_gguf(path)  # the intact file still loads


# (6) ---------------------------------------------------------------------------------------------

def test_6_reuse_under_pool_pressure_falls_back_instead_of_failing():
  eng = _engine(num_pages=17)  # 16 usable pages of 4 tokens
  docs = [_ids(16, 30), _ids(20, 31)]
  eng.cache_segments(docs)  # 4 + 5 pages, cache-only
  req = sx.Request([sx.Segment(docs[0]), sx.Segment(docs[1]), sx.Segment([5, 6], cache=False)])
  # Reusing both would pin 9 pages and need 10 more: the hits are given back and recomputed.
  out = eng.generate([req], sx.SamplingParams(max_new_tokens=2, ignore_eos=True))[0]
  full = _engine().generate([req], sx.SamplingParams(max_new_tokens=2, ignore_eos=True),
                            reuse=sx.ReuseConfig("full"))[0]
  assert out.token_ids == full.token_ids and out.stats.n_reused == 0
  _clean_pool(eng)


def test_6_cache_segments_halves_its_batch_like_generate():
  eng = _engine(num_pages=12)  # 11 usable pages; a 12-token segment leases 4
  docs = [_ids(12, 40 + i) for i in range(6)]
  assert eng.cache_segments(docs, batch_size=8) == 6
  assert 1 <= eng.store.segment_cache.num_entries <= 3  # the later ones evicted the earlier
  _clean_pool(eng)


# (7) ---------------------------------------------------------------------------------------------

def test_7_caches_can_be_cleared_or_bypassed_and_outputs_say_where_kv_came_from():
  doc, sys_prompt, q = _ids(14, 4), _ids(12, 5), _ids(5, 6)
  req = sx.Request([sx.Segment(sys_prompt), sx.Segment(doc), sx.Segment(q, cache=False)])
  sparsex = sx.ReuseConfig("sparsex", layer_threshold=1, recompute_ratio=0.3)
  fresh = _engine()
  fresh.cache_segments([doc])
  want = fresh.prefill_logits(req, reuse=sparsex)

  eng = _engine()
  eng.cache_segments([doc])
  eng.prefill_logits(req, reuse=sx.ReuseConfig("prefix"))  # caches the whole prompt as exact
  stale = eng.generate([req], GREEDY, reuse=sparsex)[0]
  assert stale.stats.n_exact == 28 and stale.stats.n_reused == 0
  assert np.all(stale.prefill.labels[:28] == 0)  # per token: exact
  before = eng.stats()
  bypass = sx.ReuseConfig("sparsex", read_caches=False, update_caches=False)
  np.testing.assert_allclose(eng.prefill_logits(req, reuse=bypass),
                             _full_logits(sys_prompt + doc + q), rtol=1e-4, atol=1e-4)
  after = eng.stats()
  assert after["prefix_cache"]["cached_blocks"] == before["prefix_cache"]["cached_blocks"]
  assert after["segment_cache"]["entries"] == before["segment_cache"]["entries"]

  assert eng.clear_caches() > 0 and eng.store.allocator.num_used == 0
  eng.cache_segments([doc])
  np.testing.assert_array_equal(eng.prefill_logits(req, reuse=sparsex), want)
  # The same prompt again continues the one before (the continuation cache): its 16 approximate
  # tokens after the 12 exact ones are referenced as they were computed, nothing is reused anew.
  again = eng.generate([req], GREEDY, reuse=sparsex)[0]
  assert (again.stats.n_exact, again.stats.n_continued, again.stats.n_reused) == (28, 16, 0)
  assert eng.clear_caches() > 0 and eng.store.allocator.num_used == 0
  eng.cache_segments([doc])
  out = eng.generate([req], GREEDY, reuse=sparsex)[0]
  labels = out.prefill.labels
  assert out.stats.n_reused == 14 and np.all(labels[12:26] == 1) and np.all(labels[26:] == 2)
  assert out.stats.n_recomputed == out.prefill.selected_positions.size == 5  # ceil(0.3 * 14)


# (8) ---------------------------------------------------------------------------------------------

def test_8_unclear_inputs_get_clear_errors():
  assert sx.Request("hello").segments == (sx.Segment("hello"),)
  with pytest.raises(TypeError, match="wrap token ids in a Segment"):
    sx.Request([1, 2, 3])
  for kw, match in ((dict(temperature=float("nan")), "temperature"),
                    (dict(temperature=float("inf")), "temperature"),
                    (dict(max_new_tokens=2.5), "max_new_tokens"),
                    (dict(max_new_tokens=0), "max_new_tokens"), (dict(top_p=0.0), "top_p"),
                    (dict(seed=-1), "seed"), (dict(stop_token_ids=[1, -2]), "stop_token_ids")):
    with pytest.raises(ValueError, match=match):
      sx.SamplingParams(**kw)
  for kw, match in ((dict(max_batch_size=0), "max_batch_size"),
                    (dict(attention_backend="cuda"), "backend")):
    with pytest.raises(ValueError, match=match):
      _engine(**kw)
  with pytest.raises(ValueError, match="on_error"):
    _engine().generate([sx.Request("x")], on_error="ignore")


def test_8_demo_rejects_an_empty_passage(capsys):
  assert cli.main(["demo", "--passage", ""]) == 2
  assert "--passage must not be empty" in capsys.readouterr().err


def test_8_low_precision_on_cpu_warns():
  cfg = CFG.replace(dtype="bfloat16")
  with pytest.warns(UserWarning, match="bfloat16 engine on CPU"):
    sx.Engine(cfg, PARAMS, page_size=4, num_pages=16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sx.Engine(CFG, PARAMS, page_size=4, num_pages=16)  # float32: no warning


# property test -----------------------------------------------------------------------------------

DOCS = [_ids(n, 200 + n) for n in (5, 9, 14)]
MODES = {"full": sx.ReuseConfig("full"), "prefix": sx.ReuseConfig("prefix"),
         # r = 1 recomputes every reused token: its greedy tokens equal full prefill's
         "sparsex-r1": sx.ReuseConfig("sparsex", recompute_ratio=1.0, layer_threshold=1)}
_REFERENCE: dict = {}


def _reference_tokens(req):
  key = tuple(tuple(s.content) for s in req.segments)
  if key not in _REFERENCE:
    _REFERENCE[key] = _engine().generate([req], GREEDY, reuse=MODES["full"])[0].token_ids
  return _REFERENCE[key]


def _inject_failure(patcher, module, name):
  """Makes module.<name> run its program (consuming the donated pool), then raise."""
  real = getattr(module, name)

  def failing(pool, *args, **kw):
    real(pool, *args, **kw)
    raise RuntimeError("injected")

  failing.__name__ = real.__name__
  patcher.setattr(module, name, failing)


steps = st.lists(st.tuples(
    st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=2), min_size=1, max_size=3),
    st.sampled_from(sorted(MODES)), st.sampled_from(["none", "none", "prefill", "decode"]),
    st.booleans()), min_size=1, max_size=4)


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps)
def test_random_jobs_with_failures_keep_the_books_and_the_outputs(monkeypatch, job):
  eng = _engine(num_pages=20, max_batch_size=2, steps_per_visit=2)
  import sparsex_jax.decoding as decoding_module
  import sparsex_jax.step_runner as step_runner
  for seg_lists, mode, failure, cache_first in job:
    if cache_first:
      eng.cache_segments(DOCS[:2])
    reqs = [sx.Request([sx.Segment(DOCS[i]) for i in segs] + [sx.Segment([7, 8], cache=False)])
            for segs in seg_lists]
    with monkeypatch.context() as m:
      if failure == "prefill":
        _inject_failure(m, step_runner, "prefill")
      elif failure == "decode":
        _inject_failure(m, decoding_module, "decode_loop")
      outs = eng.generate(reqs, GREEDY, reuse=MODES[mode], on_error="return")
    for req, out in zip(reqs, outs):
      if failure == "none":  # every request completes, with a clean engine's tokens
        assert out.finish_reason == "length", out.error
        assert out.token_ids == _reference_tokens(req)
      else:  # every device step fails: each request gets its own error, nothing else breaks
        assert out.finish_reason == "error" and "injected" in out.error, out
    _clean_pool(eng)
    assert eng.kv.is_valid()
  assert isinstance(eng.kv, programs.KVPool)
