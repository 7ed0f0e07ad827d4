"""Comparison-only paths, built from the library's pieces: what the benchmarks measure the engine
against, and the references its tests check it against. None of them is an Engine option.

- `generate_static`: static batching. Batches of max_batch_size (halved until the pool holds
  one), each prefilled and decoded to its last token before the next starts; a batch that fails
  is retried one request at a time. Engine.generate (continuous batching) is measured against it
  (scripts/bench_throughput.py).
- `decode`: a prefilled static batch decoded to the end by device loops, with a choice of layer
  loop ("scan", the engine's; "unrolled"; "per_layer", with `per_layer_params`).
- `decode_per_step`: one device step per token from the host, stops checked on the host: the loop
  the engine ran before the device loop, the reference that loop is tested against.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from sparsex_jax import scheduler
from sparsex_jax.api import Request, RequestOutput
from sparsex_jax.batching import DecodingRequest, RunningBatch, stop_width
from sparsex_jax.decoding import STEPS_PER_VISIT
from sparsex_jax.kv.layout import PoolLayout
from sparsex_jax.programs import KVPool
from sparsex_jax.programs.decode import LAYER_LOOPS, decode_loop, decode_step
from sparsex_jax.reuse import ReuseConfig, ReuseMethod
from sparsex_jax.step_runner import StepRunner, sampling_rows
from sparsex_jax.sampling import SamplingParams, finish, is_finished
from sparsex_jax.scheduler import ScheduledRequest


# ------------------------------------------------------------------------------------------------
# static batching
# ------------------------------------------------------------------------------------------------

def generate_static(engine, requests: Sequence[Request],
                    sampling: SamplingParams = SamplingParams(),
                    reuse: ReuseMethod = ReuseConfig(), *, on_error: str = "raise",
                    on_output: Callable[[int, RequestOutput], object] | None = None
                    ) -> list[RequestOutput]:
  """As engine.generate (same validation, outputs, on_error and on_output), by static batching."""
  t_job = time.perf_counter()
  policy = reuse.resolve(engine.config)
  todo, outputs = engine.schedulable(requests, sampling, on_error, on_output)
  if todo:  # the runner's prefill, first token and outputs; its running batch is not used
    _run(engine, StepRunner(engine, policy, todo, t_job), todo, engine.max_batch_size, outputs)
  return list(outputs)


def _run(engine, runner: StepRunner, todo: list[ScheduledRequest], max_batch_size: int,
         outputs: scheduler.Outputs) -> None:
  for chunk, leases in _batches(engine, runner, todo, max_batch_size, outputs):
    try:
      with leases:
        done = _prefill_and_decode(engine, runner, chunk, leases)
        if engine.disk_link is not None:  # per batch: a later batch may evict what this one added
          engine.disk_link.autosave()
    except Exception as e:  # pylint: disable=broad-except
      engine.kv.recover()
      if len(chunk) == 1:
        outputs.fail(chunk[0].index, chunk[0].request_id, e)
      else:
        for request in chunk:
          _run(engine, runner, [request], 1, outputs)
      continue
    for request, out in zip(chunk, done):
      outputs[request.index] = out


def _batches(engine, runner: StepRunner, todo: list[ScheduledRequest], max_batch_size: int,
             outputs: scheduler.Outputs):
  """Batches that fit the pool, with their leases; a request that fits nowhere fails alone."""
  i = 0
  while i < len(todo):
    head = todo[i:i + max_batch_size]
    size, leases, error = scheduler.lease_largest(
        engine.store, [r.prompt for r in head], runner.policy,
        [r.sampling.max_new_tokens for r in head], lambda n: _load_segments(runner, head[:n]))
    if leases is None:
      outputs.fail(head[0].index, head[0].request_id, error)
    else:
      yield head[:size], leases
    i += size


def _load_segments(runner: StepRunner, requests: list[ScheduledRequest]) -> None:
  engine = runner.engine
  if engine.disk_link is not None and runner.policy.reads_segment_cache:
    engine.disk_link.load_for([r.prompt for r in requests])


def _prefill_and_decode(engine, runner: StepRunner, chunk: list[ScheduledRequest], leases
                        ) -> list[RequestOutput]:
  """One batch prefilled, then decoded until every row stops."""
  seqs, batch = runner.start(chunk, leases)
  b = batch.page_table.shape[0]
  first = np.zeros(b, np.int32)
  first[:len(seqs)] = [seq.tokens[0] for seq in seqs]
  temperature, top_p, seeds = sampling_rows(chunk, b)
  generated = decode(
      engine.kv, engine.params, engine.config, engine.layout, first,
      [seq.payload[0].n for seq in seqs], batch.page_table,
      max_new_tokens=[r.sampling.max_new_tokens for r in chunk], stops=[s.stops for s in seqs],
      temperature=temperature, top_p=top_p, seeds=seeds, backend=engine.attention_backend,
      steps_per_visit=engine.steps_per_visit)
  return [runner.output(seq, result) for seq, result in zip(seqs, generated)]


# ------------------------------------------------------------------------------------------------
# decoding a static batch: device loops with a choice of layer loop, and the per-token host loop
# ------------------------------------------------------------------------------------------------

def per_layer_params(params):
  """The params with the stacked layers as a list of per-layer pytrees, for layer_loop
  "per_layer" (a second copy of the layer weights): nothing for a scan to slice out of a stack
  (scripts/bench_throughput.py counts such copies in the compiled HLO)."""
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  return dict(params, layers=[jax.tree.map(lambda w, i=i: jnp.array(w[i]), params["layers"])
                              for i in range(n)])


def visit(pool: KVPool, params, cfg: ModelConfig, batch: RunningBatch, *,
          steps_per_visit: int = STEPS_PER_VISIT, backend: str = "auto",
          layer_loop: str = "scan") -> int:
  """decoding.visit with a choice of layer loop ("per_layer": params from per_layer_params, the
  program's loop is then a plain one over the list)."""
  if layer_loop not in LAYER_LOOPS:
    raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
  rows, tokens = pool.run(decode_loop, params, batch.device_rows(), np.int32(1), cfg=cfg,
                          steps=int(steps_per_visit), backend=backend, layer_loop=layer_loop)
  return batch.advance(*jax.device_get((rows, tokens)))


def decode(pool: KVPool, params, cfg: ModelConfig, layout: PoolLayout, first: np.ndarray,
           prompt_lens: list[int], page_table: np.ndarray, *, max_new_tokens: list[int],
           stops: list[frozenset[int]], temperature: np.ndarray, top_p: np.ndarray,
           seeds: np.ndarray, backend: str = "auto", steps_per_visit: int = STEPS_PER_VISIT,
           layer_loop: str = "scan") -> list[tuple[list[int], str]]:
  """Continues every real row (len(prompt_lens) of the padded batch) from its first sampled token
  with device loops, until every row stops (static batching: nobody joins).

  first, temperature, top_p, seeds: [B] over the padded batch; max_new_tokens and stops: per real
  row; page_table [B, MP] covers each row's prompt and max_new_tokens. Returns (tokens, finish
  reason) per real row.
  """
  n_real, b = len(prompt_lens), first.shape[0]
  batch = RunningBatch(b, page_table.shape[1], stop_width(stops), layout)
  seqs = [DecodingRequest(i, [int(first[i])], stops[i], max_new_tokens[i])
          for i in range(n_real)]
  for i, seq in enumerate(seqs):
    if not seq.done:
      batch.join(seq, prompt_lens[i], page_table[i], temperature=float(temperature[i]),
                 top_p=float(top_p[i]), seed=int(seeds[i]))
  while batch.n_running:
    visit(pool, params, cfg, batch, steps_per_visit=steps_per_visit, backend=backend,
          layer_loop=layer_loop)
    batch.finished()
  return [seq.result() for seq in seqs]


def decode_per_step(pool: KVPool, params, cfg: ModelConfig, layout: PoolLayout,
                    first: np.ndarray, prompt_lens: list[int], page_table: np.ndarray, *,
                    max_new_tokens: list[int], stops: list[frozenset[int]],
                    temperature: np.ndarray, top_p: np.ndarray, seeds: np.ndarray,
                    backend: str = "auto") -> list[tuple[list[int], str]]:
  """As `decode`, one device step per token from the host (the reference)."""
  n_real, b = len(prompt_lens), first.shape[0]
  outs = [[int(first[i])] for i in range(n_real)]
  done = np.ones(b, bool)
  done[:n_real] = [is_finished(o, stops[i], max_new_tokens[i]) for i, o in enumerate(outs)]
  pos = np.zeros(b, np.int32)
  pos[:n_real] = prompt_lens
  tokens = np.zeros(b, np.int32)
  tokens[:n_real] = first[:n_real]
  last_slot = page_table.shape[1] * layout.page_size - 1  # keeps padding rows' lookups in range
  for step in range(1, max(max_new_tokens)):
    if done.all():
      break
    slots = layout.slot_of(page_table, np.minimum(pos, last_slot)[:, None])[:, 0]
    slots = np.where(done, layout.sentinel, slots).astype(np.int32)
    q_pos = np.where(done, -1, pos).astype(np.int32)
    nxt = np.asarray(pool.run(decode_step, params, tokens, q_pos, slots, page_table, pos + 1,
                              temperature, top_p, seeds, np.int32(step), cfg=cfg,
                              backend=backend))
    for i in range(n_real):
      if not done[i]:
        outs[i].append(int(nxt[i]))
        done[i] = is_finished(outs[i], stops[i], max_new_tokens[i])
    tokens = nxt.astype(np.int32)
    pos = pos + 1
  return [finish(o, stops[i]) for i, o in enumerate(outs)]
