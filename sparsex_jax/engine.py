"""The batched offline engine: the orchestrator only.

    request -> tokenize -> acquire (KV store) -> plan (planner) -> prefill (device) -> commit
            -> sample -> decode (device loops) -> release

Batching (scheduler.py): "continuous" (default) keeps a running batch whose finished rows are
refilled between device decode loops; "static" runs batch after batch to the end.

Host bookkeeping lives in sparsex_jax/kv (allocator, caches, store), planning in planner.py, reuse
methods in reuse/, device programs in sparsex_jax/programs; this file only wires them.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Callable, Iterable, Sequence

import jax
import numpy as np

from models import llama
from models.config import ModelConfig, get_config
from sparsex_jax.programs.kernels import resolve_backend
from sparsex_jax import decoding, planner, scheduler, sharding
from sparsex_jax.api import Request, RequestOutput, RequestStats, Segment
from sparsex_jax.batching import DecodingRequest, RunningBatch, stop_width
from sparsex_jax.kv import KVStore, Leases, PoolLayout, persist
from sparsex_jax.kv.segment_cache import segment_key
from sparsex_jax.planner import NEW, RequestPlan
from sparsex_jax.prompt import Prompt, check_prompt, segment_ids, tokenize
from sparsex_jax.validation import is_int
from sparsex_jax.reuse import ReuseConfig, ReuseMethod, ReusePolicy
from sparsex_jax.programs import KVPool
from sparsex_jax.programs.copy import copy_slots
from sparsex_jax.programs.decode import LAYER_LOOPS
from sparsex_jax.programs.prefill import PrefillBatch, PrefillOutput, prefill
from sparsex_jax.sampling import SamplingParams, resolve_stop_ids, sample_step

BATCHING = ("continuous", "static")


class Engine:
  """SparseX serving engine over a paged KV pool.

  engine = Engine.from_pretrained("smollm2-135m")
  outs = engine.generate([Request([...])], SamplingParams(...), reuse=ReuseConfig("sparsex"))
  """

  def __init__(self, config: ModelConfig, params, tokenizer=None, *, page_size: int = 16,
               num_pages: int | None = None, kv_pool_bytes: int | None = None,
               max_batch_size: int = 16, attention_backend: str = "auto",
               steps_per_visit: int = decoding.STEPS_PER_VISIT, decode_layer_loop: str = "scan",
               mesh=None, namespace: str = ""):
    """max_batch_size: requests per batch (static) or rows of the running batch (continuous).
    steps_per_visit: decode steps per device loop (per host visit). decode_layer_loop: "scan",
    "unrolled" or "per_layer" (the decode program's layer loop; programs/decode.py).
    mesh: None (one device) or a ("data", "tensor") jax Mesh (sharding.make_mesh(tp)): weights
    Megatron-style and the KV pool by KV heads over "tensor" (docs/SHARDING.md). num_pages and
    kv_pool_bytes are the whole pool's, summed over the tensor axis.
    namespace: the segment-cache namespace of requests that name none (Request.namespace);
    segments cached under one namespace are never reused or seen under another."""
    if not isinstance(namespace, str):
      raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    self.namespace = namespace
    backend = resolve_backend(attention_backend)  # validates the name
    sharding.check_model(config, mesh)
    if not is_int(max_batch_size) or max_batch_size < 1:
      raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if not is_int(steps_per_visit) or steps_per_visit < 1:
      raise ValueError(f"steps_per_visit must be an int >= 1, got {steps_per_visit!r}")
    if decode_layer_loop not in LAYER_LOOPS:
      raise ValueError(f"decode_layer_loop must be one of {LAYER_LOOPS}, got "
                       f"{decode_layer_loop!r}")
    self.steps_per_visit, self.decode_layer_loop = int(steps_per_visit), decode_layer_loop
    if mesh is not None:
      params = sharding.shard_params(params, mesh)
    # The decode programs' weights. "per_layer" keeps a second copy of the layers as separate
    # arrays (twice the layer weights' memory): a scan's dynamic slice of the stack may be copied
    # out before each matmul (scripts/bench_throughput.py counts such copies in the HLO).
    self.decode_params = params
    if decode_layer_loop == "per_layer":
      n = jax.tree.leaves(params["layers"])[0].shape[0]
      self.decode_params = dict(params, layers=[
          jax.tree.map(lambda w, i=i: w[i], params["layers"]) for i in range(n)])
    self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
    self.layout = PoolLayout.for_model(config, page_size=page_size, num_pages=num_pages,
                                       kv_pool_bytes=kv_pool_bytes)
    self.store = KVStore(self.layout)
    self.kv = KVPool(config, self.layout, on_lost=self.store.invalidate, mesh=mesh)
    self.max_batch_size = int(max_batch_size)
    self.attention_backend = attention_backend
    self._disk: persist.DiskLink | None = None  # use_cache_dir()
    if backend == "reference" and config.dtype in ("bfloat16", "float16") and _cpu_only():
      warnings.warn(f"a {config.dtype} engine on CPU runs about 100x slower than float32 (XLA's "
                    f"CPU backend emulates it); pass dtype='float32' on CPU", stacklevel=2)

  @classmethod
  def from_pretrained(cls, name_or_path: str = "smollm2-135m", dtype: str = "float32", **kw):
    """A real model: "smollm2-135m" (embedded GGUF), a .gguf path or a Hugging Face folder."""
    from models.loaders import load_model
    loaded = load_model(name_or_path, dtype=dtype)
    return cls(loaded.config, loaded.params, loaded.tokenizer, **kw)

  @classmethod
  def random(cls, preset: str | ModelConfig, dtype: str = "bfloat16", seed: int = 0, **kw):
    """Random weights at a preset's real shapes (speed benchmarks; no tokenizer: pass ids).
    preset: a name (with dtype) or a ModelConfig (taken as it is). With mesh=, the weights are
    created in their shards."""
    cfg = preset if isinstance(preset, ModelConfig) else get_config(preset, dtype=dtype)
    mesh = kw.get("mesh")
    if mesh is not None:
      sharding.check_model(cfg, mesh)
      return cls(cfg, sharding.init_params_sharded(cfg, mesh, seed), None, **kw)
    return cls(cfg, llama.init_params(cfg, seed), None, **kw)

  @property
  def pool(self) -> dict:
    """The device KV pool {"k", "v"}: [L, K, P, S, H] each (docs/CONTRACTS.md)."""
    return self.kv.arrays

  @property
  def num_compilations(self) -> int:
    """Distinct device programs this engine has run (each compiles once per process)."""
    return len(self.kv.log)

  # ------------------------------------------------------------------------------------------
  # public API
  # ------------------------------------------------------------------------------------------

  def generate(self, requests: Sequence[Request], sampling: SamplingParams = SamplingParams(),
               reuse: ReuseMethod = ReuseConfig(), *, on_error: str = "raise",
               batching: str = "continuous",
               on_output: Callable[[int, RequestOutput], object] | None = None
               ) -> list[RequestOutput]:
    """Prefills and decodes `requests`; outputs in request order.

    batching="continuous" (default): a running batch of max_batch_size rows; a request joins as
    soon as a row and the pages for its prompt and max_new_tokens are free, and leaves when it
    stops. "static": batches of max_batch_size, each run to its last token before the next.

    The whole job is validated before any device work. A request that cannot run (bad input, too
    big for the pool, a failure while its batch runs) is isolated: with on_error="raise" a
    RequestError names it and carries the outputs finished so far (`.outputs`); with "return"
    its output has finish_reason "error" and `.error`, and every other request still runs.

    on_output(index, output): called as each request finishes (index into `requests`), in the
    order they finish, before generate returns: a job can write results as they come. What it
    raises ends the job (everything held is released) and propagates.
    """
    if batching not in BATCHING:
      raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
    t_job = time.perf_counter()
    policy = reuse.resolve(self.config)
    requests = list(requests)
    outputs = scheduler.Outputs(len(requests), on_error, on_output)
    jobs = []
    for i, request in enumerate(requests):
      try:
        sp = getattr(request, "sampling", None) or sampling
        prompt = tokenize(request, self.tokenizer, self.config, sp.max_new_tokens, self.namespace)
        jobs.append(scheduler.Job(i, request.id, prompt, sp))
      except (ValueError, TypeError) as e:
        outputs.fail(i, getattr(request, "id", None), e)
    prepare = None
    if self._disk is not None and policy.reads_segment_cache:
      prepare = lambda chunk: self._disk.load_for([j.prompt for j in chunk])  # noqa: E731

    if batching == "continuous":
      self._run_continuous(jobs, policy, outputs, prepare, t_job)
      return list(outputs)

    def run_batch(chunk, leases):
      done = self._generate_batch(chunk, leases, policy, t_job)
      if self._disk is not None:  # per batch: a later batch may evict what this one added
        self._disk.autosave()
      return done

    scheduler.run(self.store, jobs, policy, self.max_batch_size, outputs, run_batch,
                  self.kv.recover, prepare)
    return list(outputs)

  def chat_request(self, messages, *, id=None, sampling: SamplingParams | None = None,  # noqa: A002
                   add_generation_prompt: bool = True) -> Request:
    """A Request from chat messages, one segment per message, rendered with this model's chat
    template (sparsex_jax/chat.py): a message that recurs is reused from the segment cache."""
    from sparsex_jax.chat import chat_request
    return chat_request(self.tokenizer, messages, id=id, sampling=sampling,
                        add_generation_prompt=add_generation_prompt)

  def tokenize(self, request: Request, max_new_tokens: int = 0) -> Prompt:
    """`request` tokenized as generate() will see it (checked against the vocabulary and the
    context with room for max_new_tokens)."""
    return tokenize(request, self.tokenizer, self.config, max_new_tokens, self.namespace)

  # ------------------------------------------------------------------------------------------
  # the segment cache on disk (sparsex_jax/kv/persist.py)
  # ------------------------------------------------------------------------------------------

  def use_cache_dir(self, path, save: bool = True, *, key: str | bytes | None = None,
                    strict: bool = False) -> persist.SegmentDiskCache:
    """Ties this engine to a segment cache on disk: generate() loads the segments each batch needs
    from it (on demand, so the cache may be larger than the pool) and, with save=True, writes the
    segments it has and adds (now, then after every batch). Raises persist.CacheError (naming the
    file) for a cache of another model, dtype or page size, or an index that fails its HMAC.
    key: the index's HMAC key (default $SPARSEX_CACHE_KEY). A bad segment file is dropped with a
    warning and its segment computed afresh; strict=True makes it a CacheError."""
    fp = persist.fingerprint(self.config, self.params, self.layout.page_size)
    cache = persist.SegmentDiskCache(path, fp, key=key, strict=strict)
    self._disk = persist.DiskLink(cache, self.store, self.kv, save)
    self._disk.autosave()  # what this engine cached before it had a cache dir
    return self._disk.cache

  @property
  def disk_cache(self) -> persist.SegmentDiskCache | None:
    return self._disk.cache if self._disk is not None else None

  def save_cache(self) -> int:
    """Writes the in-memory segments missing from the cache dir; returns how many."""
    if self._disk is None:
      raise ValueError("no cache dir: call use_cache_dir(path) first")
    return self._disk.save()

  def prefill_logits(self, request: Request, reuse: ReuseMethod = ReuseConfig(),
                     return_plan: bool = False):
    """The first output token's float32 logits [V] (and the PrefillPlan with return_plan)."""
    policy = reuse.resolve(self.config)
    prompt = tokenize(request, self.tokenizer, self.config, 0, self.namespace)
    if self._disk is not None and policy.reads_segment_cache:
      self._disk.load_for([prompt])
    with self.store.acquire([prompt], policy, 0) as leases, self._recovering():
      plans, out, _ = self._prefill([prompt], leases, policy)
      logits = np.asarray(out.logits[0], np.float32)
    if self._disk is not None:
      self._disk.autosave()
    if not return_plan:
      return logits
    return logits, planner.describe(plans[0], out.scores[0], out.selected[0], policy)

  def cache_segments(self, segments: Iterable[str | Sequence[int] | Segment],
                     batch_size: int = 8, namespace: str | None = None) -> int:
    """Precomputes segments alone at position 0 (e.g. a RAG corpus); returns how many were new.
    namespace: where they are cached (default: the engine's)."""
    namespace = self.namespace if namespace is None else namespace
    if isinstance(segments, (str, Segment)):
      segments = [segments]
    if not is_int(batch_size) or batch_size < 1:
      raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    todo, seen = [], set()
    for s in segments:
      seg = s if isinstance(s, Segment) else Segment(s)
      ids = check_prompt(self.config, segment_ids(seg, self.tokenizer))
      key = ids.tobytes()
      if key in seen or self.store.contains_segment(ids, namespace):
        continue
      if self.disk_cache is not None and segment_key(ids, namespace) in self.disk_cache:
        continue  # on disk: loaded when a request needs it
      seen.add(key)
      todo.append(Prompt((ids,), (True,), namespace))
    full = ReuseConfig("full").resolve(self.config)
    i = 0
    while i < len(todo):  # like generate: a batch the pool cannot hold is halved
      head = todo[i:i + batch_size]
      size, leases, error = scheduler.lease_largest(self.store, head, full, [0] * len(head))
      if leases is None:
        raise error
      chunk = todo[i:i + size]
      with leases, self._recovering():
        self._prefill(chunk, leases, full)
        for prompt, lease in zip(chunk, leases):
          self.store.keep_alone(prompt, lease)
      i += size
      if self._disk is not None:
        self._disk.autosave()
    return len(todo)

  def clear_caches(self) -> int:
    """Drops every cached prefix block and segment no live request holds; returns pages freed."""
    return self.store.clear()

  def stats(self, namespace: str | None = None) -> dict:
    """The engine's counters over every namespace (the operator's view); with a namespace, only
    that namespace's segment-cache entries (what a caller of that namespace may be shown)."""
    if namespace is not None:
      return {"segment_cache": self.store.segment_cache.stats(self.layout.bytes_per_page,
                                                              namespace)}
    return self.store.stats() | {"compilations": self.num_compilations}

  @contextlib.contextmanager
  def _recovering(self):
    """On any failure, leaves a valid pool behind (and caches that match it)."""
    try:
      yield
    except BaseException:
      self.kv.recover()
      raise

  # ------------------------------------------------------------------------------------------
  # the steps
  # ------------------------------------------------------------------------------------------

  def _prefill(self, prompts: list[Prompt], leases: Leases, policy: ReusePolicy
               ) -> tuple[list[RequestPlan], PrefillOutput, PrefillBatch]:
    """Plans, runs the prefill program and commits the caches."""
    plans = [planner.plan_request(p, lease, policy, self.layout)
             for p, lease in zip(prompts, leases)]
    batch, spec = planner.plan_batch(plans, policy, self.config, self.layout,
                                     self.attention_backend)
    out = self.kv.run(prefill, self.params, batch, cfg=self.config, spec=spec)
    with self.store.commit(prompts, plans, policy) as copies:
      if copies:
        src, dst = planner.pad_copies(copies.src_slots, copies.dst_slots, self.layout)
        self.kv.run(copy_slots, src, dst)
    return plans, out, batch

  def _sampling_rows(self, jobs: list[scheduler.Job], b: int):
    """temperature, top_p, seeds [b] of a padded batch. A request's seed is its own: never its
    row or batch."""
    temperature, top_p, seeds = (np.zeros(b, np.float32), np.ones(b, np.float32),
                                 np.zeros(b, np.uint32))
    for i, job in enumerate(jobs):
      temperature[i], top_p[i], seeds[i] = (job.sampling.temperature, job.sampling.top_p,
                                            job.sampling.seed)
    return temperature, top_p, seeds

  def _stops(self, job: scheduler.Job) -> frozenset[int]:
    return resolve_stop_ids(job.sampling, getattr(self.tokenizer, "stop_ids", ()))

  def _start(self, jobs: list[scheduler.Job], leases, policy: ReusePolicy, t_job: float
             ) -> tuple[list[DecodingRequest], np.ndarray, tuple[np.ndarray, ...],
                        list[RequestPlan], PrefillBatch]:
    """Prefill and first token of a batch: (sequences, first tokens, sampling rows, plans,
    prefill batch). Each sequence's payload holds its output's account."""
    start = time.perf_counter()
    plans, out, batch = self._prefill([j.prompt for j in jobs], leases, policy)
    rows = self._sampling_rows(jobs, out.logits.shape[0])
    first = np.asarray(sample_step(out.logits, *rows, 0))
    now = time.perf_counter()
    scores, selected = np.asarray(out.scores), np.asarray(out.selected)
    seqs = []
    for i, (job, plan) in enumerate(zip(jobs, plans)):
      account = planner.describe(plan, scores[i], selected[i], policy)
      seqs.append(DecodingRequest(job, [int(first[i])], self._stops(job),
                                  job.sampling.max_new_tokens,
                                  payload=(plan, account, now - start, now - t_job)))
    return seqs, first, rows, plans, batch

  def _output(self, seq: DecodingRequest, result: tuple[list[int], str] | None = None
              ) -> RequestOutput:
    """A finished sequence's output; `result`: its (tokens, finish reason) if not seq.result()."""
    job, (plan, account, ttft, first_token_s) = seq.key, seq.payload
    tokens, reason = result or seq.result()
    stats = RequestStats(
        ttft_s=ttft, first_token_s=first_token_s, n_prompt=plan.n, n_exact=plan.n_exact,
        n_reused=plan.n_reused, n_new=int(np.sum(plan.labels == NEW)),
        n_recomputed=account.selected_positions.size, n_generated=len(tokens),
        compilations=self.num_compilations)
    text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
    return RequestOutput(text=text, token_ids=tokens, stats=stats, finish_reason=reason,
                         request_id=job.request_id, prefill=account)

  def _generate_batch(self, jobs: list[scheduler.Job], leases: Leases, policy: ReusePolicy,
                      t_job: float) -> list[RequestOutput]:
    """Static batching: one batch prefilled, then decoded until every row stops."""
    seqs, first, (temperature, top_p, seeds), plans, batch = self._start(jobs, leases, policy,
                                                                         t_job)
    generated = decoding.decode(
        self.kv, self.decode_params, self.config, self.layout, first, [p.n for p in plans],
        batch.page_table, max_new_tokens=[j.sampling.max_new_tokens for j in jobs],
        stops=[seq.stops for seq in seqs], temperature=temperature, top_p=top_p, seeds=seeds,
        backend=self.attention_backend, steps_per_visit=self.steps_per_visit,
        layer_loop=self.decode_layer_loop)
    return [self._output(seq, result) for seq, result in zip(seqs, generated)]

  def _run_continuous(self, jobs: list[scheduler.Job], policy: ReusePolicy,
                      outputs: scheduler.Outputs, prepare, t_job: float) -> None:
    """Continuous batching over one running batch, fixed for the job: rows (a bucket of
    min(max_batch_size, requests)), page-table width and stop width, so its decode loop compiles
    once per job."""
    if not jobs:
      return
    rows = planner.bucket(min(self.max_batch_size, len(jobs)), minimum=1)
    max_pages = planner.bucket(max(self.layout.pages_for(j.prompt.token_ids.size
                                                         + max(j.sampling.max_new_tokens, 1))
                                   for j in jobs), minimum=4)
    batch = RunningBatch(rows, max_pages, stop_width([self._stops(j) for j in jobs]), self.layout)

    def start(admitted, leases):
      seqs, _, (temperature, top_p, seeds), plans, _ = self._start(admitted, leases, policy,
                                                                   t_job)
      if self._disk is not None:  # as static batching: saved before a later prefill can evict
        self._disk.autosave()
      for i, (seq, plan) in enumerate(zip(seqs, plans)):  # every device step is done: join
        if not seq.done:
          batch.join(seq, plan.n, plan.page_table, temperature=float(temperature[i]),
                     top_p=float(top_p[i]), seed=int(seeds[i]))
      return seqs

    def visit(min_active):
      decoding.visit(self.kv, self.decode_params, self.config, batch,
                     steps_per_visit=self.steps_per_visit, min_active=min_active,
                     backend=self.attention_backend, layer_loop=self.decode_layer_loop)

    scheduler.run_continuous(self.store, jobs, policy, batch, outputs, start, self._output,
                             visit, self.kv.recover, prepare)


def _cpu_only() -> bool:
  return jax.default_backend() == "cpu"
