"""The batched offline engine: the orchestrator only.

    request -> tokenize -> acquire (KV store) -> plan (planner) -> prefill (device) -> commit
            -> sample -> decode (device loops) -> release

generate() is continuous batching, a loop of schedule -> run -> update: the Scheduler
(scheduler.py, host only) says who is prefilled, decoded and released, the StepRunner
(step_runner.py) does each step's device work. Host bookkeeping lives in sparsex_jax/kv, planning in planner.py,
reuse methods in reuse/, device programs in sparsex_jax/programs; this file only wires them.
"""

from __future__ import annotations

import collections
import contextlib
import time
import warnings
from typing import Callable, Generator, Iterable, Iterator, Sequence

import jax
import numpy as np

from models import llama
from models.config import ModelConfig, get_config
from sparsex_jax import decoding, planner, scheduler, sharding
from sparsex_jax.api import Request, RequestOutput, Segment
from sparsex_jax.kv import KVStore, PoolLayout, persist
from sparsex_jax.kv.host_tier import (HOST_DTYPES, HostSegment, HostTier, check_pinned_budget,
                                     host_memory)
from sparsex_jax.kv.segment_cache import segment_key
from sparsex_jax.prompt import Prompt, check_prompt, segment_ids, tokenize
from sparsex_jax.programs import KVPool
from sparsex_jax.programs.kernels import resolve_backend
from sparsex_jax.reuse import ReuseConfig, ReuseMethod
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.scheduler import ScheduledRequest
from sparsex_jax.step_runner import StepRunner, prefill_alone, prefill_and_commit
from sparsex_jax.validation import is_int


