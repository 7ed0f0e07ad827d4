"""The paged engine against the dense path and the full forward, on a tiny random model."""

import jax
import numpy as np
import pytest

import sparsex_jax as sx
from models import llama
from models.config import get_config
from sparsex_jax import dense
from sparsex_jax.kv import PoolExhausted
from sparsex_jax.prompt import tokenize
from sparsex_jax.step_runner import prefill_and_commit

CFG = get_config("tiny")


def _params(seed=3):
  params = llama.init_params(CFG, seed)
  # Larger weights than init: sharper attention, so reuse mistakes show up in the logits.
  return jax.tree.map(lambda w: w * 3.0 if w.ndim == 3 else w, params)


PARAMS = _params()


def _engine(**kw):
  kw.setdefault("page_size", 4)
  kw.setdefault("num_pages", 256)
  return sx.Engine(CFG, PARAMS, **kw)


def _ids(n, seed):
  return [int(i) for i in np.random.default_rng(seed).integers(3, CFG.vocab_size, size=n)]


def _full_logits(ids):
  return np.asarray(llama.forward(PARAMS, CFG, np.asarray(ids)[None]))[0, -1]


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_paged_prefill_matches_full_forward():
  eng = _engine()
  ids = _ids(29, 0)
  got = eng.prefill_logits(sx.Request([sx.Segment(ids)]), reuse=sx.ReuseConfig("full"))
  assert _rel(got, _full_logits(ids)) < 1e-4


def test_mixed_batch_generate_matches_dense():
  eng = _engine()
  prompts = [_ids(n, 10 + n) for n in (5, 23, 40, 12)]
  sp = sx.SamplingParams(max_new_tokens=7, temperature=0.0, ignore_eos=True)
  outs = eng.generate([sx.Request([sx.Segment(p)]) for p in prompts], sp,
                      reuse=sx.ReuseConfig("full"))
  for p, o in zip(prompts, outs):
    want, _ = dense.generate(PARAMS, CFG, p, sp)
    assert o.token_ids == want
    assert o.stats.n_prompt == len(p) and o.stats.n_new == len(p) and o.stats.n_generated == 7
  # "full" caches nothing and every request released its pages
  assert eng.store.allocator.num_used == 0


def test_prefix_hit_is_exact_and_counted():
  eng = _engine()
  system, q1, q2 = _ids(18, 1), _ids(6, 2), _ids(9, 3)
  mode = sx.ReuseConfig("prefix")
  first = eng.generate([sx.Request([sx.Segment(system), sx.Segment(q1)])],
                       sx.SamplingParams(max_new_tokens=2), reuse=mode)[0]
  assert first.stats.n_exact == 0
  req = sx.Request([sx.Segment(system), sx.Segment(q2)])
  second = eng.generate([req], sx.SamplingParams(max_new_tokens=2), reuse=mode)[0]
  assert second.stats.n_exact == 16  # the full pages (4 tokens each) of the shared prefix
  logits = eng.prefill_logits(req, reuse=mode)
  np.testing.assert_allclose(logits, _full_logits(system + q2), rtol=1e-4, atol=1e-4)
  assert eng.stats()["prefix_cache"]["hits"] > 0


def _layer0_keys(eng, request, reuse):
  """Runs a prefill and reads layer-0 keys of the prompt from the pool, through the plan's pages."""
  policy = reuse.resolve(eng.config)
  prompt = tokenize(request, eng.tokenizer, eng.config, 0)
  with eng.store.acquire([prompt], policy, max_new_tokens=0) as leases:
    plans, _, _ = prefill_and_commit(eng, [prompt], leases, policy)
    plan = plans[0]
    slots = eng.layout.slot_of(plan.page_table, np.arange(plan.n))
    pages, offs = slots // eng.layout.page_size, slots % eng.layout.page_size
    return np.asarray(eng.pool["k"][0][:, pages, offs]), plan


