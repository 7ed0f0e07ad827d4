"""Host-side planning: label a request's tokens from its cache lookups, and pad a batch of plans
into the prefill's typed device batch and static spec.

Plain numpy, no jax: the planner runs before every prefill and must stay out of jit. Every shape it
hands the device is a bucket, so a batch job compiles a bounded set of programs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from models.config import ModelConfig
from sparsex_jax.programs import kernels as ops
from sparsex_jax.api import PrefillPlan
from sparsex_jax.kv.layout import PoolLayout
from sparsex_jax.kv.store import Lease
from sparsex_jax.labels import EXACT, NEW, REUSED
from sparsex_jax.programs.prefill import PrefillBatch, PrefillSpec
from sparsex_jax.reuse import ReusePolicy
from sparsex_jax.prompt import Prompt

__all__ = ["EXACT", "NEW", "REUSED", "Prompt", "RequestPlan", "bucket",
           "plan_request", "plan_batch", "pad_copies", "copy_widths", "describe"]


def bucket(n: int, minimum: int = 16) -> int:
  """A padded size for n: powers of two up to 256, then multiples of an eighth of the next power
  of two (4 buckets per octave, at most 25% padding): a bounded set of compiled shapes that does
  not double the attention work of a long prompt."""
  n = max(n, minimum, 1)
  p = 1 << (n - 1).bit_length()
  if p <= 256:
    return p
  step = p // 8
  return -(-n // step) * step


def largest_bucket_within(n: int, minimum: int = 16) -> int:
  """The largest padded size (a value of `bucket`) that is at most n (n >= 1): a batch of that
  many is computed with no padding."""
  m = max(n, 1)
  while bucket(m, minimum) != m and m > 1:
    m -= 1
  return m


@dataclasses.dataclass
class RequestPlan:
  """One request's prompt, labelled, with the pages it will use."""

  token_ids: np.ndarray  # [n] int32, the whole prompt
  labels: np.ndarray  # [n] int8: EXACT / REUSED / NEW
  src_slots: np.ndarray  # [n] int32 flat pool slot of a reused token's cached K/V, else -1
  old_positions: np.ndarray  # [n] int32 position a reused token's K/V was computed at, else -1
  segment_ids: np.ndarray  # [n] int32 index of the segment each token belongs to
  page_table: np.ndarray  # [n_pages] int32: exact prefix pages, then the request's own pages
  n_exact: int
  n_continued: int = 0  # the last of the n_exact tokens came from the continuation cache
  n_select: int = 0  # reused tokens to recompute in the sparse layers
  given_score: np.ndarray | None = None  # host scores (epic, random), [n] float32
  forced: np.ndarray | None = None  # [n] bool: selected first (segment heads)
  score_rows: np.ndarray | None = None  # [n] bool: the scoring queries (None: the Sparse-Q set)

  @property
  def n(self) -> int:
    return int(self.token_ids.size)

  @property
  def sparse_q(self) -> np.ndarray:
    """The Sparse-Q set: new tokens, and always the last prompt token."""
    q = self.labels == NEW
    q[-1] = True
    return q

  @property
  def scoring_rows(self) -> np.ndarray:
    """The queries whose attention scores the reused tokens: the method's, else the Sparse-Q set."""
    return self.sparse_q if self.score_rows is None else self.score_rows

  @property
  def n_reused(self) -> int:
    return int(np.sum(self.labels == REUSED))

  @property
  def n_candidates(self) -> int:
    return int(np.sum((self.labels == REUSED) & ~self.sparse_q))