class Engine:
  """SparseX serving engine over a paged KV pool.

  engine = Engine.from_pretrained("smollm2-135m")
  outs = engine.generate([Request([...])], SamplingParams(...), reuse=ReuseConfig("sparsex"))
  """

  def __init__(self, config: ModelConfig, params, tokenizer=None, *, page_size: int = 16,
               num_pages: int | None = None, kv_pool_bytes: int | None = None,
               max_batch_size: int = 16, attention_backend: str = "auto",
               steps_per_visit: int = decoding.STEPS_PER_VISIT, mesh=None, namespace: str = "",
               host_cache_bytes: int | None = None, host_cache_dtype: str = "native",
               max_prefill_tokens: int | None = scheduler.DEFAULT_MAX_PREFILL_TOKENS):
    """max_batch_size: rows of the running batch. steps_per_visit: decode steps per device loop
    (per host visit). mesh: None (one device) or a ("data", "tensor") jax Mesh
    (sharding.make_mesh(tp)): weights Megatron-style and the KV pool by KV heads over "tensor"
    (docs/SHARDING.md). num_pages and kv_pool_bytes are the whole pool's, summed over the tensor
    axis. namespace: the cache namespace of requests that name none (Request.namespace): what is
    cached under one namespace is never reused or seen under another (docs/SECURITY.md).
    host_cache_bytes: the host-memory tier's budget (None or 0: no host tier): segments the pool
    evicts go there, and down to the cache dir (use_cache_dir) when it is full (docs/TIERS.md).
    host_cache_dtype: how it keeps them: "native" (the pool's dtype), "int8" or "fp8".
    max_prefill_tokens: the padded tokens one prefill may compute (requests x longest prompt,
    each a bucket; a longer prompt runs alone): what bounds a prefill's activation memory
    (scheduler.py). None: no bound."""
    if not isinstance(namespace, str):
      raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
    self.namespace = namespace
    backend = resolve_backend(attention_backend)  # validates the name
    sharding.check_model(config, mesh)
    if not is_int(max_batch_size) or max_batch_size < 1:
      raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if not is_int(steps_per_visit) or steps_per_visit < 1:
      raise ValueError(f"steps_per_visit must be an int >= 1, got {steps_per_visit!r}")
    self.steps_per_visit = int(steps_per_visit)
    if max_prefill_tokens is not None and (not is_int(max_prefill_tokens)
                                           or max_prefill_tokens < 1):
      raise ValueError(f"max_prefill_tokens must be an int >= 1 or None, got "
                       f"{max_prefill_tokens!r}")
    self.max_prefill_tokens = None if max_prefill_tokens is None else int(max_prefill_tokens)
    if mesh is not None:
      params = sharding.shard_params(params, mesh)
    self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
    self.layout = PoolLayout.for_model(config, page_size=page_size, num_pages=num_pages,
                                       kv_pool_bytes=kv_pool_bytes)
    host_tier = None
    if host_cache_bytes:
      if not is_int(host_cache_bytes) or host_cache_bytes < 0:
        raise ValueError(f"host_cache_bytes must be an int >= 0, got {host_cache_bytes!r}")
      # Cut at the default policy's threshold, so that its loads stage one array per K and V.
      default_threshold = ReuseConfig().resolve(config).layer_threshold
      memory = (host_memory(jax.devices()[0]) if mesh is None else
                host_memory(mesh.devices.flat[0], sharding.pool_sharding(mesh)))
      if memory is not None:  # pinned host memory: XLA caps it (kv/host_tier.py)
        check_pinned_budget(int(host_cache_bytes))
      host_tier = HostTier(int(host_cache_bytes), host_cache_dtype, spill=self._spill_to_disk,
                           memory=memory, split_layer=default_threshold)
    elif host_cache_dtype not in HOST_DTYPES:
      raise ValueError(f"host_cache_dtype must be one of {HOST_DTYPES}, got {host_cache_dtype!r}")
    self.store = KVStore(self.layout, host_tier)
    self.kv = KVPool(config, self.layout, on_lost=self.store.invalidate, mesh=mesh)
    self.store.page_io = self.kv
    self.max_batch_size = int(max_batch_size)
    self.attention_backend = attention_backend
    self.disk_link: persist.DiskLink | None = None  # set by use_cache_dir(); the step runner loads and saves through it
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

  def generate(self, requests: Sequence[Request], sampling: SamplingParams = SamplingParams(),
               reuse: ReuseMethod = ReuseConfig(), *, on_error: str = "raise",
               on_output: Callable[[int, RequestOutput], object] | None = None
               ) -> list[RequestOutput]:
    """Prefills and decodes `requests`; outputs in request order. Continuous batching: a running
    batch of max_batch_size rows; a request joins as soon as a row and the pages for its prompt
    and max_new_tokens are free, and leaves when it stops.

    The whole job is validated before any device work. A request that cannot run (bad input, too
    big for the pool, a failure while its batch runs) is isolated: with on_error="raise" a
    RequestError names it and carries the outputs finished so far (`.outputs`); with "return"
    its output has finish_reason "error" and `.error`, and every other request still runs.

    on_output(index, output): called as each request finishes (index into `requests`), in the
    order they finish, before generate returns: a job can write results as they come. What it
    raises ends the job (everything held is released) and propagates.
    """
    return _drive(self._run(requests, sampling, reuse, on_error, on_output))

  def stream(self, requests: Sequence[Request], sampling: SamplingParams = SamplingParams(),
             reuse: ReuseMethod = ReuseConfig(), *, on_error: str = "raise"
             ) -> Iterator[tuple[int, RequestOutput]]:
    """generate() as an iterator: (index into `requests`, output) as each request finishes, in
    the order they finish. The work is done as it is consumed (a caller in another process can
    send each result on as it comes, batch/replicas.py); closing the iterator early ends the job
    and releases everything it holds."""
    finished: collections.deque[tuple[int, RequestOutput]] = collections.deque()
    run = self._run(requests, sampling, reuse, on_error, lambda i, out: finished.append((i, out)))
    with contextlib.closing(run):
      for _ in run:
        while finished:
          yield finished.popleft()
    while finished:  # failed in validation, with nothing to schedule
      yield finished.popleft()

  def _run(self, requests, sampling, reuse, on_error, on_output
           ) -> Generator[None, None, list[RequestOutput]]:
    """The continuous-batching loop, pausing after each step (outputs go to on_output); returns
    the outputs in request order."""
    t_job = time.perf_counter()
    policy = reuse.resolve(self.config)
    todo, outputs = self.schedulable(requests, sampling, on_error, on_output)
    if not todo:
      return list(outputs)
    runner = StepRunner(self, policy, todo, t_job)
    sched = scheduler.Scheduler(self.store, policy, runner.batch.n_rows,
                                steps_per_visit=self.steps_per_visit, prepare=runner.prepare,
                                max_prefill_tokens=self.max_prefill_tokens)
    for r in todo:
      sched.add_request(r)
    try:
      while sched.has_work:
        step = sched.schedule()
        outputs.record(step.failed)
        outputs.record(sched.update(step, runner.run(step)))
        yield
    finally:  # on_error="raise", an interrupt or a closed stream ends the job: give back all held
      sched.close()
    return list(outputs)

  def schedulable(self, requests: Sequence[Request], sampling: SamplingParams, on_error: str,
                  on_output=None) -> tuple[list[ScheduledRequest], scheduler.Outputs]:
    """generate()'s validation of a whole job before any device work: the requests that can be
    scheduled, and the job's outputs with the others already failed (named by index and id)."""
    requests = list(requests)
    outputs = scheduler.Outputs(len(requests), on_error, on_output)
    todo = []
    for i, request in enumerate(requests):
      try:
        sp = getattr(request, "sampling", None) or sampling
        todo.append(ScheduledRequest(i, request.id, self.tokenize(request, sp.max_new_tokens), sp))
      except (ValueError, TypeError) as e:
        outputs.fail(i, getattr(request, "id", None), e)
    return todo, outputs

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
    self.disk_link = persist.DiskLink(cache, self.store, self.kv, save)
    self.disk_link.autosave()  # what this engine cached before it had a cache dir
    return self.disk_link.cache

  def _spill_to_disk(self, seg: HostSegment) -> bool:
    """The host tier's overflow: to the cache dir if there is one (True if it is there now)."""
    if self.disk_link is None:
      return False
    k, v = seg.restored(np.dtype(self.config.jnp_dtype))
    return self.disk_link.keep(seg.token_ids, seg.positions, k, v, seg.namespace)

  @property
  def host_tier(self) -> HostTier | None:
    return self.store.host_tier

  def fill_host_tier(self, namespace: str | None = None) -> int:
    """Reads segments of the cache dir (those in neither the pool nor the host tier) into the host
    tier while its budget has room; returns how many (`sparsex cache warm --fill-host-tier`)."""
    tier = self.store.host_tier
    if tier is None or self.disk_link is None:
      raise ValueError("fill_host_tier needs host_cache_bytes and a cache dir (use_cache_dir)")
    namespace = self.namespace if namespace is None else namespace
    n = 0
    for key in list(self.disk_link.cache.entries):
      if key in self.store.segment_cache or key in tier:
        continue
      try:
        seg = self.disk_link.cache.read(key, namespace)
      except persist.CacheError:
        continue  # another namespace's, or a bad file (found again when a request needs it)
      if tier.bytes_used + 2 * tier.stored_nbytes(seg.k) > tier.budget_bytes:
        break  # full: filling must not push out what it filled
      tier.put(seg.token_ids, seg.positions, seg.k, seg.v, namespace)
      n += 1
    return n

  @property
  def disk_cache(self) -> persist.SegmentDiskCache | None:
    return self.disk_link.cache if self.disk_link is not None else None

  def save_cache(self) -> int:
    """Writes the in-memory segments missing from the cache dir; returns how many."""
    if self.disk_link is None:
      raise ValueError("no cache dir: call use_cache_dir(path) first")
    return self.disk_link.save()

  def prefill_logits(self, request: Request, reuse: ReuseMethod = ReuseConfig(),
                     return_plan: bool = False):
    """The first output token's float32 logits [V] (and the PrefillPlan with return_plan)."""
    policy = reuse.resolve(self.config)
    prompt = tokenize(request, self.tokenizer, self.config, 0, self.namespace)
    if self.disk_link is not None and policy.reads_segment_cache:
      self.disk_link.load_for([prompt])
    with self.store.acquire([prompt], policy, 0) as leases, self.kv.recovering():
      plans, out, _ = prefill_and_commit(self, [prompt], leases, policy)
      logits = np.asarray(out.logits[0], np.float32)
    if self.disk_link is not None:
      self.disk_link.autosave()
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
      ids = check_prompt(self.config, segment_ids(s if isinstance(s, Segment) else Segment(s),
                                                  self.tokenizer))
      if ids.tobytes() in seen or self.store.contains_segment(ids, namespace) or (
          self.disk_cache is not None and segment_key(ids, namespace) in self.disk_cache):
        continue  # cached, or on disk (loaded when a request needs it)
      seen.add(ids.tobytes())
      todo.append(Prompt((ids,), (True,), namespace))
    prefill_alone(self, todo, ReuseConfig("full").resolve(self.config), batch_size)
    return len(todo)

  def clear_caches(self) -> int:
    """Drops every cached prefix block and segment no live request holds; returns pages freed."""
    return self.store.clear()

  def stats(self, namespace: str | None = None) -> dict:
    """KVStore.stats (every namespace, or only `namespace`'s entries) and the compilations."""
    if namespace is not None:
      return self.store.stats(namespace)
    out = self.store.stats() | {"compilations": self.num_compilations}
    if self.disk_link is not None:
      out["disk_cache"] = {"segments": len(self.disk_link.cache), "loaded": self.disk_link.cache.loaded,
                           "saved": self.disk_link.cache.saved,
                           "load_s": round(self.disk_link.load_s, 6)}
    return out


def _drive(run: Generator[None, None, list[RequestOutput]]) -> list[RequestOutput]:
  """Runs Engine._run to its end; its outputs."""
  while True:
    try:
      next(run)
    except StopIteration as done:
      return done.value


def _cpu_only() -> bool:
  return jax.default_backend() == "cpu"