def test_naive_reuse_at_position_zero_equals_prefix_hit_and_rerotation_is_exact():
  eng = _engine()
  doc, other, question = _ids(14, 4), _ids(9, 5), _ids(5, 6)
  assert eng.cache_segments([doc]) == 1
  naive = sx.ReuseConfig("naive")
  at_zero = eng.prefill_logits(sx.Request([sx.Segment(doc), sx.Segment(question, cache=False)]),
                               reuse=naive)
  np.testing.assert_allclose(at_zero, _full_logits(doc + question), rtol=1e-4, atol=1e-4)

  keys, plan = _layer0_keys(eng, sx.Request([sx.Segment(other, cache=False), sx.Segment(doc),
                                             sx.Segment(question, cache=False)]), naive)
  assert np.all(plan.labels[9:23] == 1)  # doc's tokens were reused from the segment cache
  # layer-0 keys depend only on token and position: re-rotated keys must equal fresh ones
  full_ids = np.asarray(other + doc + question)
  x = llama.embed(PARAMS, full_ids[None])
  _, k_fresh, _ = llama.layer_qkv(jax.tree.map(lambda w: w[0], PARAMS["layers"]), CFG, x,
                                  np.arange(full_ids.size)[None])
  np.testing.assert_allclose(keys.transpose(1, 0, 2), np.asarray(k_fresh[0]), atol=2e-5)


def test_segment_cache_hit_counts_and_in_context_insert():
  eng = _engine()
  a, b, q = _ids(10, 7), _ids(11, 8), _ids(4, 9)
  reuse = sx.ReuseConfig("sparsex", recompute_ratio=0.5, layer_threshold=1)
  out = eng.generate([sx.Request([sx.Segment(a), sx.Segment(b), sx.Segment(q, cache=False)])],
                     sx.SamplingParams(max_new_tokens=1), reuse=reuse)[0]
  assert out.stats.n_reused == 0 and out.stats.n_new == 25
  assert eng.store.segment_cache.num_entries == 2  # both segments stored, computed in context
  out = eng.generate([sx.Request([sx.Segment(b), sx.Segment(a), sx.Segment(q, cache=False)])],
                     sx.SamplingParams(max_new_tokens=1), reuse=reuse)[0]
  assert out.stats.n_reused == 21 and out.stats.n_new == 4
  assert out.stats.n_recomputed == 11  # ceil(0.5 * 21)


def test_pool_exhaustion_evicts_or_fails_cleanly():
  eng = _engine(num_pages=12)  # 11 usable pages of 4 tokens
  with pytest.raises(ValueError, match="pool too small"):
    eng.generate([sx.Request([sx.Segment(_ids(50, 1))])], sx.SamplingParams(max_new_tokens=2))
  # fills the cache, then needs the space again: cached pages are evicted, not an error
  reuse = sx.ReuseConfig("prefix")
  outs = eng.generate([sx.Request([sx.Segment(_ids(30, s))]) for s in range(4)],
                      sx.SamplingParams(max_new_tokens=3, ignore_eos=True), reuse=reuse)
  assert [len(o.token_ids) for o in outs] == [3] * 4
  assert eng.stats()["prefix_cache"]["evictions"] > 0
  eng.store.allocator.check_invariants()

  # a pinned segment holds pages: a request that cannot fit fails and leaves everything intact
  eng2 = _engine(num_pages=12)
  eng2.cache_segments([_ids(16, 42)])
  entry = next(iter(eng2.store.segment_cache._entries.values()))
  eng2.store.segment_cache.pin(entry)
  before = (eng2.store.allocator.num_free, eng2.store.segment_cache.num_entries)
  with pytest.raises(sx.RequestError, match="request 0: KV page pool exhausted") as err:
    eng2.generate([sx.Request([sx.Segment(_ids(36, 2))])], sx.SamplingParams(max_new_tokens=2))
  assert isinstance(err.value.cause, PoolExhausted)
  assert (eng2.store.allocator.num_free, eng2.store.segment_cache.num_entries) == before
  eng2.store.segment_cache.unpin(entry)
  eng2.store.allocator.check_invariants()


def test_segment_keeps_its_ids_as_a_tuple_and_a_read_only_array():
  source = np.random.default_rng(2).integers(0, CFG.vocab_size, 50).astype(np.int32)
  seg = sx.Segment(source)
  source[0] += 1  # the segment holds its own copy
  assert seg.content == tuple(int(i) for i in source[:1] - 1) + tuple(source[1:].tolist())
  np.testing.assert_array_equal(seg.token_array, np.asarray(seg.content))
  assert seg.token_array.dtype == np.int64 and not seg.token_array.flags.writeable
  other = sx.Segment(list(seg.content))
  assert other == seg and hash(other) == hash(seg)  # the array is neither compared nor hashed
  assert sx.Segment("text").token_array is None


