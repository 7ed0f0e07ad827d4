"""Continuous batching (Engine.generate: the Scheduler's steps run over a batching.RunningBatch)
against independent references: each request generated alone on a fresh engine. Requests arrive, finish and share
segments at different times; seeded samples do not depend on the batch; the pool's books balance
after any job (hypothesis)."""

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import sparsex_jax as sx
from tests.engine.test_engine import _engine, _ids
from tests.engine.test_reliability import _clean_pool

DOCS = [_ids(n, 500 + n) for n in (9, 14, 6)]
# r = 1 recomputes every reused token: the tokens equal a full prefill's, so a request's output
# must not depend on whether its passages were cached by a request before it.
EXACT_REUSE = sx.ReuseConfig("sparsex", recompute_ratio=1.0, layer_threshold=1)


def _alone(req, sampling, reuse=sx.ReuseConfig("full")):
  return _engine().generate([req], sampling, reuse=reuse)[0]


def _programs(eng, name):
  return sum(1 for key in eng.kv.log._seen if key[0] == name)


def test_continuous_batching_gives_each_request_its_tokens_alone():
  # 9 requests through 2 rows, output lengths 1..9, chunks of 3 steps: requests join and leave
  # mid-job, and passages are cached by one request and reused by later ones.
  reqs, lengths = [], [5, 1, 9, 2, 7, 3, 8, 4, 6]
  for i, n_new in enumerate(lengths):
    segs = [sx.Segment(DOCS[i % 3]), sx.Segment(DOCS[(i + 1) % 3])][:1 + i % 2]
    reqs.append(sx.Request(segs + [sx.Segment(_ids(3 + i, 900 + i), cache=False)], id=i,
                           sampling=sx.SamplingParams(max_new_tokens=n_new, ignore_eos=True)))
  # One request stops on a token it generates (found from its run alone).
  probe = _alone(reqs[4], reqs[4].sampling).token_ids
  reqs[4] = sx.Request(reqs[4].segments, id=4, sampling=sx.SamplingParams(
      max_new_tokens=7, stop_token_ids=(probe[3],)))
  eng = _engine(max_batch_size=2, steps_per_visit=3, num_pages=40)
  outs = eng.generate(reqs, reuse=EXACT_REUSE)
  for req, out in zip(reqs, outs):
    want = _alone(req, req.sampling)
    assert (out.token_ids, out.finish_reason) == (want.token_ids, want.finish_reason), req.id
    assert out.request_id == req.id
  assert outs[4].finish_reason == "stop" and len(outs[4].token_ids) <= 3
  assert sum(o.stats.n_reused > 0 for o in outs) >= 5  # later requests reused cached passages
  assert _programs(eng, "decode_loop") == 1  # one running batch: one decode program
  _clean_pool(eng)


def test_seeded_samples_do_not_depend_on_the_batch():
  sp = sx.SamplingParams(max_new_tokens=9, temperature=1.2, top_p=0.9, seed=5, ignore_eos=True)
  target = sx.Request([sx.Segment(_ids(10, 1))], sampling=sp)
  alone = _engine(steps_per_visit=32).generate([target])[0].token_ids
  others = [sx.Request([sx.Segment(_ids(4 + i, 20 + i))], sampling=sx.SamplingParams(
      max_new_tokens=2 + 3 * i, temperature=0.7 * i, seed=i, ignore_eos=True)) for i in range(4)]
  # 2 and 4 rows (refilled mid-job), and 8 rows (one group of 5 padded to 8)
  for position, rows, steps in ((3, 2, 3), (4, 4, 1), (2, 8, 4)):
    reqs = others[:position] + [target] + others[position:]
    outs = _engine(max_batch_size=rows, steps_per_visit=steps).generate(reqs)
    assert outs[position].token_ids == alone, (position, rows, steps)
  assert len(set(map(tuple, [o.token_ids for o in outs]))) == len(outs)


def test_a_request_larger_than_the_pool_fails_alone_and_raise_releases_everything():
  eng = _engine(num_pages=12, max_batch_size=2)  # 11 pages of 4 tokens
  sp = sx.SamplingParams(max_new_tokens=3, ignore_eos=True)
  reqs = [sx.Request([sx.Segment(_ids(n, n))], id=n, sampling=sp) for n in (9, 60, 13, 7)]
  outs = eng.generate(reqs, reuse=sx.ReuseConfig("full"), on_error="return")
  assert [o.finish_reason for o in outs] == ["length", "error", "length", "length"]
  assert "pool too small" in outs[1].error
  assert outs[3].token_ids == _alone(reqs[3], sp).token_ids
  with pytest.raises(sx.RequestError, match="request 1 .id 60.: pool too small") as err:
    eng.generate(reqs, reuse=sx.ReuseConfig("full"))
  assert err.value.outputs[1] is None and eng.store._live == {}  # the running one was released
  _clean_pool(eng)
  assert eng.store.allocator.num_used == 0


