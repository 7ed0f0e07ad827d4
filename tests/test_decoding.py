"""The on-device decode loop against the per-token host loop it replaced, token for token, with
stop tokens, per-row lengths, greedy and seeded top-p rows mixed, and any chunk size."""

import numpy as np
import pytest

from sparsex_jax import decoding
from sparsex_jax.prompt import Prompt
from sparsex_jax.sampling import sample_step
from tests.test_engine import _engine, _ids

MAX_NEW = [1, 6, 11, 4, 9]
TEMPERATURE = np.array([0.0, 1.3, 0.0, 0.9, 1.1, 0, 0, 0], np.float32)
TOP_P = np.array([1.0, 0.8, 1.0, 1.0, 0.95, 1, 1, 1], np.float32)
SEEDS = np.array([0, 7, 3, 123456789, 2**32 - 1, 0, 0, 0], np.uint32)


def _prefilled(eng, lengths, seed=0):
  """Prefills prompts of `lengths` in one batch: (leases, first tokens, plans, prefill batch)."""
  from sparsex_jax.policy import ReuseConfig
  prompts = [Prompt((np.asarray(_ids(n, seed + n), np.int32),), (False,)) for n in lengths]
  policy = ReuseConfig("full").resolve(eng.config)
  leases = eng.store.acquire(prompts, policy, MAX_NEW[:len(prompts)])
  plans, out, batch = eng._prefill(prompts, leases, policy)
  first = np.asarray(sample_step(out.logits, TEMPERATURE, TOP_P, SEEDS, 0))
  return leases, first, plans, batch


def _run(eng, decode, first, plans, batch, stops, **kw):
  return decode(eng.kv, eng.params, eng.config, eng.layout, first, [p.n for p in plans],
                batch.page_table, max_new_tokens=MAX_NEW, stops=stops, temperature=TEMPERATURE,
                top_p=TOP_P, seeds=SEEDS, **kw)


@pytest.mark.parametrize("steps_per_visit", [1, 3, 32])
def test_device_loop_equals_the_per_token_host_loop(steps_per_visit):
  eng = _engine()
  leases, first, plans, batch = _prefilled(eng, [7, 19, 4, 26, 12])
  with leases:
    free = [frozenset()] * 5
    ref = _run(eng, decoding.decode_per_step, first, plans, batch, free)
    assert [len(t) for t, _ in ref] == MAX_NEW and {r for _, r in ref} == {"length"}
    # Stops that fire mid-way: row 1 on its 3rd token, row 4 on its 5th (and a stop id that never
    # comes); row 3 stops on its first token only if that token is a stop (it is not).
    stops = [frozenset(), frozenset({ref[1][0][2], 10**6}), frozenset(), frozenset({5}),
             frozenset({ref[4][0][4]})]
    ref = _run(eng, decoding.decode_per_step, first, plans, batch, stops)
    got = _run(eng, decoding.decode, first, plans, batch, stops, steps_per_visit=steps_per_visit)
  assert got == ref
  assert ref[1][1] == "stop" and len(ref[1][0]) <= 2 and ref[4][1] == "stop"
  assert eng.num_compilations <= 4  # prefill, the step, the loop (and the row-count bucket)
  eng.store.check_invariants()