def plan_request(prompt: Prompt, lease: Lease, policy: ReusePolicy,
                 layout: PoolLayout) -> RequestPlan:
  """Labels every prompt token from the lease's cache hits and sets the selection counts."""
  ids = prompt.token_ids
  n, n_exact = ids.size, lease.n_exact
  plan = RequestPlan(
      token_ids=ids, labels=np.full(n, NEW, np.int8), src_slots=np.full(n, -1, np.int32),
      old_positions=np.full(n, -1, np.int32),
      segment_ids=np.concatenate([np.full(s.size, i, np.int32)
                                  for i, s in enumerate(prompt.segments)]),
      page_table=lease.page_table, n_exact=n_exact, n_continued=lease.n_continued)
  plan.labels[:n_exact] = EXACT
  spans = prompt.spans
  for i, entry in lease.hits.items():
    start, end = spans[i][0], spans[i][1]
    pos = np.arange(max(start, n_exact), end)
    j = pos - start  # index into the cached segment
    plan.labels[pos] = REUSED
    plan.src_slots[pos] = layout.slot_of(entry.pages, j)
    plan.old_positions[pos] = entry.positions[j]
  selection = policy.select(plan)
  plan.n_select = selection.n_select
  plan.given_score, plan.forced = selection.given_score, selection.forced
  plan.score_rows = selection.score_rows
  return plan


def plan_batch(plans: list[RequestPlan], policy: ReusePolicy, cfg: ModelConfig,
               layout: PoolLayout, backend: str = "auto") -> tuple[PrefillBatch, PrefillSpec]:
  """Pads the non-exact tokens of `plans` into a PrefillBatch (every dimension a bucket) and
  decides the static spec of its program."""
  b = bucket(len(plans), minimum=1)
  t = bucket(max(p.n - p.n_exact for p in plans))
  max_pages = bucket(max(p.page_table.size for p in plans), minimum=4)
  tokens = np.zeros((b, t), np.int32)
  positions = np.full((b, t), -1, np.int32)
  slots = np.full((b, t), layout.sentinel, np.int32)
  src_slots = np.zeros((b, t), np.int32)
  delta = np.zeros((b, t), np.int32)
  reused = np.zeros((b, t), bool)
  sparse_q = np.zeros((b, t), bool)
  given_score = np.zeros((b, t), np.float32)
  forced = np.zeros((b, t), bool)
  score_rows = np.zeros((b, t), bool)
  n_select, last_index, kv_len = (np.zeros((b,), np.int32) for _ in range(3))
  page_table = np.zeros((b, max_pages), np.int32)
  for i, p in enumerate(plans):
    work = slice(p.n_exact, p.n)
    m = p.n - p.n_exact
    pos = np.arange(p.n_exact, p.n, dtype=np.int32)
    is_reused = p.labels[work] == REUSED
    tokens[i, :m] = p.token_ids[work]
    positions[i, :m] = pos
    slots[i, :m] = layout.slot_of(p.page_table, pos)
    reused[i, :m] = is_reused
    src_slots[i, :m] = np.where(is_reused, p.src_slots[work], 0)
    delta[i, :m] = np.where(is_reused, pos - p.old_positions[work], 0)
    sparse_q[i, :m] = p.sparse_q[work]
    score_rows[i, :m] = p.scoring_rows[work]
    if p.given_score is not None:
      given_score[i, :m] = p.given_score[work]
    if p.forced is not None:
      forced[i, :m] = p.forced[work]
    n_select[i], last_index[i], kv_len[i] = p.n_select, m - 1, p.n
    page_table[i, :p.page_table.size] = p.page_table
  batch = PrefillBatch(tokens=tokens, positions=positions, slots=slots, src_slots=src_slots,
                       delta=delta, reused=reused, sparse_q=sparse_q, given_score=given_score,
                       forced=forced, score_rows=score_rows, n_select=n_select,
                       last_index=last_index,
                       page_table=page_table, kv_len=kv_len)
  return batch, _spec(plans, policy, cfg, backend)