def test_on_output_sees_each_request_as_it_finishes_and_its_errors_end_the_job():
  eng = _engine(max_batch_size=2, steps_per_visit=2)
  lengths = [7, 1, 2, 6]  # through 2 rows: the short second request finishes first
  reqs = [sx.Request([sx.Segment(_ids(5 + i, 700 + i))], id=i, sampling=sx.SamplingParams(
      max_new_tokens=n, ignore_eos=True)) for i, n in enumerate(lengths)]
  seen = []
  outs = eng.generate(reqs, reuse=sx.ReuseConfig("full"),
                      on_output=lambda i, out: seen.append((i, out)))
  assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
  assert all(outs[i] is out for i, out in seen)  # the same outputs, as they were set
  assert [len(o.token_ids) for o in outs] == lengths
  assert [i for i, _ in seen][:2] == [1, 2]  # completion order, not request order

  def broken(i, out):
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    eng.generate(reqs, reuse=sx.ReuseConfig("full"), on_output=broken)
  _clean_pool(eng)  # nothing left pinned or leased


jobs = st.tuples(
    st.lists(st.tuples(st.lists(st.integers(0, 2), max_size=2), st.integers(1, 7),
                       st.integers(1, 6)), min_size=1, max_size=7),
    # Few pool sizes, row counts and chunk sizes: each new one compiles new programs.
    st.sampled_from(["sparsex", "prefix", "full"]), st.sampled_from([9, 24]),
    st.sampled_from([1, 2, 4]), st.sampled_from([1, 3]))


@settings(max_examples=7, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs)
def test_after_any_job_every_page_is_free_or_cached(job):
  requests, mode, pages, rows, steps = job
  eng = _engine(num_pages=pages, max_batch_size=rows, steps_per_visit=steps)
  reqs = [sx.Request([sx.Segment(DOCS[d]) for d in docs] + [sx.Segment(_ids(q, q), cache=False)],
                     sampling=sx.SamplingParams(max_new_tokens=n_new, ignore_eos=True))
          for docs, q, n_new in requests]
  outs = eng.generate(reqs, reuse=sx.ReuseConfig(mode), on_error="return")
  for req, out in zip(reqs, outs):
    n = sum(len(s.content) for s in req.segments) + req.sampling.max_new_tokens
    if eng.layout.pages_for(n) > pages - 1:  # can never fit: its own error, nobody else's
      assert out.finish_reason == "error" and "pool too small" in out.error
    else:
      assert out.finish_reason == "length" and len(out.token_ids) == req.sampling.max_new_tokens
  _clean_pool(eng)
  assert np.all(eng.store.allocator.refcounts(np.arange(1, pages)) <= 1)


def test_admission_stops_at_a_padded_size_when_the_free_rows_pass_one():
  from sparsex_jax import planner, scheduler
  # largest_bucket_within: the largest padded size <= n, against the bucket function itself
  for n in range(1, 300):
    m = planner.largest_bucket_within(n, minimum=1)
    assert m <= n and planner.bucket(m, minimum=1) == m
    assert all(planner.bucket(k, minimum=1) != k for k in range(m + 1, n + 1))
  refill = int(64 * scheduler.REFILL_FRACTION)  # 16 of 64 rows
  assert scheduler.admission_limit(17, 47, 64) == 16  # 17 would be padded to 32
  assert scheduler.admission_limit(31, 33, 64) == 16
  assert scheduler.admission_limit(16, 48, 64) == 16
  # Below the refill size every free row is filled (13 padded to 16: idle rows cost more).
  assert scheduler.admission_limit(13, 51, 64) == 13 and refill == 16
  assert scheduler.admission_limit(64, 0, 64) == 64  # an empty batch is filled whole
  assert scheduler.admission_limit(40, 0, 64) == 40
  assert scheduler.admission_limit(1, 1, 2) == 1 and scheduler.admission_limit(0, 2, 2) == 0
