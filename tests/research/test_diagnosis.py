"""The round-10 diagnosis pieces: token classes, the greedy oracle's blocks and its probe method
(the tiny model; seconds)."""

import numpy as np

import sparsex_jax as sx
from models import llama
from models.config import get_config
from sparsex_jax.labels import REUSED
from sparsex_jax.research import diagnosis, oracle

CFG = get_config("tiny")


def test_token_classes_follow_offsets_lengths_and_new_neighbours():
  # two segments of 20 and 7 tokens; tokens 18, 19 sit next to a new interval
  in_segment = np.concatenate([np.arange(20), np.arange(7)])
  length = np.array([20] * 20 + [7] * 7)
  near_new = np.zeros(27, bool)
  near_new[[18, 19, 20]] = True
  cls = diagnosis.token_class(in_segment, length, near_new)
  names = [diagnosis.CLASSES[c] for c in cls]
  # ceil(0.15 * 20) = 3 start tokens, ceil(0.15 * 7) = 2 (all heads)
  assert names[:3] == ["head", "head", "start"]
  assert names[3:18] == ["interior"] * 15 and names[18:20] == ["boundary"] * 2
  assert names[20:22] == ["head", "head"]  # a head next to new text stays a head
  assert names[22:] == ["interior"] * 5


def _engine():
  params = llama.init_params(CFG, 5)
  return sx.Engine(CFG, params, page_size=4, num_pages=256)


def _request(rng):
  ids = lambda n: [int(i) for i in rng.integers(3, CFG.vocab_size, size=n)]  # noqa: E731
  a, b = ids(37), ids(21)
  return sx.Request([sx.Segment(ids(5)), sx.Segment(a), sx.Segment(b),
                     sx.Segment(ids(6), cache=False)]), a, b


def test_greedy_blocks_cut_each_segment_and_forced_set_recomputes_exactly_them():
  engine = _engine()
  rng = np.random.default_rng(0)
  request, a, b = _request(rng)
  engine.cache_segments([a, b])
  _, plan, _ = oracle._capture(engine, request, sx.Naive(update_caches=False))
  blocks = oracle.greedy_blocks(plan, n_blocks=6)
  reused = np.flatnonzero((plan.labels == REUSED) & ~plan.sparse_q)
  assert sorted(np.concatenate(blocks).tolist()) == reused.tolist()  # a partition
  for blk in blocks:
    assert 1 <= blk.size <= 10 and np.unique(plan.segment_ids[blk]).size == 1
  chosen = np.zeros(plan.n, bool)
  chosen[blocks[1]] = chosen[blocks[-1]] = True
  method = oracle.ForcedSet(recompute_ratio=0.15, layer_threshold=1, chosen=chosen,
                            update_caches=False)
  _, got = engine.prefill_logits(request, reuse=method, return_plan=True)
  assert sorted(got.selected_positions.tolist()) == sorted(
      np.concatenate([blocks[1], blocks[-1]]).tolist())
  # recomputing every reused token through the sparse layers gives full prefill's logits
  every = np.zeros(plan.n, bool)
  every[reused] = True
  full = engine.prefill_logits(request, reuse=sx.Full(update_caches=False))
  all_set = engine.prefill_logits(request, reuse=oracle.ForcedSet(
      recompute_ratio=0.15, layer_threshold=1, chosen=every, update_caches=False))
  np.testing.assert_allclose(np.asarray(all_set), np.asarray(full), rtol=1e-4, atol=1e-4)
