"""The device side of continuous batching: one job's running batch and the work of each step.

Engine.generate's loop is schedule -> run -> update: the Scheduler (host only) says which requests
to drop, prefill and decode; `StepRunner.run` does it (the engine's prefill program and commit,
the first token, joins, one decode loop) and reports a StepResult. A failure is reported, never
raised, with the pool left valid; the scheduler decides who is retried and who fails.
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import jax
import numpy as np

from sparsex_jax import decoding, planner, scheduler
from sparsex_jax.api import RequestOutput, RequestStats
from sparsex_jax.batching import DecodingRequest, RunningBatch, stop_width
from sparsex_jax.kv.host_tier import (RUN_BLOCKS, RunLoad, StoredKV, finish_loads, run_pages,
                                      start_loads, stored_dtype, stored_pages)
from sparsex_jax.kv.layout import layer_cuts
from sparsex_jax.labels import NEW
from sparsex_jax.sampling import resolve_stop_ids, sample_step
from sparsex_jax.programs.copy import copy_slots
from sparsex_jax.programs.prefill import prefill, prefill_full_layers, prefill_rest
from sparsex_jax.scheduler import ScheduledRequest, Step, StepResult

if TYPE_CHECKING:
  from sparsex_jax.planner import RequestPlan
  from sparsex_jax.programs.prefill import PrefillBatch, PrefillOutput
  from sparsex_jax.prompt import Prompt


class EngineView(Protocol):
  """What the step runner uses of an engine (sparsex_jax/engine.py's Engine), named here so that
  imports run one way: the engine imports this module, never the reverse."""

  config: Any
  params: Any
  tokenizer: Any
  layout: Any
  kv: Any
  store: Any
  disk_link: Any
  host_tier: Any
  attention_backend: str
  max_batch_size: int
  num_compilations: int


def sampling_rows(requests: Sequence[ScheduledRequest], b: int):
  """temperature, top_p, seeds [b] of a padded batch. A request's seed is its own: never its
  row or batch."""
  temperature, top_p, seeds = (np.zeros(b, np.float32), np.ones(b, np.float32),
                               np.zeros(b, np.uint32))
  for i, r in enumerate(requests):
    temperature[i], top_p[i], seeds[i] = r.sampling.temperature, r.sampling.top_p, r.sampling.seed
  return temperature, top_p, seeds


class StepRunner:
  """Runs the scheduler's steps of one job on `engine`'s device.

  The running batch is fixed for the job: rows (a bucket of min(max_batch_size, requests)),
  page-table width and stop width, so its decode loop compiles once per job.

  on_first_logits(request, logits [V] float32), if set, is called with each prefilled request's
  first-token logits (a test's view of what a server computed; off by default: it copies the
  logits to the host)."""

  on_first_logits: Callable[[ScheduledRequest, np.ndarray], object] | None = None
  # Called with a step's prefilled sequences (their first tokens) before its decode loop runs: a
  # server sends each first token then, not a decode loop later.
  on_prefilled: Callable[[list[DecodingRequest]], object] | None = None
  # Prefill each admitted request on its own (a server): one program per request's own shape
  # buckets, instead of one per mix of rows, lengths and active sets (see `start_split`).
  prefill_alone: bool = False

  def __init__(self, engine: EngineView, policy, requests: Sequence[ScheduledRequest],
               t_job: float, *, batch: RunningBatch | None = None):
    """batch: the running batch to use (a server's, sized for any request it admits: see
    `serving_batch`); by default one sized for `requests`."""
    self.engine, self.policy, self.t_job = engine, policy, t_job
    if batch is not None:
      self.batch = batch
      return
    layout = engine.layout
    rows = planner.bucket(min(engine.max_batch_size, len(requests)), minimum=1)
    max_pages = planner.bucket(max(layout.pages_for(r.prompt.token_ids.size
                                                    + max(r.sampling.max_new_tokens, 1))
                                   for r in requests), minimum=4)
    self.batch = RunningBatch(rows, max_pages, stop_width([self.stops(r) for r in requests]),
                              layout)

  @staticmethod
  def serving_batch(engine: EngineView, max_stops: int = 1) -> RunningBatch:
    """A running batch for requests not known in advance (a server): max_batch_size rows (a
    bucket) and a page table wide enough for the model's whole context, so its decode loop
    compiles once for the server's life."""
    layout = engine.layout
    rows = planner.bucket(engine.max_batch_size, minimum=1)
    max_pages = planner.bucket(layout.pages_for(engine.config.max_seq_len), minimum=4)
    return RunningBatch(rows, max_pages, stop_width([range(max(max_stops, 1))]), layout)

  def prepare(self, request: ScheduledRequest) -> None:
    """Before a request's cache lookups (the scheduler's hook): loads its segments from the
    engine's disk cache, if it has one and the policy reads the segment cache."""
    if self.engine.disk_link is not None and self.policy.reads_segment_cache:
      self.engine.disk_link.load_for([request.prompt])

  def stops(self, request: ScheduledRequest) -> frozenset[int]:
    return resolve_stop_ids(request.sampling, getattr(self.engine.tokenizer, "stop_ids", ()))

  def run(self, step: Step) -> StepResult:
    """Empties the dropped rows, prefills the admitted group (its sequences that are not done join
    the batch after every device step of the prefill: a failure leaves the batch as it was), then
    runs one decode loop."""
    engine, batch = self.engine, self.batch
    for row, seq in enumerate(batch.requests):
      if seq is not None and seq.key.index in step.drop:
        batch.leave(row)
    finished = []
    if step.prefill:
      try:
        seqs = self.start_split(step.prefill, step.leases)
        if engine.disk_link is not None:  # saved before a later prefill can evict what this one added
          engine.disk_link.autosave()
      except Exception as e:  # pylint: disable=broad-except
        return StepResult(prefill_error=e, pool_lost=engine.kv.recover())
      for seq in seqs:
        if seq.done:  # stopped at its first token: it never joins
          finished.append((seq.key.index, self.output(seq)))
        else:
          plan, sp = seq.payload[0], seq.key.sampling
          batch.join(seq, plan.n, plan.page_table, temperature=sp.temperature, top_p=sp.top_p,
                     seed=sp.seed)
      if self.on_prefilled is not None:
        self.on_prefilled(seqs)
    if step.decode_steps and batch.n_running:
      min_active = max(1, batch.n_running - step.stop_after + 1) if step.stop_after else 1
      try:
        decoding.visit(engine.kv, engine.params, engine.config, batch,
                       steps_per_visit=step.decode_steps, min_active=min_active,
                       backend=engine.attention_backend)
      except Exception as e:  # pylint: disable=broad-except
        return StepResult(tuple(finished), decode_error=e, pool_lost=engine.kv.recover())
      for seq in batch.finished():
        # The answer's K/V, while the request's lease still holds its pages (update releases it).
        try:
          engine.store.keep_output(seq.key.prompt, seq.payload[0], seq.tokens, self.policy)
        except Exception as e:  # pylint: disable=broad-except  # best effort: the output is whole
          warnings.warn(f"request {seq.key.request_id!r}: its answer's K/V was not cached: {e}",
                        stacklevel=2)
        finished.append((seq.key.index, self.output(seq)))
    return StepResult(tuple(finished))

  def start_split(self, requests: Sequence[ScheduledRequest], leases) -> list[DecodingRequest]:
    """`start` for a group, split in two prefills: the requests with segment hits, then those
    without (in that order: the cheap ones answer first). A prefill pads every row to the
    batch's largest active set, so one request without hits (every token active) would make
    every row of a reuse batch compute every token in the sparse layers, and each such mix is a
    program of its own; alone, requests without hits run the plain full prefill program (round
    16's load run: 25 programs, 60 s stalled compiling, where prefix-only compiled 7). With
    `prefill_alone`, each request is its own prefill (those with hits first): a server's
    programs then depend only on one request's buckets (24 programs and 79 s of stalls remained
    with the split alone at 16 requests/s)."""
    seqs: dict[int, DecodingRequest] = {}
    if self.prefill_alone:
      parts = [[i] for i, lease in sorted(enumerate(leases), key=lambda x: not x[1].hits)]
    else:
      parts = [[i for i, lease in enumerate(leases) if bool(lease.hits) == hits]
               for hits in (True, False)]
    for part in parts:
      if part:
        started, _ = self.start([requests[i] for i in part], [leases[i] for i in part])
        seqs.update(zip(part, started))
    return [seqs[i] for i in range(len(requests))]

  def start(self, requests: Sequence[ScheduledRequest], leases
            ) -> tuple[list[DecodingRequest], "PrefillBatch"]:
    """Prefill (with its commit) and first token of a group, as one prefill: its sequences (each
    payload holds its output's account) and the prefill batch."""
    start = time.perf_counter()
    plans, out, batch = prefill_and_commit(self.engine, [r.prompt for r in requests], leases,
                                          self.policy)
    first = np.asarray(sample_step(out.logits, *sampling_rows(requests, out.logits.shape[0]), 0))
    now = time.perf_counter()
    if self.on_first_logits is not None:
      logits = np.asarray(out.logits, np.float32)
      for i, r in enumerate(requests):
        self.on_first_logits(r, logits[i])
    scores, selected = np.asarray(out.scores), np.asarray(out.selected)
    seqs = []
    for i, (r, plan) in enumerate(zip(requests, plans)):
      account = planner.describe(plan, scores[i], selected[i], self.policy)
      seqs.append(DecodingRequest(r, [int(first[i])], self.stops(r), r.sampling.max_new_tokens,
                                  payload=(plan, account, now - start, now - self.t_job)))
    return seqs, batch

  def output(self, seq: DecodingRequest, result: tuple[list[int], str] | None = None
             ) -> RequestOutput:
    """A finished sequence's output; `result`: its (tokens, finish reason) if not seq.result()."""
    request, (plan, account, ttft, first_token_s) = seq.key, seq.payload
    tokens, reason = result or seq.result()
    stats = RequestStats(
        ttft_s=ttft, first_token_s=first_token_s, n_prompt=plan.n, n_exact=plan.n_exact,
        n_continued=plan.n_continued,
        n_reused=plan.n_reused, n_new=int(np.sum(plan.labels == NEW)),
        n_recomputed=account.selected_positions.size, n_generated=len(tokens),
        compilations=self.engine.num_compilations)
    tokenizer = self.engine.tokenizer
    text = tokenizer.decode(tokens) if tokenizer is not None else ""
    return RequestOutput(text=text, token_ids=tokens, stats=stats, finish_reason=reason,
                         request_id=request.request_id, prefill=account)


def _plan_group(engine: EngineView, prompts: Sequence["Prompt"], leases, policy):
  """The group's plans, its padded batch and the static spec of its prefill."""
  plans = [planner.plan_request(p, lease, policy, engine.layout)
           for p, lease in zip(prompts, leases)]
  batch, spec = planner.plan_batch(plans, policy, engine.config, engine.layout,
                                   engine.attention_backend)
  return plans, batch, spec


def _in_halves(engine: EngineView, loads, spec) -> bool:
  """Host-tier loads run between the full layers and the rest (see prefill_and_commit)."""
  return bool(loads) and 0 < spec.layer_threshold < engine.config.n_layers


def _host_copies(engine: EngineView, leases, spec) -> tuple[list, list]:
  """The host-tier copies a group's prefill issues: (written before its first program, written
  between its halves; empty: it runs whole).

  Segments' copies (layers [T, L)) go between the halves. A continued history's blocks are read
  by every layer: where the prefill runs in halves and its run is kept cut at T, layers [0, T)
  go before the first program and [T, L) between the halves; otherwise all of it goes first."""
  segments = [load for lease in leases for load in lease.loads if not load.written]
  runs = [load for lease in leases for load in lease.run_loads if not load.written]
  t = spec.layer_threshold
  cut = [load for load in runs if load.first_layer == 0 and load.end_layer is None
         and load.source.k.cut_at(t)]
  if not _in_halves(engine, segments + cut, spec):
    return runs + segments, []
  first = [load for load in runs if load not in cut]
  later = list(segments)
  for load in cut:
    first.append(RunLoad(load.pages, load.source, 0, t))
    later.append(RunLoad(load.pages, load.source, t))
  return first, later


def prefill_compile(engine: EngineView, prompts: Sequence["Prompt"], leases, policy
                    ) -> tuple[tuple, Callable[[], list[tuple]]]:
  """What compiling ahead needs of the prefill `prefill_and_commit` would run for this group:
  (key, compile). key: its program's (the first half's, where host-tier loads split it) as
  `engine.kv.log` keys it once run. compile(), for another thread: compiles it from shapes (both
  halves: the second's input is the first's output, whose shapes the first's compilation gives)
  and returns the keys of the programs compiled. jit keeps them: the prefill then compiles
  nothing."""
  _, batch, spec = _plan_group(engine, prompts, leases, policy)
  kv, params, static = engine.kv, engine.params, {"cfg": engine.config, "spec": spec}
  if not _host_copies(engine, leases, spec)[1]:
    return _compile_one(kv, prefill, params, batch, **static)
  first, first_key = kv.compile_later(prefill_full_layers, params, batch, **static), (
      kv.program_key(prefill_full_layers, params, batch, **static))

  def halves() -> list[tuple]:
    _, full = first().out_info  # the first half's output, as shapes
    kv.compile_later(prefill_rest, params, batch, full, **static)()
    return [first_key, kv.program_key(prefill_rest, params, batch, full, **static)]

  return first_key, halves


def copy_compile(engine: EngineView, width: int) -> tuple[tuple, Callable[[], list[tuple]]]:
  """As prefill_compile, for the slot-copy program a commit runs when its copies pad to `width`
  (planner.copy_widths): (key, compile)."""
  # Padding only (slot 0 to the sentinel, dropped): the shapes and dtypes pad_copies gives.
  src = np.zeros((1, width), np.int32)
  dst = np.full((1, width), engine.layout.sentinel, np.int32)
  return _compile_one(engine.kv, copy_slots, src, dst)


def host_tier_compiles(engine: EngineView, policy) -> list[Callable[[], tuple]]:
  """As copy_compile, for the host tier's programs: an eviction's read into the tier and a load's
  write back into pool pages, one program per padded size (a segment's stored_pages up to the
  model's context, a run's piece run_pages up to RUN_BLOCKS) and, for the writes, per layer range
  a load under `policy` copies (_host_copies: a segment's [T, L); a continued run's [0, T),
  [T, L) or all of it). Each item is a thunk giving (key, compile); smallest sizes first.
  [] without a host tier. Under a mesh the staged arrays are shapes in the pool's layout, as
  KVPool.stage_page_layers puts them."""
  tier, kv = engine.host_tier, engine.kv
  if tier is None:
    return []
  pool = kv.arrays["k"]  # [L, K, pages, S, H]
  n_layers, kv_heads, _, page_size, head_dim = pool.shape
  t = int(policy.layer_threshold)
  values_dtype = stored_dtype(tier.host_dtype, pool.dtype)
  cuts = layer_cuts(n_layers, tier.split_layer)
  max_pages = -(-engine.config.max_seq_len // engine.layout.page_size)

  def stored(n: int) -> StoredKV:
    """One K or V of n stored pages, as shapes in the arrays the tier cuts (what a load stages)."""
    def shapes(last: int, dtype):
      return tuple(jax.ShapeDtypeStruct((hi - lo, kv_heads, n, page_size, last), dtype,
                                        sharding=pool.sharding)
                   for lo, hi in zip(cuts, cuts[1:]))
    scale = None if tier.host_dtype == "native" else shapes(1, np.float32)
    return StoredKV(shapes(head_dim, values_dtype), scale)

  def read(n: int, padded):
    def key_and_compile():
      pages = np.zeros(n, np.int32)
      if tier.reads_into_memory():
        program, args, static = kv.read_pages_into_call(pages, padded(n), tier.split_layer)
      else:
        program, args, static = kv.read_pages_call(pages)
      return _compile_one(kv, program, *args, **static)
    return key_and_compile

  def write(n: int, first: int, end: int | None):
    def key_and_compile():
      part = stored(n).covering(first, end)
      staged = (part.values, part.values, part.scale, part.scale)
      program, args, static = kv.write_page_layers_call(np.zeros(n, np.int32), staged, first,
                                                        part.start_layer, end)
      return _compile_one(kv, program, *args, **static)
    return key_and_compile

  segment_ranges = [(t, None)] if 0 < t < n_layers else [(0, None)]
  run_ranges = [(0, t), (t, None), (0, None)] if 0 < t < n_layers else [(0, None)]
  todo = []  # (stored pages, thunk)
  for n in sorted({stored_pages(m) for m in range(1, max_pages + 1)}):
    todo += [(n, read(n, stored_pages))]
    todo += [(n, write(n, first, end)) for first, end in segment_ranges]
  for n in sorted({run_pages(m) for m in range(1, RUN_BLOCKS + 1)}):
    todo += [(n, read(n, run_pages))]
    todo += [(n, write(n, first, end)) for first, end in run_ranges]
  return [thunk for _, thunk in sorted(todo, key=lambda item: item[0])]


def _compile_one(kv, program, *args, **static) -> tuple[tuple, Callable[[], list[tuple]]]:
  """(key, compile) of one program: compile() compiles it and returns [key]."""
  key, compile_later = kv.program_key(program, *args, **static), kv.compile_later(
      program, *args, **static)

  def compile_now() -> list[tuple]:
    compile_later()
    return [key]

  return key, compile_now


def _staged(loads) -> list:
  return [load.staged[0] for load in loads if load.staged is not None]


def inputs_ahead_of_loads(batch: "PrefillBatch") -> "PrefillBatch":
  """The batch's arrays sent to the device before the loads' copies are issued.

  Host-to-device copies run in the order they are issued (one copy stream per device): a batch
  passed to the first half as numpy arrays would be copied behind every load's segments, and the
  full layers, which need nothing else from the host, would wait for all of them instead of
  running beside them. Uncommitted (no target device), as numpy arguments are, so jit compiles
  nothing new (it keys programs on whether each argument is committed).
  """
  return jax.device_put(batch)


def prefill_and_commit(engine: EngineView, prompts: Sequence["Prompt"], leases, policy
                       ) -> tuple[list["RequestPlan"], "PrefillOutput", "PrefillBatch"]:
  """Plans a group, runs the prefill program and commits the caches (the pool donated to both
  programs through engine.kv). Nothing here waits for the device.

  Copies from the host tier that the leases planned (layers [T, L) of their segments) start
  right after the batch's own inputs (inputs_ahead_of_loads), so that they run while the full
  layers [0, T) do: the prefill is then dispatched in two halves with the copies' pool writes
  between them, since the full layers read nothing cached above T (programs/prefill.py).
  Continued history from the host tier is read by every layer: where the prefill runs in halves,
  its layers [0, T) are copied and written before the first program (that copy is exposed) and
  its layers [T, L) beside the segments'; otherwise all of it before (_host_copies)."""
  tier = engine.store.host_tier
  plans, batch, spec = _plan_group(engine, prompts, leases, policy)
  first, loads = _host_copies(engine, leases, spec)
  if first or loads:
    batch = inputs_ahead_of_loads(batch)
    issued = time.perf_counter()
    start_loads(tier, first, engine.kv)
    start_loads(tier, loads, engine.kv)
    if not loads:  # the prefill runs whole: every copy is exposed
      tier.clock.time(_staged([load for load in first if not isinstance(load, RunLoad)]), None,
                      issued)
    finish_loads(tier, first, engine.kv)
  if _in_halves(engine, loads, spec):
    full = engine.kv.run(prefill_full_layers, engine.params, batch, cfg=engine.config, spec=spec)
    tier.clock.time(_staged(loads), full, issued)
    finish_loads(tier, loads, engine.kv)
    out = engine.kv.run(prefill_rest, engine.params, batch, full, cfg=engine.config, spec=spec)
  else:
    out = engine.kv.run(prefill, engine.params, batch, cfg=engine.config, spec=spec)
  with engine.store.commit(prompts, plans, policy) as copies:
    if copies:
      src, dst = planner.pad_copies(copies.src_slots, copies.dst_slots, engine.layout)
      engine.kv.run(copy_slots, src, dst)
  return plans, out, batch


def prefill_alone(engine: EngineView, prompts: Sequence["Prompt"], full, batch_size: int) -> None:
  """Prefills each prompt alone from position 0 (`full`: the "full" policy), in batches of up to
  batch_size (halved until the pool holds one), and hands it to the segment cache
  (Engine.cache_segments)."""
  i = 0
  while i < len(prompts):
    head = prompts[i:i + batch_size]
    size, leases, error = scheduler.lease_largest(engine.store, head, full, [0] * len(head))
    if leases is None:
      raise error
    chunk = prompts[i:i + size]
    with leases, engine.kv.recovering():
      prefill_and_commit(engine, chunk, leases, full)
      for prompt, lease in zip(chunk, leases):
        engine.store.keep_alone(prompt, lease)
    i += size
    if engine.disk_link is not None:
      engine.disk_link.autosave()
