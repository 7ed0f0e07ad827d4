"""The on-device decode loop against the per-token host loop it replaced, token for token, with
stop tokens, per-row lengths, greedy and seeded top-p rows mixed, and any chunk size. Both loops
and the other layer loops live in sparsex_jax/research/baselines.py (comparison paths, not engine
options)."""

import numpy as np

from sparsex_jax.prompt import Prompt
from sparsex_jax.research import baselines
from sparsex_jax.sampling import sample_step
from sparsex_jax.step_runner import prefill_and_commit
from tests.engine.test_engine import CFG, _engine, _ids

MAX_NEW = [1, 6, 11, 4, 9]
TEMPERATURE = np.array([0.0, 1.3, 0.0, 0.9, 1.1, 0, 0, 0], np.float32)
TOP_P = np.array([1.0, 0.8, 1.0, 1.0, 0.95, 1, 1, 1], np.float32)
SEEDS = np.array([0, 7, 3, 123456789, 2**32 - 1, 0, 0, 0], np.uint32)


def _prefilled(eng, lengths, seed=0):
  """Prefills prompts of `lengths` in one batch: (leases, first tokens, plans, prefill batch)."""
  from sparsex_jax.reuse import ReuseConfig
  prompts = [Prompt((np.asarray(_ids(n, seed + n), np.int32),), (False,)) for n in lengths]
  policy = ReuseConfig("full").resolve(eng.config)
  leases = eng.store.acquire(prompts, policy, MAX_NEW[:len(prompts)])
  plans, out, batch = prefill_and_commit(eng, prompts, leases, policy)
  b = out.logits.shape[0]
  first = np.asarray(sample_step(out.logits, TEMPERATURE[:b], TOP_P[:b], SEEDS[:b], 0))
  return leases, first, plans, batch


def _run(eng, decode, first, plans, batch, stops, **kw):
  return decode(eng.kv, eng.params, eng.config, eng.layout, first, [p.n for p in plans],
                batch.page_table, max_new_tokens=MAX_NEW[:len(plans)], stops=stops,
                temperature=TEMPERATURE[:first.size], top_p=TOP_P[:first.size],
                seeds=SEEDS[:first.size], **kw)


def test_device_loop_equals_the_per_token_host_loop():
  eng = _engine()
  leases, first, plans, batch = _prefilled(eng, [7, 19, 4, 26, 12])
  with leases:
    free = [frozenset()] * 5
    ref = _run(eng, baselines.decode_per_step, first, plans, batch, free)
    assert [len(t) for t, _ in ref] == MAX_NEW and {r for _, r in ref} == {"length"}
    # Stops that fire mid-way: row 1 on its 3rd token, row 4 on its 5th (and a stop id that never
    # comes); row 3 stops if it samples token 5.
    stops = [frozenset(), frozenset({ref[1][0][2], 10**6}), frozenset(), frozenset({5}),
             frozenset({ref[4][0][4]})]
    ref = _run(eng, baselines.decode_per_step, first, plans, batch, stops)
    # Chunks of 1 token, of 3 (rows finish mid-chunk), and longer than any output.
    for steps_per_visit in (1, 3, 32):
      got = _run(eng, baselines.decode, first, plans, batch, stops,
                 steps_per_visit=steps_per_visit)
      assert got == ref, steps_per_visit
  assert ref[1][1] == "stop" and len(ref[1][0]) <= 2 and ref[4][1] == "stop"
  eng.store.check_invariants()


def test_the_other_layer_loops_give_the_same_tokens():
  eng = _engine()
  leases, first, plans, batch = _prefilled(eng, [9, 21])
  with leases:
    stops = [frozenset()] * 2
    ref = _run(eng, baselines.decode_per_step, first, plans, batch, stops)
    per_layer = baselines.per_layer_params(eng.params)
    assert isinstance(per_layer["layers"], list) and len(per_layer["layers"]) == CFG.n_layers
    for loop, params in (("unrolled", eng.params), ("per_layer", per_layer)):
      got = baselines.decode(eng.kv, params, eng.config, eng.layout, first, [p.n for p in plans],
                             batch.page_table, max_new_tokens=MAX_NEW[:2], stops=stops,
                             temperature=TEMPERATURE[:first.size], top_p=TOP_P[:first.size],
                             seeds=SEEDS[:first.size], layer_loop=loop)
      assert got == ref, loop
