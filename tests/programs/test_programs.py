"""The device programs called directly (no engine) against the dense reference path and numpy."""

import jax
import numpy as np

from models import llama
from sparsex_jax import dense, planner
from sparsex_jax.kv import KVStore, PoolLayout
from sparsex_jax.prompt import Prompt
from sparsex_jax.reuse import ReuseConfig
from sparsex_jax.programs import KVPool
from sparsex_jax.programs.copy import copy_slots
from sparsex_jax.programs.decode import decode_step
from sparsex_jax.programs.prefill import assemble, prefill
from tests.engine.test_engine import CFG, PARAMS, _ids

LAYOUT = PoolLayout.for_model(CFG, page_size=4, num_pages=64)


def _rel(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _dense_logits(ids):
  """Dense prefill (contiguous cache) of one prompt: last-token logits and the cache."""
  n = len(ids)
  cache = dense.init_cache(CFG, 1, planner.bucket(n + 1))
  logits, cache = dense.dense_step(PARAMS, CFG, cache, np.asarray(ids, np.int32)[None],
                                   np.arange(n, dtype=np.int32)[None], np.array([n], np.int32),
                                   np.array([n - 1], np.int32))
  return np.asarray(logits[0]), cache


def test_prefill_then_decode_equal_the_dense_path():
  store, kv = KVStore(LAYOUT), KVPool(CFG, LAYOUT)
  prompts = [Prompt((np.asarray(_ids(n, 50 + n), np.int32),), (False,)) for n in (9, 26)]
  policy = ReuseConfig("full").resolve(CFG)
  with store.acquire(prompts, policy, max_new_tokens=2) as leases:
    plans = [planner.plan_request(p, lease, policy, LAYOUT) for p, lease in zip(prompts, leases)]
    batch, spec = planner.plan_batch(plans, policy, CFG, LAYOUT)
    out = kv.run(prefill, PARAMS, batch, cfg=CFG, spec=spec)
    logits = np.asarray(out.logits)
    nxt = logits.argmax(-1).astype(np.int32)
    pos = np.array([p.n for p in plans] + [0] * (nxt.size - len(plans)), np.int32)
    slots = np.full(nxt.size, LAYOUT.sentinel, np.int32)
    slots[:2] = [LAYOUT.slot_of(p.page_table, np.array([p.n]))[0] for p in plans]
    b = nxt.size
    step2 = np.asarray(kv.run(decode_step, PARAMS, nxt, np.where(slots < LAYOUT.sentinel, pos, -1),
                              slots, batch.page_table, pos + 1, np.zeros(b, np.float32),
                              np.ones(b, np.float32), np.zeros(b, np.uint32), np.int32(1),
                              cfg=CFG))
  for i, p in enumerate(prompts):
    want, cache = _dense_logits(p.token_ids)
    assert _rel(logits[i], want) < 1e-4
    n = p.token_ids.size
    want2, _ = dense.dense_step(PARAMS, CFG, cache, nxt[i:i + 1, None], np.array([[n]], np.int32),
                                np.array([n + 1], np.int32), np.zeros((1,), np.int32))
    assert step2[i] == int(np.asarray(want2[0]).argmax())
  assert len(kv.log) == 2  # one prefill and one decode program


def test_copy_slots_moves_every_layer_unchanged_and_drops_sentinels():
  kv = KVPool(CFG, LAYOUT)
  rng = np.random.default_rng(1)
  shape = LAYOUT.pool_shape(CFG)
  kv.arrays = {"k": jax.numpy.asarray(rng.normal(size=shape), CFG.jnp_dtype),
               "v": jax.numpy.asarray(rng.normal(size=shape), CFG.jnp_dtype)}
  before = {k: np.asarray(v) for k, v in kv.arrays.items()}
  src = np.array([[5, 6, 7, 0]], np.int32)
  dst = np.array([[40, 41, 42, LAYOUT.sentinel]], np.int32)
  kv.run(copy_slots, src, dst)
  s = LAYOUT.page_size
  for name in ("k", "v"):
    got, want = np.asarray(kv.arrays[name]), before[name].copy()
    want[:, :, dst[0, :3] // s, dst[0, :3] % s] = before[name][:, :, src[0, :3] // s,
                                                               src[0, :3] % s]
    np.testing.assert_array_equal(got, want)  # the padded copy (slot 0 -> sentinel) wrote nothing


def test_assemble_rerotation_equals_keys_computed_at_the_new_position():
  ids = np.asarray(_ids(6, 3), np.int32)
  layer0 = jax.tree.map(lambda w: w[0], PARAMS["layers"])
  x = llama.embed(PARAMS, ids[None])
  _, k_at_0, v0 = llama.layer_qkv(layer0, CFG, x, np.arange(6)[None])
  _, k_at_9, _ = llama.layer_qkv(layer0, CFG, x, (9 + np.arange(6))[None])
  shape = (1,) + LAYOUT.pool_shape(CFG)[1:]
  pool = {"k": np.zeros(shape, np.float32), "v": np.zeros(shape, np.float32)}
  src = np.arange(4, 10)  # the segment's slots
  dst = np.arange(20, 26)  # where the request wants it
  s = LAYOUT.page_size
  pool["k"][0][:, src // s, src % s] = np.asarray(k_at_0[0]).transpose(1, 0, 2)
  pool["v"][0][:, src // s, src % s] = np.asarray(v0[0]).transpose(1, 0, 2)
  out = assemble({k: jax.numpy.asarray(v) for k, v in pool.items()}, src[None], dst[None],
                 np.full((1, 6), 9), llama.rope_inv_freq(CFG))
  got = np.asarray(out["k"][0][:, dst // s, dst % s]).transpose(1, 0, 2)
  np.testing.assert_allclose(got, np.asarray(k_at_9[0]), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(out["v"][0][:, dst // s, dst % s]),
                                pool["v"][0][:, src // s, src % s])


def test_sparse_prefill_program_equals_full_at_ratio_one():
  """Reused tokens (gathered and re-rotated) all recomputed: the program gives full prefill."""
  store, kv = KVStore(LAYOUT), KVPool(CFG, LAYOUT)
  doc, head, tail = (np.asarray(_ids(n, 60 + n), np.int32) for n in (11, 6, 4))
  alone = ReuseConfig("full").resolve(CFG)
  with store.acquire([Prompt((doc,), (True,))], alone, 0) as leases:
    plan = planner.plan_request(Prompt((doc,), (True,)), leases[0], alone, LAYOUT)
    batch, spec = planner.plan_batch([plan], alone, CFG, LAYOUT)
    kv.run(prefill, PARAMS, batch, cfg=CFG, spec=spec)
    store.keep_alone(Prompt((doc,), (True,)), leases[0])
  prompt = Prompt((head, doc, tail), (False, True, False))
  for t in (0, 1):
    policy = ReuseConfig("sparsex", recompute_ratio=1.0, layer_threshold=t).resolve(CFG)
    with store.acquire([prompt], policy, 0) as leases:
      plan = planner.plan_request(prompt, leases[0], policy, LAYOUT)
      assert plan.n_reused == 11 and plan.n_select == 11
      batch, spec = planner.plan_batch([plan], policy, CFG, LAYOUT)
      out = kv.run(prefill, PARAMS, batch, cfg=CFG, spec=spec)
    want, _ = _dense_logits(prompt.token_ids)
    assert _rel(np.asarray(out.logits[0]), want) < 1e-4
    assert int(np.asarray(out.selected).sum()) == 11
  store.check_invariants()


def _hand_plan(n, n_exact, pages, reused_span, src_page, policy, seed):
  """A RequestPlan made by hand: n_exact exact tokens (their K/V is whatever the pool holds), a
  reused span whose cached K/V sits in page src_page onward, new tokens elsewhere."""
  labels = np.full(n, planner.NEW, np.int8)
  labels[:n_exact] = planner.EXACT
  src, old = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
  lo, hi = reused_span
  labels[lo:hi] = planner.REUSED
  src[lo:hi] = src_page * LAYOUT.page_size + np.arange(hi - lo)
  old[lo:hi] = np.arange(hi - lo)
  plan = planner.RequestPlan(
      token_ids=np.asarray(_ids(n, seed), np.int32), labels=labels, src_slots=src,
      old_positions=old, segment_ids=(np.arange(n) >= lo).astype(np.int32) + (np.arange(n) >= hi),
      page_table=np.asarray(pages, np.int32), n_exact=n_exact)
  sel = policy.select(plan)
  plan.n_select, plan.given_score, plan.forced = sel.n_select, sel.given_score, sel.forced
  return plan


def test_dense_full_layers_equal_paged_with_ragged_exact_prefixes():
  """Full layers as one causal attention over contiguous K/V (queries placed at their absolute
  positions) equal the paged path when the rows of a batch start after exact prefixes of
  different lengths, for a full and a scored sparse prefill: logits, selection and the pool."""
  rng = np.random.default_rng(5)
  shape = LAYOUT.pool_shape(CFG)
  pool0 = {k: rng.normal(size=shape).astype(np.float32) for k in ("k", "v")}
  # (The full policy after an exact prefix: test_golden_logits' dense test, "prefix".)
  for mode in ("sparsex",):
    policy = ReuseConfig(mode, recompute_ratio=0.4, layer_threshold=2).resolve(CFG)
    plans = [_hand_plan(23, 8, [3, 4, 5, 6, 7, 8], (9, 19), 40, policy, 1),
             _hand_plan(14, 4, [9, 10, 11, 12], (5, 12), 44, policy, 2),
             _hand_plan(19, 0, [13, 14, 15, 16, 17], (2, 15), 48, policy, 3)]
    batch, spec = planner.plan_batch(plans, policy, CFG, LAYOUT)
    outs = {}
    # The kernels (interpret mode: assembly, paged attention, importance) once, on the sparse run.
    kinds = [("paged", "reference"), ("dense", "reference")] + (
        [("dense", "pallas_interpret")] if mode == "sparsex" else [])
    for kind, backend in kinds:
      s = spec.__class__(**{**spec.__dict__, "full_attention": kind, "backend": backend,
                            "n_probe": planner.bucket(max(int(p.sparse_q.sum()) for p in plans))})
      pool, out = prefill({k: jax.numpy.asarray(v) for k, v in pool0.items()}, PARAMS, batch,
                          cfg=CFG, spec=s)
      outs[kind, backend] = (np.asarray(out.logits), np.asarray(out.selected),
                             np.asarray(pool["k"]), np.asarray(pool["v"]))
    assert spec.prefix_keys and (spec.scorer is not None) == (mode == "sparsex")
    want = outs["paged", "reference"]
    for key, got in outs.items():
      np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=2e-5, err_msg=str(key))
      np.testing.assert_array_equal(got[1], want[1], err_msg=str(key))
      for a, b in zip(got[2:], want[2:]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5, err_msg=str(key))
