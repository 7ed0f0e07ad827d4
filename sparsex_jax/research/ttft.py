"""The TTFT benchmark's shared pieces (scripts/bench_ttft.py, profile_prefill.py and
bench_throughput.py use them): the methods by label, the workloads, the engine at a preset's
shapes with random weights, and the plain dense prefill that anchors every speed-up.

Workloads (each context C is the prompt length, within a few tokens):
- rag:   a 256-token system prompt, passages of about 1.3K tokens precomputed alone at position 0
         (`cache_segments`, as a corpus would be), in another order on every run, and a 32-token
         question. The prefix cache only ever hits the system prompt.
- chat:  truncated chat history. The conversation's turns (512 tokens each) were computed in
         context by earlier requests (other windows, another system prompt); each run sends a
         system prompt, the last W turns of a window that slides by one turn per run (the oldest
         turn dropped), and a new 64-token message.
- agent: a 2K-token (C/4) tool-and-instructions prefix that is an exact prefix-cache hit, tool
         results and sub-agent outputs (768 tokens each) computed in other agents' contexts, in
         another order on every run, and a 64-token instruction.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import sparsex_jax as sx
from models import llama, moe
from models.config import get_config
from sparsex_jax.programs import kernels
from sparsex_jax.programs.options import COMPILER_OPTIONS
from sparsex_jax.research import methods as mth

DENSE = "dense prefill"  # the anchor: plain jitted prefill, cuDNN attention, no pages
WORKLOADS = ("rag", "chat", "agent")


def _rule(family, cells):
  """(label, method) of a SparseX rule at (r, T) cells, labelled as `sparsex eval` labels them."""
  return [(mth.label(family, r, t), sx.ReuseConfig(family, recompute_ratio=r, layer_threshold=t))
          for r, t in cells]


# Labels match `sparsex eval`'s, so quality and TTFT join by label.
POLICIES = [
    ("full", sx.Full()),
    ("naive", sx.Naive()),
    ("epic r=0.15", sx.Epic(recompute_ratio=0.15)),
    ("cacheblend r=0.15", sx.CacheBlend(recompute_ratio=0.15)),
    # The default rule (attention x |K/V deviation|, 2 segment heads, layer T's fresh K/V kept;
    # docs/quality.md); r = 0.10 at T = 1 is the configuration at EPIC r=0.15's TTFT.
    *_rule("sparsex", ((0.15, 4), (0.15, 2), (0.10, 1), (0.15, 1))),
    # The paper's rule (Sparse-Q attention mass at the last full layer).
    *_rule("sparsex-attention", ((0.15, 4), (0.15, 2), (0.05, 4), (0.30, 2))),
    # The paper's rule as published (overflow blocks, tail fallback); T = 0.15 L is 5 at 32 layers.
    *_rule("sparsex-paper", ((0.15, 5), (0.15, 4))),
    # Prefix mode caches every full block it computes: timed last within a workload.
    ("prefix", sx.Prefix()),
]
DEFAULT_METHODS = [DENSE, "full", "naive", "epic r=0.15", "cacheblend r=0.15",
                   mth.default_label(0.15, 4), mth.default_label(0.15, 2),
                   "sparsex-attention r=0.15 T=4"]


def percentile(xs, q):
  return float(np.percentile(np.asarray(xs, np.float64), q))


def random_ids(rng, n, vocab):
  """n random token ids (above the first ten, where special tokens sit)."""
  return [int(i) for i in rng.integers(10, vocab, size=n)]


# The anchor compiles with the engine's XLA options too: the same matmul library on both sides.
@functools.partial(jax.jit, static_argnames=("cfg", "impl"), compiler_options=COMPILER_OPTIONS)
def dense_prefill(params, tokens, *, cfg, impl):
  """Plain causal prefill of tokens [1, n] from position 0: last-token logits and the K/V cache
  (returned, so it is computed as the engine's is). No pages, no padding, no caches."""
  n = tokens.shape[1]
  positions = jnp.arange(n, dtype=jnp.int32)[None]
  # a mixture of experts: the engine's grouped matmul (the GPU kernel where cuDNN runs)
  matmul = functools.partial(kernels.grouped_matmul,
                             backend="pallas" if impl == "cudnn" else "reference")
  moe_ffn = functools.partial(moe.moe_ffn, grouped_matmul=matmul)

  def one_layer(x, layer_params):
    q, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
    attn = jax.nn.dot_product_attention(q, k, v, scale=cfg.sm_scale, is_causal=True,
                                        implementation=impl)
    return llama.layer_output(layer_params, cfg, x, attn, moe_ffn=moe_ffn), (k, v)

  x, kv = jax.lax.scan(one_layer, llama.embed(params, tokens), params["layers"])
  return llama.logits(params, cfg, x[:, -1]), kv


class Workload:
  """setup(engine) fills the caches; request(i) is run i's request (i = -1: the warm-up)."""

  def __init__(self, name, cfg, context, runs):
    self.name, self.context = name, context
    rng = np.random.default_rng(hash((name, context)) % 2**32)
    v = cfg.vocab_size
    self.setup_requests, self.alone = [], []
    sys_len, tail_len = min(256, context // 16), min(64, context // 16)
    if name == "rag":
      n_pass = max(3, round(context / 1365))
      self.tail_len = min(32, context // 32)
      plen = (context - sys_len - self.tail_len) // n_pass
      self.system = random_ids(rng, sys_len, v)
      self.pieces = [random_ids(rng, plen, v) for _ in range(n_pass)]
      self.alone = self.pieces
    elif name == "chat":
      turn = min(512, context // 8)
      self.window = max(2, (context - sys_len - tail_len) // turn)
      self.system = random_ids(rng, sys_len, v)
      self.pieces = [random_ids(rng, turn, v) for _ in range(self.window + runs + 1)]
      other = random_ids(rng, sys_len, v)  # the earlier requests' context differs from this one's
      # Earlier requests computed the turns in context, W at a time, offset by half a window so
      # that no timed window starts where an earlier one did.
      step, start = self.window, -(self.window // 2)
      while start < len(self.pieces):
        chunk = self.pieces[max(0, start):start + step]
        self.setup_requests.append(sx.Request([sx.Segment(other, cache=False)]
                                              + [sx.Segment(p) for p in chunk]))
        start += step
      self.tail_len = tail_len
    elif name == "agent":
      self.system = random_ids(rng, context // 4, v)
      out_len = min(768, context // 8)
      n_out = max(2, (context - len(self.system) - tail_len) // out_len)
      self.pieces = [random_ids(rng, out_len, v) for _ in range(n_out)]
      for j in range(0, n_out, 3):  # other agents' runs, each with its own context
        self.setup_requests.append(sx.Request(
            [sx.Segment(random_ids(rng, sys_len, v), cache=False)]
            + [sx.Segment(p) for p in self.pieces[j:j + 3]]))
      self.tail_len = tail_len
    else:
      raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")
    self.vocab = v

  def setup(self, engine):
    engine.clear_caches()
    if self.alone:
      engine.cache_segments(self.alone, batch_size=2)
    for r in self.setup_requests:
      engine.prefill_logits(r, reuse=sx.ReuseConfig("naive"))
    if self.name == "agent":  # the tools prefix is a prefix-cache hit for every timed request
      engine.prefill_logits(sx.Request([sx.Segment(self.system, cache=False),
                                        sx.Segment(random_ids(np.random.default_rng(9), 16,
                                                        self.vocab), cache=False)]),
                            reuse=sx.ReuseConfig("prefix"))

  def request(self, i):
    tail = sx.Segment(random_ids(np.random.default_rng(1000 + i), self.tail_len, self.vocab),
                      cache=False)
    if self.name == "chat":
      first = i + 1
      body = self.pieces[first:first + self.window]
    else:  # a rotation: every run starts with another piece
      order = (np.arange(len(self.pieces)) + i) % len(self.pieces)
      body = [self.pieces[j] for j in order]
    return sx.Request([sx.Segment(self.system)] + [sx.Segment(p) for p in body] + [tail])


def random_weights(cfg, seed: int = 0):
  """Random params at the config's shapes (normal, std 0.02; norms ones) made one layer at a time
  on the device: init_params would hold whole [L, ...] stacks of float32 random values at once
  (for Qwen3-30B-A3B's experts, 19 GB per stack), this holds one layer's. Speed does not depend
  on the values (the router's choices are as spread as under init_params')."""
  shapes = jax.eval_shape(lambda: llama.init_params(cfg, 0))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))

  def make(path, leaf, key):
    if "norm" in jax.tree_util.keystr(path):
      return jnp.ones(leaf.shape, leaf.dtype)

    def draw(key, shape):
      return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(leaf.dtype)

    if len(leaf.shape) < 3:  # embedding, head, per-layer vectors: small
      return jax.jit(draw, static_argnums=1)(key, leaf.shape)

    def fill(key):
      def one_layer(i, stack):
        return jax.lax.dynamic_update_index_in_dim(
            stack, draw(jax.random.fold_in(key, i), leaf.shape[1:]), i, 0)
      return jax.lax.fori_loop(0, leaf.shape[0], one_layer, jnp.zeros(leaf.shape, leaf.dtype))
    return jax.jit(fill)(key)

  return jax.tree_util.tree_unflatten(
      treedef, [make(path, leaf, key) for (path, leaf), key in zip(leaves, keys)])


def make_engine(preset, contexts, smoke, attention_backend="auto"):
  cfg = get_config(preset, dtype="float32" if smoke else "bfloat16")
  if smoke:
    cfg = cfg.replace(n_layers=5)  # room for T = 4
  longest = max(contexts)
  if cfg.max_seq_len < longest + 1024:
    # Random weights: speed does not depend on them, so longer contexts than the model was
    # trained for are fine here (reported in the JSON).
    cfg = cfg.replace(max_seq_len=longest + 1024)
  # The largest cache state: the chat turns (W + runs + 1 of them) plus a request.
  pages = int(4 * (longest + 8192) / 16) + 64
  params = llama.init_params(cfg, 0)
  return sx.Engine(cfg, params, None, page_size=16, num_pages=pages,
                   attention_backend=attention_backend)


# ----------------------------------------------------------------------------------------------
# Ceilings and floors
# ----------------------------------------------------------------------------------------------

def ceilings(smoke: bool) -> dict:
  """Measured bf16 matmul TFLOP/s and copy GB/s (read + write) of this device."""
  n = 512 if smoke else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  big = jnp.ones((1 << (20 if smoke else 28),), jnp.float32)  # 1 GB on the GPU
  cp = jax.jit(lambda x: x + 1)
  out = {}
  for name, fn, arg, work in (("matmul_tflops", mm, a, 2 * n ** 3 / 1e12),
                              ("copy_gbps", cp, big, 2 * big.nbytes / 1e9)):
    fn(arg).block_until_ready()
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      for _ in range(10):
        r = fn(arg)
      r.block_until_ready()
      times.append((time.perf_counter() - t0) / 10)
    out[name] = work / float(np.median(times))
  print(f"ceilings: {out['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {out['copy_gbps']:.0f} GB/s "
        f"copy", flush=True)
  return out


def _projection_params(cfg) -> int:
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  return d * (n + 2 * k) * h + n * h * d


def layer_params(cfg) -> int:
  """One layer's weights a token is multiplied by (of a mixture of experts: the router and its k
  experts): FLOPs per token and layer = 2 x this."""
  return _projection_params(cfg) + cfg.ffn_params(active=True)


def layer_weights_read(cfg, n_tokens) -> float:
  """One layer's weights (a count) that n tokens read: all of a dense layer; of a mixture of
  experts the router and the experts at least one token is routed to, in expectation under
  uniform routing, E (1 - (1 - k / E)^n): every expert from a few hundred tokens on."""
  if not cfg.is_moe:
    return _projection_params(cfg) + cfg.ffn_params()
  e, k = cfg.n_experts, cfg.n_experts_per_token
  touched = e * (1.0 - (1.0 - k / e) ** max(int(n_tokens), 0))
  return (_projection_params(cfg) + cfg.d_model * e
          + touched * 3 * cfg.d_model * cfg.moe_ffn_dim)


def floors(cfg, n_prompt, positions_full, positions_sparse, n_reused, layer_threshold,
           ceil: dict, extra_qkv_tokens=0, sparse_q_positions=None) -> dict:
  """FLOPs and bytes a prefill cannot avoid, from what it computes.

  positions_full: positions computed in layers [0, T); positions_sparse: in [T, L) (the active
  set). Attention counts causally visible keys only (4 N H (p + 1) per query and layer);
  importance Q K^T of the Sparse-Q rows (2 N H (p + 1)); the linear layers 2 x params per token.
  Bytes: every layer's weights once (of a mixture of experts, the experts its tokens are routed
  to: layer_weights_read), every layer's K/V of the prompt read once, computed K/V written, reused
  K/V read and written once (assembly).
  """
  L, itemsize = cfg.n_layers, 2
  nh = cfg.n_heads * cfg.head_dim
  kv_row = 2 * cfg.n_kv_heads * cfg.head_dim * itemsize  # K and V of one token, one layer
  lp = layer_params(cfg)
  pf, ps = np.asarray(positions_full, np.float64), np.asarray(positions_sparse, np.float64)
  n_full, n_sparse = layer_threshold, L - layer_threshold
  flops = (n_full * (2 * lp * pf.size + 4 * nh * np.sum(pf + 1))
           + n_sparse * (2 * lp * ps.size + 4 * nh * np.sum(ps + 1))
           + 2 * cfg.d_model * cfg.vocab_size
           + 2 * cfg.d_model * 2 * cfg.n_kv_heads * cfg.head_dim * extra_qkv_tokens)
  if sparse_q_positions is not None and layer_threshold > 0:
    flops += 2 * nh * np.sum(np.asarray(sparse_q_positions, np.float64) + 1)
  weights = (n_full * layer_weights_read(cfg, pf.size) + n_sparse * layer_weights_read(cfg, ps.size)
             + cfg.d_model * cfg.vocab_size) * itemsize
  kv = (L * kv_row * n_prompt + kv_row * (n_full * pf.size + n_sparse * ps.size)
        + 2 * L * kv_row * n_reused)
  t_flops = flops / (ceil["matmul_tflops"] * 1e12)
  t_bytes = (weights + kv) / (ceil["copy_gbps"] * 1e9)
  return {"flops": float(flops), "bytes": float(weights + kv), "floor_ms": 1e3 * max(
      t_flops, t_bytes), "bound": "flops" if t_flops >= t_bytes else "bytes"}


def plan_floor(cfg, plan, reuse, n_prompt, ceil):
  """The floor of one prefill from its plan (None: every token computed in full)."""
  if plan is None:  # full prefill of every token
    pos = np.arange(n_prompt)
    return floors(cfg, n_prompt, pos, pos[:0], 0, cfg.n_layers, ceil)
  exact = plan.labels == 0
  non_exact = np.flatnonzero(~exact)
  t = plan.layer_threshold if plan.reused_positions.size else cfg.n_layers
  t = min(t, cfg.n_layers)
  active = np.union1d(np.flatnonzero(plan.sparse_q), plan.selected_positions)
  # CacheBlend and the default rule compute every reused token's K/V at layer T (the deviation)
  deviation = reuse.mode in ("cacheblend", "sparsex") and t > 0
  extra = plan.reused_positions.size if deviation else 0
  return floors(cfg, n_prompt, non_exact, active, plan.reused_positions.size, t, ceil,
                extra_qkv_tokens=extra, sparse_q_positions=np.flatnonzero(plan.sparse_q))


# ----------------------------------------------------------------------------------------------
# The anchor: plain dense prefill
# ----------------------------------------------------------------------------------------------

def time_dense(engine, n_prompt, runs, rng):
  cfg = engine.config
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  toks = [np.asarray([random_ids(rng, n_prompt, cfg.vocab_size)], np.int32) for _ in range(runs + 1)]
  t0 = time.perf_counter()
  jax.block_until_ready(dense_prefill(engine.params, toks[0], cfg=cfg, impl=impl))
  compile_s = time.perf_counter() - t0
  times = []
  for tk in toks[1:]:
    t0 = time.perf_counter()
    logits, kv = dense_prefill(engine.params, tk, cfg=cfg, impl=impl)
    np.asarray(logits)
    jax.block_until_ready(kv)
    times.append(time.perf_counter() - t0)
  return times, compile_s


def _n_tokens(req):
  return sum(len(s.content) for s in req.segments)


# ----------------------------------------------------------------------------------------------
# The timed runs
# ----------------------------------------------------------------------------------------------

class DeviceTimer:
  """Wraps the engine's pool runner: times each device program from dispatch to ready."""

  def __init__(self, engine):
    self.kv, self.orig, self.total = engine.kv, engine.kv.run, 0.0

    def run(program, *args, **static):
      t0 = time.perf_counter()
      out = self.orig(program, *args, **static)
      jax.block_until_ready((out, self.kv.arrays))
      self.total += time.perf_counter() - t0
      return out
    engine.kv.run = run

  def take(self) -> float:
    t, self.total = self.total, 0.0
    return t


def bench_workload(results, engine, timer, preset, workload: Workload, methods, runs, ceil):
  cfg = engine.config
  n_prompt = _n_tokens(workload.request(0))
  rows = []
  if DENSE in methods:
    times, compile_s = time_dense(engine, n_prompt, runs, np.random.default_rng(3))
    fl = plan_floor(cfg, None, None, n_prompt, ceil)
    rows.append({"method": DENSE, "ttft": times, "device": times, "compile_s": compile_s,
                 "n_exact": 0, "n_reused": 0, "n_recomputed": 0, **fl})
  known = dict(POLICIES)
  # Any rule's label names its configuration ("sparsex r=0.10 T=1"): timed in the order asked,
  # after the fixed policies (prefix last, as it writes the cache).
  extra = [(lb, mth.config_of(lb)) for lb in methods if lb not in known and lb != DENSE]
  policies = [p for p in POLICIES if p[0] != "prefix"] + extra + [p for p in POLICIES
                                                                 if p[0] == "prefix"]
  for label, reuse in policies:
    if label not in methods:
      continue
    try:
      reuse.resolve(cfg)
    except ValueError as e:  # e.g. T beyond this model's depth
      print(f"  {label}: skipped ({e})", flush=True)
      continue
    workload.setup(engine)  # a fresh cache state per method: none sees another's entries
    timer.take()
    t0 = time.perf_counter()
    engine.prefill_logits(workload.request(-1), reuse=reuse)  # compile and warm up
    compile_s = time.perf_counter() - t0
    timer.take()
    ttft, device, plan, recompiled = [], [], None, 0
    for i in range(runs):
      req = workload.request(i)  # built outside the timing (Segment() converts the ids)
      for _ in range(3):  # a run that compiled a new shape bucket is run again, compiled
        n_programs = engine.num_compilations
        t0 = time.perf_counter()
        _, plan = engine.prefill_logits(req, reuse=reuse, return_plan=True)
        wall = time.perf_counter() - t0
        if engine.num_compilations == n_programs:
          break
        recompiled += 1
        timer.take()
      ttft.append(wall)
      device.append(timer.take())
    fl = plan_floor(cfg, plan if label != "full" else None, reuse, n_prompt, ceil)
    rows.append({"method": label, "ttft": ttft, "device": device, "compile_s": compile_s,
                 "n_exact": int(np.sum(plan.labels == 0)),
                 "n_reused": int(plan.reused_positions.size),
                 "n_recomputed": int(plan.selected_positions.size), "recompiled": recompiled,
                 **fl})
    # one line as each method finishes: a run stopped mid-workload still leaves its numbers
    print(f"  {label}: ttft {1e3 * float(np.median(ttft)):.1f} ms, device "
          f"{1e3 * float(np.median(device)):.1f} ms, compile {compile_s:.0f} s", flush=True)
  anchor = next((r for r in rows if r["method"] == DENSE), None)
  for r in rows:
    med = 1e3 * float(np.median(r["ttft"]))
    dev = 1e3 * float(np.median(r["device"]))
    row = {"preset": preset, "workload": workload.name, "context": workload.context,
           "policy": r["method"], "n_prompt": n_prompt, "n_exact": r["n_exact"],
           "n_reused": r["n_reused"], "n_recomputed": r["n_recomputed"],
           "ttft_ms_median": med, "ttft_ms_p90": 1e3 * percentile(r["ttft"], 90),
           "device_ms_median": dev, "device_ms_p90": 1e3 * percentile(r["device"], 90),
           "host_ms_median": 1e3 * float(np.median(np.subtract(r["ttft"], r["device"]))),
           "ttft_ms_all": [1e3 * t for t in r["ttft"]], "compile_s": r["compile_s"],
           "flops": r["flops"], "bytes": r["bytes"], "floor_ms": r["floor_ms"],
           "bound": r["bound"], "floor_frac": r["floor_ms"] / dev,
           "recompiled_runs": r.get("recompiled", 0),
           "speedup_vs_dense": (1e3 * float(np.median(anchor["ttft"])) / med) if anchor
           else None, "runs": len(r["ttft"])}
    results["ttft"].append(row)
    print(f"  {preset} {workload.name:5s} {workload.context:6d} {row['policy']:32s} "
          f"ttft {med:8.1f} ms (p90 {row['ttft_ms_p90']:7.1f}; device {dev:7.1f}, host "
          f"{row['host_ms_median']:5.1f}) floor {row['floor_ms']:6.1f} ms "
          f"({100 * row['floor_frac']:3.0f}%, {row['bound']}) "
          f"x{row['speedup_vs_dense'] or 0:.2f} vs dense; compile {r['compile_s']:.0f} s",
          flush=True)


def decode_floor(cfg, batch: int, context: float, ceil: dict) -> dict:
  """The floor of one decode step of `batch` rows at `context` tokens each: every weight the step
  reads once (of a mixture of experts, the experts the batch's tokens are routed to), every row's
  K/V read once and its new K/V written; FLOPs of the matmuls and of attention over the context."""
  itemsize, n_layers = jnp.dtype(cfg.dtype).itemsize, cfg.n_layers
  kv_row = 2 * cfg.n_kv_heads * cfg.head_dim * itemsize
  weights = (n_layers * layer_weights_read(cfg, batch) + cfg.d_model * cfg.vocab_size) * itemsize
  kv = n_layers * kv_row * batch * (context + 1)
  flops = batch * (2 * n_layers * layer_params(cfg) + 2 * cfg.d_model * cfg.vocab_size
                   + 4 * n_layers * cfg.n_heads * cfg.head_dim * (context + 1))
  t_flops = flops / (ceil["matmul_tflops"] * 1e12)
  t_bytes = (weights + kv) / (ceil["copy_gbps"] * 1e9)
  return {"flops": float(flops), "bytes": float(weights + kv), "floor_ms": 1e3 * max(
      t_flops, t_bytes), "bound": "flops" if t_flops >= t_bytes else "bytes"}


def time_decode(engine, batch: int, context: int, steps: int, ceil: dict | None = None) -> dict:
  """Paged decode through the engine (continuous batching, the device loop): `batch` prompts of
  `context` random tokens, `steps` greedy tokens each, after a compiling run. The step time is the
  wall time past the first token, per step; with `ceil`, against decode_floor."""
  cfg = engine.config
  rng = np.random.default_rng(2)
  reqs = [sx.Request([sx.Segment(random_ids(rng, context, cfg.vocab_size))])
          for _ in range(batch)]
  sp = sx.SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
  engine.generate(reqs, sp, reuse=sx.Full())  # compile
  t0 = time.perf_counter()
  outs = engine.generate(reqs, sp, reuse=sx.Full())
  wall = time.perf_counter() - t0
  step_ms = 1e3 * (wall - max(o.stats.ttft_s for o in outs)) / steps
  kv_bytes = (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
              * batch * (context + steps / 2))
  row = {"preset": cfg.name, "batch": batch, "context": context, "steps": steps,
         "pool_gb": engine.layout.num_pages * engine.layout.bytes_per_page / 1e9,
         "decode_ms_per_step": step_ms, "kv_gb_per_s": kv_bytes / (step_ms * 1e-3) / 1e9}
  if ceil is not None:
    fl = decode_floor(cfg, batch, context + steps / 2, ceil)
    row.update(fl, floor_frac=fl["floor_ms"] / step_ms)
  return row
