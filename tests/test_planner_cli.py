"""Planner arithmetic (buckets, k, EPIC choice) and the CLI's error path."""

import numpy as np
import pytest

from models.config import get_config
from sparsex_jax import cli, planner, policy
from sparsex_jax.planner import EXACT, NEW, REUSED, RequestPlan


def test_bucket_bounds_padding_and_is_monotone():
  sizes = np.arange(1, 20000, 7)
  b = np.array([planner.bucket(int(n)) for n in sizes])
  assert np.all(b >= sizes) and np.all(np.diff(b) >= 0)
  big = sizes > 256  # powers of two below, quarter-octave steps above: at most 25% padding
  assert np.all(b[big] <= 1.25 * sizes[big]) and np.all(b[~big] < 2 * np.maximum(sizes[~big], 16))
  assert len(set(b)) < 60  # a bounded set of compiled shapes
  assert planner.bucket(1, minimum=1) == 1 and planner.bucket(3, minimum=1) == 4


@pytest.mark.parametrize("ratio,n,want", [(0.15, 100, 15), (0.15, 101, 16), (0.0, 50, 0),
                                          (1.0, 7, 7), (0.5, 3, 2)])
def test_n_to_select_is_ceil_of_ratio(ratio, n, want):
  assert policy.n_to_select(ratio, n, n) == want
  assert policy.n_to_select(ratio, n, 1) == min(want, 1)  # capped by the candidates


def _plan(labels, segment_ids):
  n = len(labels)
  return RequestPlan(token_ids=np.arange(n, dtype=np.int32), labels=np.array(labels, np.int8),
                     src_slots=np.zeros(n, np.int32), old_positions=np.zeros(n, np.int32),
                     segment_ids=np.array(segment_ids, np.int32),
                     page_table=np.zeros(1, np.int32), n_exact=int(np.sum(np.array(labels) == 0)))


def test_epic_takes_the_head_of_every_reused_segment_and_sparse_q_holds_last_token():
  labels = [EXACT] * 4 + [REUSED] * 10 + [NEW] * 3 + [REUSED] * 5
  segs = [0] * 4 + [1] * 10 + [2] * 3 + [3] * 5
  plan = _plan(labels, segs)
  assert plan.sparse_q[-1] and plan.sparse_q[14:17].all() and plan.sparse_q.sum() == 4
  heads = policy.SegmentHeads()
  scores, count = heads.host_scores(plan, 0.3), heads.n_select(plan, 0.3)
  # ceil(0.3 * 10) = 3 from segment 1, ceil(0.3 * 5) = 2 from segment 3
  assert count == 5 and list(np.flatnonzero(scores)) == [4, 5, 6, 17, 18]


def test_cli_reports_bad_model_cleanly(capsys):
  assert cli.main(["demo", "--model", "no-such-model"]) == 2
  assert "unknown model" in capsys.readouterr().err.lower()


def test_default_thresholds_by_mode_and_depth():
  from sparsex_jax.policy import DEFAULT_LAYER_THRESHOLD, ReuseConfig
  deep, shallow = get_config("smollm2-135m"), get_config("tiny")  # 30 and 3 layers
  t = lambda reuse, cfg=deep: reuse.resolve(cfg).layer_threshold
  assert t(ReuseConfig("sparsex")) == DEFAULT_LAYER_THRESHOLD
  assert t(ReuseConfig("sparsex"), shallow) == 3  # capped for a shallow model
  assert t(ReuseConfig("random")) == DEFAULT_LAYER_THRESHOLD
  assert t(ReuseConfig("cacheblend", check_layer=3)) == 3
  assert t(ReuseConfig("epic")) == t(ReuseConfig("naive")) == 0
  assert t(ReuseConfig("full")) == t(ReuseConfig("prefix")) == 30
  with pytest.raises(ValueError, match="layer_threshold"):
    ReuseConfig("sparsex", layer_threshold=5).resolve(shallow)  # an explicit value is not capped
