"""The batched offline engine: request -> plan -> device prefill -> paged decode -> caches.

Host-side state (allocator, prefix cache, segment cache) is plain Python; device state is the KV
pool, which every jitted step donates and returns.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig, get_config
from sparsex_jax import planner, prefill as device
from sparsex_jax.allocator import PageAllocator, PoolExhausted
from sparsex_jax.api import (PrefillPlan, Request, RequestOutput, RequestStats, ReuseConfig,
                             Segment)
from sparsex_jax.dense import check_prompt
from sparsex_jax.planner import EXACT, NEW, REUSED, RequestPlan
from sparsex_jax.prefix_cache import PrefixCache
from sparsex_jax.sampling import SamplingParams, sample
from sparsex_jax.segment_cache import SegmentCache, segment_key

DEFAULT_POOL_BYTES = 1 << 30

_SCORE_KIND = {"sparsex": "attention", "cacheblend": "deviation", "epic": "given",
               "random": "given", "naive": "none", "full": "none", "prefix": "none"}


@jax.jit
def _sample_first(logits, temperature, top_p, seeds):
  return sample(logits, temperature, top_p, _step_keys(seeds, 0))


def _step_keys(seeds, step):
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.PRNGKey(s), step))(seeds)


@dataclasses.dataclass
class _Prepared:
  """A planned request and the cache resources it holds until it is released."""

  plan: RequestPlan
  segments: list[tuple[int, int, np.ndarray, bool]]  # (start, end, ids, cache) per segment
  n_exact_pages: int
  pinned: list = dataclasses.field(default_factory=list)


class Engine:
  """SparseX serving engine over a paged KV pool.

  engine = Engine.from_pretrained("smollm2-135m")
  outs = engine.generate([Request([...])], SamplingParams(...), reuse=ReuseConfig("sparsex"))
  """

  def __init__(self, config: ModelConfig, params, tokenizer=None, *, page_size: int = 16,
               num_pages: int | None = None, kv_pool_bytes: int | None = None,
               max_batch_size: int = 16, attention_backend: str = "auto"):
    if page_size < 1 or page_size & (page_size - 1):
      raise ValueError(f"page_size must be a power of two, got {page_size}")
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.page_size = page_size
    self.max_batch_size = max_batch_size
    self.attention_backend = attention_backend
    itemsize = jnp.dtype(config.dtype).itemsize
    self.bytes_per_page = (2 * config.n_layers * config.n_kv_heads * page_size * config.head_dim
                           * itemsize)
    if num_pages is None:
      num_pages = max(8, (kv_pool_bytes or DEFAULT_POOL_BYTES) // self.bytes_per_page)
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
    self.num_pages = int(num_pages)
    shape = (config.n_layers, config.n_kv_heads, self.num_pages, page_size, config.head_dim)
    self.pool = {"k": jnp.zeros(shape, config.jnp_dtype), "v": jnp.zeros(shape, config.jnp_dtype)}
    self.allocator = PageAllocator(self.num_pages, page_size)
    self.prefix_cache = PrefixCache(self.allocator)
    self.segment_cache = SegmentCache(self.allocator)

  # ------------------------------------------------------------------------------------------
  # construction
  # ------------------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, name_or_path: str = "smollm2-135m", dtype: str = "float32", **kw):
    """A real model: "smollm2-135m" (embedded GGUF), a .gguf path or a Hugging Face folder."""
    from models.loaders import load_model
    loaded = load_model(name_or_path, dtype=dtype)
    return cls(loaded.config, loaded.params, loaded.tokenizer, **kw)

  @classmethod
  def random(cls, preset: str, dtype: str = "bfloat16", seed: int = 0, **kw):
    """Random weights at a preset's real shapes (speed benchmarks; no tokenizer: pass ids)."""
    cfg = get_config(preset, dtype=dtype)
    return cls(cfg, llama.init_params(cfg, seed), None, **kw)

  # ------------------------------------------------------------------------------------------
  # public API
  # ------------------------------------------------------------------------------------------

  def generate(self, requests: Sequence[Request], sampling: SamplingParams = SamplingParams(),
               reuse: ReuseConfig = ReuseConfig()) -> list[RequestOutput]:
    """Prefills and decodes `requests` in batches; outputs in request order."""
    requests = list(requests)
    if not requests:
      return []
    tokenized = [self._tokenize(r) for r in requests]
    outputs: list[RequestOutput] = []
    for chunk in self._chunks(tokenized, reuse, sampling.max_new_tokens):
      outputs.extend(self._generate_batch(chunk, sampling, reuse))
    return outputs

  def prefill_logits(self, request: Request, reuse: ReuseConfig = ReuseConfig(),
                     return_plan: bool = False):
    """The first output token's float32 logits [V] (and the PrefillPlan with return_plan)."""
    prepared = self._prepare_batch([self._tokenize(request)], reuse, max_new_tokens=0)
    try:
      logits, scores, selected, kept, _ = self._run_prefill(prepared, reuse)
      self._store_caches(prepared, reuse)
    finally:
      self._release(prepared)
    out = np.asarray(logits[0], np.float32)
    if not return_plan:
      return out
    return out, self._analysis(prepared[0], scores[0], selected[0], kept[0], reuse)

  def cache_segments(self, segments: Iterable[str | Sequence[int] | Segment],
                     batch_size: int = 8) -> int:
    """Precomputes segments alone at position 0 (e.g. a RAG corpus); returns how many were new."""
    todo, seen = [], set()
    for s in segments:
      seg = s if isinstance(s, Segment) else Segment(s)
      ids = self._segment_ids(seg)
      ids_key = segment_key(ids)
      if ids_key in seen or ids_key in self.segment_cache:
        continue
      seen.add(ids_key)
      todo.append([(ids, True)])
    full = ReuseConfig(mode="full")
    for i in range(0, len(todo), batch_size):
      prepared = self._prepare_batch(todo[i:i + batch_size], full, max_new_tokens=0)
      try:
        self._run_prefill(prepared, full)
        for p in prepared:
          n = p.plan.n
          pages = p.plan.page_table[:math.ceil(n / self.page_size)]
          # Only the segment cache references these pages: a page held by two caches could
          # never be evicted (eviction frees pages only one cache holds).
          self.segment_cache.insert(p.plan.token_ids, pages, np.arange(n, dtype=np.int32),
                                    computed_alone=True)
      finally:
        self._release(prepared)
    return len(todo)

  def clear_caches(self) -> int:
    """Drops every cached prefix block and segment no live request holds; returns pages freed."""
    return self.prefix_cache.evict(self.num_pages) + self.segment_cache.evict(self.num_pages)

  def stats(self) -> dict:
    return {
        "pool": self.allocator.stats(self.bytes_per_page),
        "prefix_cache": self.prefix_cache.stats(self.bytes_per_page),
        "segment_cache": self.segment_cache.stats(self.bytes_per_page),
        "compilations": self.num_compilations,
    }

  @property
  def num_compilations(self) -> int:
    return sum(device.TRACE_COUNTS.values())

  # ------------------------------------------------------------------------------------------
  # planning
  # ------------------------------------------------------------------------------------------

  def _segment_ids(self, seg: Segment) -> np.ndarray:
    if isinstance(seg.content, str):
      if self.tokenizer is None:
        raise ValueError("this engine has no tokenizer (random weights): give segments as token ids")
      ids = self.tokenizer.encode(seg.content)
      if not ids:
        raise ValueError(f"segment {seg.content[:40]!r} tokenizes to no tokens")
    else:
      ids = seg.content
    # Vocabulary and context limits are checked once, on the whole prompt (check_prompt).
    return np.asarray(ids, np.int64)

  def _tokenize(self, request: Request) -> list[tuple[np.ndarray, bool]]:
    if not isinstance(request, Request):
      raise TypeError(f"expected a Request, got {type(request).__name__}")
    return [(self._segment_ids(s), s.cache) for s in request.segments]

  def _pages_needed(self, n_tokens: int) -> int:
    return math.ceil(n_tokens / self.page_size)

  def _chunks(self, tokenized, reuse, max_new_tokens):
    """Splits requests into batches that fit the pool; halves a batch that does not."""
    i = 0
    while i < len(tokenized):
      size = min(self.max_batch_size, len(tokenized) - i)
      while True:
        try:
          prepared = self._prepare_batch(tokenized[i:i + size], reuse, max_new_tokens)
          break
        except PoolExhausted:
          if size == 1:
            raise
          size //= 2
      yield prepared
      i += size

  def _prepare_batch(self, tokenized, reuse: ReuseConfig, max_new_tokens: int) -> list[_Prepared]:
    """Plans every request, taking cache references; all-or-nothing on PoolExhausted."""
    reuse.threshold(self.config.n_layers)  # validate against this model's depth
    reuse.rescore(self.config.n_layers)
    prepared = []
    try:
      for segs in tokenized:
        prepared.append(self._prepare(segs, reuse, max_new_tokens))
    except BaseException:
      self._release(prepared)
      raise
    return prepared

  def _prepare(self, segs, reuse: ReuseConfig, max_new_tokens: int) -> _Prepared:
    s = self.page_size
    ids = check_prompt(self.config, np.concatenate([x for x, _ in segs]), max_new_tokens)
    n = ids.size
    total_pages = self._pages_needed(n + max(max_new_tokens, 1))
    if total_pages > self.allocator.capacity:
      raise ValueError(f"pool too small: a request of {n} + {max_new_tokens} tokens needs "
                       f"{total_pages} pages of {s} tokens, the pool has {self.allocator.capacity}"
                       f"; pass a larger num_pages or kv_pool_bytes to Engine")
    spans, start = [], 0
    for x, cache in segs:
      spans.append((start, start + x.size, x, cache))
      start += x.size
    segment_ids = np.concatenate([np.full(x.size, i, np.int32) for i, (x, _) in enumerate(segs)])

    exact_pages = np.zeros(0, np.int32)
    if reuse.uses_prefix_cache:
      exact_pages, _ = self.prefix_cache.match(ids)
      keep = min(exact_pages.size, (n - 1) // s)  # the last token is always computed
      if keep < exact_pages.size:
        self.allocator.decref(exact_pages[keep:])
        exact_pages = exact_pages[:keep]
    n_exact = exact_pages.size * s
    prepared = _Prepared(
        plan=RequestPlan(token_ids=ids, labels=np.full(n, NEW, np.int8),
                         src_slots=np.full(n, -1, np.int32),
                         old_positions=np.full(n, -1, np.int32), segment_ids=segment_ids,
                         page_table=exact_pages, n_exact=n_exact),
        segments=spans, n_exact_pages=exact_pages.size)
    plan = prepared.plan
    plan.labels[:n_exact] = EXACT
    try:
      if reuse.reuses_segments:
        for start, end, x, cache in spans:
          if not cache or end <= n_exact:
            continue
          entry = self.segment_cache.lookup(x, pin=True)
          if entry is None:
            continue
          prepared.pinned.append(entry)
          i = np.arange(max(start, n_exact), end)
          j = i - start
          plan.labels[i] = REUSED
          plan.src_slots[i] = entry.pages[j // s] * s + j % s
          plan.old_positions[i] = entry.positions[j]
      own = self.allocator.allocate(total_pages - exact_pages.size)
      plan.page_table = np.concatenate([exact_pages, own]).astype(np.int32)
    except BaseException:
      self._release([prepared])
      raise

    ratio = reuse.ratio()
    if reuse.mode == "epic":
      plan.given_score, plan.n_select = planner.epic_scores(plan, ratio)
    else:
      plan.n_select = planner.n_to_select(ratio, plan.n_reused, plan.n_candidates)
      if reuse.rescore_layer is not None:
        plan.n_keep = planner.n_to_select(reuse.kept_ratio(), plan.n_reused, plan.n_select)
      if reuse.mode == "random":
        plan.given_score = planner.random_scores(plan, reuse.seed)
    return prepared

  def _release(self, prepared: list[_Prepared]):
    """Drops a batch's page references and segment pins (idempotent per request)."""
    for p in prepared:
      for entry in p.pinned:
        self.segment_cache.unpin(entry)
      p.pinned = []
      if p.plan.page_table.size:
        self.allocator.decref(p.plan.page_table)
        p.plan.page_table = np.zeros(0, np.int32)

  # ------------------------------------------------------------------------------------------
  # device work
  # ------------------------------------------------------------------------------------------

  def _spec(self, plans: list[RequestPlan], reuse: ReuseConfig) -> device.PrefillSpec:
    n_layers = self.config.n_layers
    any_reused = any(p.n_reused for p in plans)
    t_full = reuse.threshold(n_layers) if any_reused else n_layers
    score = _SCORE_KIND[reuse.mode] if any(p.n_select for p in plans) else "none"
    if t_full == n_layers:
      score = "none"  # every token is computed in full: nothing to select
    n_active = planner.bucket(max(int(p.sparse_q[p.n_exact:].sum()) + p.n_select for p in plans))
    n_probe = planner.bucket(max(int(p.sparse_q.sum()) for p in plans))
    rescore = reuse.rescore(n_layers) if (score == "attention" and t_full < n_layers) else None
    n_late = planner.bucket(max(int(p.sparse_q[p.n_exact:].sum()) + p.n_keep for p in plans))
    return device.PrefillSpec(
        n_full_layers=t_full, score=score, importance_layers=reuse.importance_layers,
        head_reduce=reuse.head_reduce, n_active=0 if t_full == n_layers else n_active,
        n_probe=n_probe if (t_full == 0 and score == "attention") else 0,
        assemble=any_reused, backend=self.attention_backend, rescore_layer=rescore or 0,
        n_active_late=n_late if rescore else 0)

  def _run_prefill(self, prepared: list[_Prepared], reuse: ReuseConfig):
    plans = [p.plan for p in prepared]
    batch_size = planner.bucket(len(plans), minimum=1)
    max_pages = planner.bucket(max(p.page_table.size for p in plans), minimum=4)
    batch = planner.build_prefill_batch(plans, self.page_size, self.num_pages, batch_size,
                                        max_pages)
    spec = self._spec(plans, reuse)
    logits, self.pool, scores, selected, kept = device.prefill(
        self.params, self.pool, batch, cfg=self.config, spec=spec)
    return logits, scores, selected, kept, batch

  def _generate_batch(self, prepared: list[_Prepared], sampling: SamplingParams,
                      reuse: ReuseConfig) -> list[RequestOutput]:
    start = time.perf_counter()
    try:
      logits, _, selected, _, batch = self._run_prefill(prepared, reuse)
      b = logits.shape[0]
      temperature = np.full(b, sampling.temperature, np.float32)
      top_p = np.full(b, sampling.top_p, np.float32)
      seeds = np.full(b, sampling.seed, np.int32) + np.arange(b, dtype=np.int32)
      first = np.asarray(_sample_first(logits, temperature, top_p, seeds))
      ttft = time.perf_counter() - start
      n_recomputed = np.asarray(selected).sum(axis=1)
      self._store_caches(prepared, reuse)
      generated = self._decode(prepared, first, batch, sampling, temperature, top_p, seeds)
    finally:
      self._release(prepared)
    outputs = []
    for i, p in enumerate(prepared):
      tokens, reason = generated[i]
      stats = RequestStats(
          ttft_s=ttft, n_prompt=p.plan.n, n_exact=p.plan.n_exact,
          n_reused=p.plan.n_reused, n_new=int(np.sum(p.plan.labels == NEW)),
          n_recomputed=int(n_recomputed[i]), n_generated=len(tokens),
          compilations=self.num_compilations)
      text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
      outputs.append(RequestOutput(text=text, token_ids=tokens, stats=stats, finish_reason=reason))
    return outputs

  def _stop_ids(self, sampling: SamplingParams) -> set[int]:
    if sampling.ignore_eos:
      return set()
    if sampling.stop_token_ids is not None:
      return set(sampling.stop_token_ids)
    return set(getattr(self.tokenizer, "stop_ids", ()) or ())

  def _decode(self, prepared, first, batch, sampling, temperature, top_p, seeds):
    """Paged decode of the whole batch until every sequence stops or hits max_new_tokens."""
    s, sentinel = self.page_size, self.num_pages * self.page_size
    stops = self._stop_ids(sampling)
    n_real = len(prepared)
    b = first.shape[0]
    outs = [[int(first[i])] for i in range(n_real)]
    done = np.ones(b, bool)
    done[:n_real] = [outs[i][0] in stops or sampling.max_new_tokens == 1 for i in range(n_real)]
    pos = np.zeros(b, np.int32)
    pos[:n_real] = [p.plan.n for p in prepared]
    tokens = np.zeros(b, np.int32)
    tokens[:n_real] = first[:n_real]
    page_table = batch["page_table"]
    for step in range(1, sampling.max_new_tokens):
      if done.all():
        break
      slots = np.where(done, sentinel,
                       page_table[np.arange(b), np.minimum(pos // s, page_table.shape[1] - 1)] * s
                       + pos % s).astype(np.int32)
      q_pos = np.where(done, -1, pos).astype(np.int32)
      nxt, _, self.pool = device.decode_step(
          self.params, self.pool, tokens, q_pos, slots, page_table, pos + 1, temperature, top_p,
          _step_keys(seeds, step), cfg=self.config, backend=self.attention_backend)
      nxt = np.asarray(nxt)
      for i in range(n_real):
        if not done[i]:
          outs[i].append(int(nxt[i]))
          done[i] = int(nxt[i]) in stops or len(outs[i]) >= sampling.max_new_tokens
      tokens = nxt.astype(np.int32)
      pos = pos + 1
    result = []
    for o in outs:
      if o and o[-1] in stops:
        result.append((o[:-1], "stop"))
      else:
        result.append((o, "length"))
    return result

  # ------------------------------------------------------------------------------------------
  # cache maintenance after a prefill
  # ------------------------------------------------------------------------------------------

  def _insert_prefix(self, plan: RequestPlan, exact_until: int):
    """Registers the full prompt blocks before `exact_until` (their K/V is exactly a full
    prefill's) in the prefix cache."""
    n_blocks = min(exact_until, plan.n) // self.page_size
    if n_blocks:
      self.prefix_cache.insert(plan.token_ids[:n_blocks * self.page_size],
                               plan.page_table[:n_blocks])

  def _store_caches(self, prepared: list[_Prepared], reuse: ReuseConfig):
    """After a prefill: exact blocks into the prefix cache; cacheable segments that missed the
    segment cache are copied into pages of their own (computed in context)."""
    s = self.page_size
    copies = []
    if not reuse.update_caches:
      return
    for p in prepared:
      plan = p.plan
      if reuse.uses_prefix_cache:
        reused = np.flatnonzero(plan.labels == REUSED)
        self._insert_prefix(plan, int(reused[0]) if reused.size else plan.n)
      if not reuse.reuses_segments:
        continue
      for start, end, x, cache in p.segments:
        if not cache or np.any(plan.labels[start:end] == REUSED):
          continue
        if segment_key(x) in self.segment_cache:
          continue
        try:
          pages = self.allocator.allocate(self._pages_needed(end - start))
        except PoolExhausted:
          continue  # caching is best effort: a full pool must not fail the request
        pos = np.arange(start, end)
        src = plan.page_table[pos // s] * s + pos % s
        j = np.arange(end - start)
        copies.append((src, pages[j // s] * s + j % s, x, pages, pos, start == 0))
    if not copies:
      return
    width = planner.bucket(max(c[0].size for c in copies))
    src = np.zeros((len(copies), width), np.int32)
    dst = np.full((len(copies), width), self.num_pages * s, np.int32)
    for i, c in enumerate(copies):
      src[i, :c[0].size], dst[i, :c[1].size] = c[0], c[1]
    self.pool = device.copy_slots(self.pool, src, dst)
    for _, _, x, pages, pos, alone in copies:
      self.segment_cache.insert(x, pages, pos.astype(np.int32), computed_alone=alone)
      self.allocator.decref(pages)

  def _analysis(self, prepared: _Prepared, scores, selected, kept, reuse) -> PrefillPlan:
    plan = prepared.plan
    work = np.arange(plan.n_exact, plan.n)
    scores = np.asarray(scores)[:work.size]
    selected = np.asarray(selected)[:work.size]
    kept = np.asarray(kept)[:work.size]
    reused = plan.labels[work] == REUSED
    return PrefillPlan(labels=plan.labels.copy(), sparse_q=plan.sparse_q,
                       reused_positions=work[reused], scores=scores[reused],
                       selected_positions=work[selected],
                       kept_positions=work[kept] if reuse.rescore_layer is not None else None,
                       layer_threshold=reuse.threshold(self.config.n_layers))