def test_bad_input():
  eng = _engine()
  with pytest.raises(ValueError, match="empty request"):
    sx.Request([])
  with pytest.raises(ValueError, match="empty segment"):
    sx.Segment([])
  with pytest.raises(ValueError, match="empty segment"):
    sx.Segment("")
  with pytest.raises(ValueError, match="unknown reuse mode"):
    sx.ReuseConfig("magic")
  for r in (-0.1, 1.5):
    with pytest.raises(ValueError, match="recompute_ratio"):
      sx.ReuseConfig("sparsex", recompute_ratio=r)
  req = sx.Request([sx.Segment(_ids(8, 1))])
  for t in (-1, CFG.n_layers + 1):
    with pytest.raises(ValueError, match="layer_threshold"):
      eng.prefill_logits(req, reuse=sx.ReuseConfig("sparsex", layer_threshold=t))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    eng.prefill_logits(sx.Request([sx.Segment([1, CFG.vocab_size + 5])]))
  with pytest.raises(ValueError, match="no tokenizer"):
    eng.prefill_logits(sx.Request([sx.Segment("text needs a tokenizer")]))
  with pytest.raises(ValueError, match="context"):
    eng.generate([sx.Request([sx.Segment(_ids(CFG.max_seq_len - 2, 1))])],
                 sx.SamplingParams(max_new_tokens=8))
  assert eng.store.allocator.num_used == 0


def test_compilations_are_bounded_by_buckets():
  eng = _engine()
  sp = sx.SamplingParams(max_new_tokens=3, ignore_eos=True)
  eng.generate([sx.Request([sx.Segment(_ids(20, 0))])], sp, reuse=sx.ReuseConfig("full"))
  after_first = eng.num_compilations
  for n in (17, 21, 25, 28):  # same token bucket (32), same page-table bucket (8)
    eng.generate([sx.Request([sx.Segment(_ids(n, n))])], sp, reuse=sx.ReuseConfig("full"))
  assert eng.num_compilations == after_first
  out = eng.generate([sx.Request([sx.Segment(_ids(9, 9))])], sp, reuse=sx.ReuseConfig("full"))
  assert out[0].stats.compilations == eng.num_compilations <= after_first + 2


def test_mixed_batch_prefill_logits_match_full_forward():
  from sparsex_jax.prompt import Prompt
  eng = _engine()
  prompts = [Prompt((np.asarray(_ids(n, 30 + n), np.int32),), (False,)) for n in (7, 33, 18)]
  policy = sx.ReuseConfig("full").resolve(CFG)
  with eng.store.acquire(prompts, policy, max_new_tokens=1) as leases:
    _, out, _ = prefill_and_commit(eng, prompts, leases, policy)
  logits = np.asarray(out.logits)
  for i, p in enumerate(prompts):
    assert _rel(logits[i], _full_logits(p.token_ids)) < 1e-4
  assert eng.store.allocator.num_used == 0


def test_seeded_sampling_is_reproducible_and_seed_dependent():
  eng = _engine()
  req = sx.Request([sx.Segment(_ids(12, 77))])
  draw = lambda seed: eng.generate(
      [req], sx.SamplingParams(max_new_tokens=12, temperature=1.5, seed=seed, ignore_eos=True),
      reuse=sx.ReuseConfig("full"))[0].token_ids
  assert draw(1) == draw(1)
  assert draw(1) != draw(2)
  greedy = eng.generate([req], sx.SamplingParams(max_new_tokens=12, ignore_eos=True),
                        reuse=sx.ReuseConfig("full"))[0].token_ids
  assert draw(1) != greedy


def test_stream_yields_what_generate_returns_as_each_request_finishes():
  eng = _engine(max_batch_size=2)
  reqs = [sx.Request([sx.Segment(_ids(9 + 3 * i, i))], id=i,
                     sampling=sx.SamplingParams(max_new_tokens=2 + 3 * i, ignore_eos=True))
          for i in range(3)] + [sx.Request([sx.Segment([CFG.vocab_size])], id="bad")]
  order = []
  want = eng.generate(reqs, reuse=sx.ReuseConfig("full"), on_error="return",
                      on_output=lambda i, out: order.append(i))
  got = list(eng.stream(reqs, reuse=sx.ReuseConfig("full"), on_error="return"))
  # The bad request first (failed in validation), then in the order they finish.
  assert [i for i, _ in got] == order and order[0] == 3 and sorted(order) == [0, 1, 2, 3]
  assert [out.token_ids for _, out in sorted(got, key=lambda x: x[0])] == \
      [out.token_ids for out in want]
  assert got[0][1].finish_reason == "error" and "vocabulary" in got[0][1].error
  # Closing the stream early ends the job and releases what it held.
  results = eng.stream(reqs[:3], reuse=sx.ReuseConfig("full"))
  next(results)
  results.close()
  assert not eng.store._live
  eng.store.check_invariants()
