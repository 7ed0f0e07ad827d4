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

import jax
import jax.numpy as jnp
import numpy as np

import sparsex_jax as sx
from models import llama
from models.config import get_config
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

  def one_layer(x, layer_params):
    q, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
    attn = jax.nn.dot_product_attention(q, k, v, scale=cfg.sm_scale, is_causal=True,
                                        implementation=impl)
    return llama.layer_output(layer_params, cfg, x, attn), (k, v)

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