def _spec(plans: list[RequestPlan], policy: ReusePolicy, cfg: ModelConfig,
          backend: str) -> PrefillSpec:
  n_layers = cfg.n_layers
  any_reused = any(p.n_reused for p in plans)
  layer_threshold = policy.layer_threshold if any_reused else n_layers
  if layer_threshold == n_layers:  # every token is computed in full: nothing to select
    # Every layer recomputes every token: no cached K/V is read, so nothing is assembled (and
    # a reused segment does not make this a program of its own).
    return PrefillSpec(layer_threshold=n_layers, assemble=False, backend=backend,
                       full_attention=full_attention_kind(cfg, backend),
                       prefix_keys=any(p.n_exact > 0 for p in plans))
  # No request selects anything: the host's (empty) choice is all there is.
  scorer = policy.scorer if any(p.n_select for p in plans) else None
  n_late_q = [int(p.sparse_q[p.n_exact:].sum()) for p in plans]
  n_active = bucket(max(q + p.n_select for q, p in zip(n_late_q, plans)))
  uses_probe = scorer is not None and scorer.uses_probe
  if uses_probe:
    # One bucket for both: the scoring rows' attention at two layers costs about 1% of the
    # sparse layers it serves even at n_active rows, while each (n_active, n_probe) pair is a
    # program a server compiles while its requests wait (round 15's load run).
    n_active = max(n_active, bucket(max(int(p.scoring_rows.sum()) for p in plans)))
  return PrefillSpec(
      layer_threshold=layer_threshold, scorer=scorer, n_active=n_active,
      n_probe=n_active if uses_probe else 0,
      assemble=any_reused, backend=backend,
      full_attention=full_attention_kind(cfg, backend) if layer_threshold > 0 else "paged",
      prefix_keys=any(p.n_exact > 0 for p in plans))


def full_attention_kind(cfg: ModelConfig, backend: str) -> str:
  """How the full layers attend: "dense" (cuDNN flash attention over contiguous K/V, with every
  non-exact token a query) where cuDNN runs (GPU kernels, bf16/f16, head dim <= 128), else
  "paged" (the sparse-query kernel or reference with every token a query; same results). The CPU
  keeps "paged": its reference chunks the queries, XLA's dense softmax would hold [N, T, T]."""
  if ops.compiled(backend) and ops.cudnn_can_run(cfg.jnp_dtype, cfg.head_dim):
    return "dense"
  return "paged"


def pad_copies(src: list[np.ndarray], dst: list[np.ndarray],
               layout: PoolLayout) -> tuple[np.ndarray, np.ndarray]:
  """All slot copies in one row, [1, copy_width(total)]; padding copies slot 0 to the sentinel
  (dropped). A copy moves each slot on its own, so rows mean nothing to the program: one row
  makes the copy's program depend on a single bucketed size. A server commits a different number
  and length of new segments after almost every prefill, and [copies, longest] shapes compiled a
  program for most of them while requests waited (round 15's load run)."""
  total = sum(s.size for s in src)
  if total != sum(d.size for d in dst):
    raise ValueError(f"{total} source slots for {sum(d.size for d in dst)} destinations")
  width = copy_width(total)
  src_slots = np.zeros((1, width), np.int32)
  dst_slots = np.full((1, width), layout.sentinel, np.int32)
  if total:
    src_slots[0, :total] = np.concatenate(src)
    dst_slots[0, :total] = np.concatenate(dst)
  return src_slots, dst_slots


def copy_width(total: int) -> int:
  """The padded width of `total` slot copies: a power of two >= 16 (not a quarter octave: a copy
  moves a few MB at most, while each width is a program a server compiles between requests)."""
  return 1 << (max(total, 16) - 1).bit_length()


def copy_widths(max_slots: int) -> list[int]:
  """Every width pad_copies gives for up to max_slots copies, smallest first (what a server
  compiles ahead: entrypoints/serve/compiling.py)."""
  widths = [16]
  while widths[-1] < max_slots:
    widths.append(widths[-1] * 2)
  return widths


def describe(plan: RequestPlan, scores, selected, policy: ReusePolicy) -> PrefillPlan:
  """The public account of one prefill: labels, scores and what was recomputed."""
  work = np.arange(plan.n_exact, plan.n)
  scores = np.asarray(scores)[:work.size]
  selected = np.asarray(selected)[:work.size]
  reused = plan.labels[work] == REUSED
  return PrefillPlan(labels=plan.labels.copy(), sparse_q=plan.sparse_q,
                     reused_positions=work[reused], scores=scores[reused],
                     selected_positions=work[selected], layer_threshold=policy.layer_threshold)
