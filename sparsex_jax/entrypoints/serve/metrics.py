"""The server's Prometheus metrics (`/metrics`), in a registry of its own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
  """Counters the handlers and the engine loop update; gauges refreshed at each scrape."""

  def __init__(self):
    r = self.registry = CollectorRegistry()
    self.requests = Counter("sparsex_requests", "HTTP completion requests answered",
                            ["endpoint", "status"], registry=r)
    self.prompt_tokens = Counter("sparsex_prompt_tokens", "prompt tokens of finished requests",
                                 registry=r)
    self.generation_tokens = Counter("sparsex_generation_tokens", "tokens generated",
                                     registry=r)
    self.reused_tokens = Counter("sparsex_reused_tokens",
                                 "prompt tokens whose KV came from the segment cache", registry=r)
    self.exact_tokens = Counter("sparsex_exact_tokens",
                                "prompt tokens referenced from a prefix: the prefix cache's exact "
                                "blocks and the continuation cache's", registry=r)
    self.continued_tokens = Counter("sparsex_continued_tokens",
                                    "of those, an earlier prompt's K/V as its reuse computed it "
                                    "(the continuation cache: a chat's history)", registry=r)
    self.recomputed_tokens = Counter("sparsex_recomputed_tokens",
                                     "reused tokens recomputed in the sparse layers", registry=r)
    self.ttft = Histogram("sparsex_time_to_first_token_seconds",
                          "arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
    self.tpot = Histogram("sparsex_time_per_output_token_seconds",
                          "first to last token, per token after the first",
                          buckets=LATENCY_BUCKETS, registry=r)
    self.running = Gauge("sparsex_requests_running", "requests admitted to a running batch",
                         registry=r)
    self.waiting = Gauge("sparsex_requests_waiting", "requests queued for admission",
                         registry=r)
    self.pool_used = Gauge("sparsex_pool_pages_used", "KV pool pages in use", registry=r)
    self.pool_capacity = Gauge("sparsex_pool_pages_capacity", "KV pool pages", registry=r)
    self.segment_hit_rate = Gauge("sparsex_segment_cache_hit_rate",
                                  "segment-cache lookups that hit (every namespace)", registry=r)
    self.prefix_hit_rate = Gauge("sparsex_prefix_cache_hit_rate",
                                 "prefix-cache block lookups that hit (every namespace)",
                                 registry=r)

    self.programs = Gauge("sparsex_compiled_programs",
                          "distinct device programs the engine has run (each compiled once)",
                          registry=r)
    # Counts the engine loop keeps: Counters (`_total`), advanced to the loop's count at scrape.
    self.compiling_steps = Counter("sparsex_compiling_steps",
                                   "engine steps that compiled a new program first", registry=r)
    self.compile_stall = Counter("sparsex_compile_stall_seconds",
                                 "wall time of the steps that compiled a new program: every "
                                 "request waiting meanwhile waited for the compiler", registry=r)
    self.compiled_ahead = Counter("sparsex_programs_compiled_ahead",
                                  "programs compiled on the compile thread (prefills, slot "
                                  "copies, host-tier copies) while the engine loop went on",
                                  registry=r)
    self.to_compile_ahead = Gauge("sparsex_programs_to_compile_ahead",
                                  "slot-copy and host-tier programs the compile thread has yet "
                                  "to compile (0: every one a server meets is compiled, except "
                                  "prefills of prompt shapes not seen yet)", registry=r)
    self.deferred = Counter("sparsex_admissions_deferred",
                            "times a waiting request was passed over while its prefill "
                            "program compiled", registry=r)
    self.host_bytes_used = Gauge("sparsex_host_tier_bytes_used",
                                 "host-memory tier bytes in use (0 without one)", registry=r)
    self.host_continued_tokens = Counter(
        "sparsex_host_tier_continued_tokens",
        "continued tokens (a chat's history) copied back from the host tier", registry=r)
    self.host_segment_loads = Counter("sparsex_host_tier_segment_loads",
                                      "segments copied back from the host tier", registry=r)
    self.host_spill = Counter("sparsex_host_tier_spill_seconds",
                              "engine-loop time spent sending evicted pages to the host tier",
                              registry=r)
    self.host_spill_reads = Counter("sparsex_host_tier_spill_reads",
                                    "reads of evicted pages into the host tier (a segment, or a "
                                    "piece of a chat's history)", registry=r)
    self.output_tokens_kept = Counter(
        "sparsex_output_tokens_cached",
        "generated tokens whose K/V was cached after their request finished (a chat's next turn "
        "resends them and continues past them)", registry=r)
    self._seen: dict[str, float] = {}

  def _advance(self, name: str, counter: Counter, value: float) -> None:
    """Counts up to `value` (a count kept elsewhere, which never decreases)."""
    delta = value - self._seen.get(name, 0)
    if delta > 0:
      counter.inc(delta)
      self._seen[name] = value

  def refresh(self, loop, engine) -> None:
    """The gauges, read at scrape time (host counters; approximate while a step runs)."""
    running, waiting = loop.counts()
    self.running.set(running)
    self.waiting.set(waiting)
    stats = engine.store.stats()
    self.pool_used.set(stats["pool"]["pages_used"])
    self.pool_capacity.set(stats["pool"]["capacity_pages"])
    self.segment_hit_rate.set(stats["segment_cache"]["hit_rate"])
    self.prefix_hit_rate.set(stats["prefix_cache"]["hit_rate"])
    self.programs.set(engine.num_compilations)
    self._advance("compiling_steps", self.compiling_steps, loop.compiling_steps)
    self._advance("compile_stall", self.compile_stall, loop.compile_stall_s)
    self._advance("compiled_ahead", self.compiled_ahead, loop.programs_compiled_ahead)
    self.to_compile_ahead.set(loop.programs_to_compile_ahead)
    self._advance("deferred", self.deferred, loop.admissions_deferred)
    self._advance("output_tokens_kept", self.output_tokens_kept, stats["output_tokens_kept"])
    host = stats.get("host_tier")
    if host is not None:
      self.host_bytes_used.set(host["bytes_used"])
      self._advance("host_continued", self.host_continued_tokens,
                    host["continuation_blocks_loaded"] * engine.layout.page_size)
      self._advance("host_segment_loads", self.host_segment_loads, host["loads"])
      self._advance("host_spill", self.host_spill, host["spill_read_s"])
      self._advance("host_spill_reads", self.host_spill_reads, host["spill_reads"])
