"""Plain dense prefill + decode with a contiguous KV cache (no reuse, no pages).

The simplest correct generation path: the reference the paged engine is tested against, and a
fallback that needs nothing but the model. One jitted step serves prefill (T tokens) and decode
(T = 1): it writes the step's K/V at their absolute positions and attends over the whole cache.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig
from sparsex_jax.planner import bucket
from sparsex_jax.programs.options import COMPILER_OPTIONS
from sparsex_jax.prompt import check_prompt
from sparsex_jax.sampling import (SamplingParams, finish, is_finished, resolve_stop_ids,
                                 sample_step)


def init_cache(cfg: ModelConfig, batch: int, max_len: int):
  shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, cfg.jnp_dtype), "v": jnp.zeros(shape, cfg.jnp_dtype)}


@functools.partial(jax.jit, static_argnums=(1,), donate_argnums=(2,),
                   compiler_options=COMPILER_OPTIONS)
def dense_step(params, cfg: ModelConfig, cache, tokens, positions, kv_len, last_index):
  """Runs tokens [B, T] at positions [B, T]; returns (logits [B, V] at last_index [B], cache).

  Padding tokens carry position max_len (out of range): their K/V writes are dropped.
  """
  b = tokens.shape[0]
  rows = jnp.arange(b)[:, None]

  def one_layer(x, xs):
    layer_params, k_cache, v_cache = xs
    q, k, v = llama.layer_qkv(layer_params, cfg, x, positions)
    k_cache = k_cache.at[rows, positions].set(k, mode="drop")
    v_cache = v_cache.at[rows, positions].set(v, mode="drop")
    attn = llama.dense_attention(q, k_cache, v_cache, positions, kv_len, cfg.sm_scale)
    return llama.layer_output(layer_params, cfg, x, attn), (k_cache, v_cache)

  x, (k_all, v_all) = jax.lax.scan(
      one_layer, llama.embed(params, tokens), (params["layers"], cache["k"], cache["v"]))
  x_last = jnp.take_along_axis(x, last_index[:, None, None], axis=1)[:, 0]
  return llama.logits(params, cfg, x_last), {"k": k_all, "v": v_all}


def generate(params, cfg: ModelConfig, prompt_ids, sampling: SamplingParams,
             stop_ids=()) -> tuple[list[int], dict]:
  """Generates from one prompt; returns (new token ids, stats with ttft_s and decode_s)."""
  ids = check_prompt(cfg, prompt_ids, sampling.max_new_tokens)
  n = ids.size
  max_len = bucket(n + sampling.max_new_tokens)
  t_pad = bucket(n)
  tokens = np.zeros((1, t_pad), np.int32)
  tokens[0, :n] = ids
  positions = np.full((1, t_pad), max_len, np.int32)  # padding: out-of-range, dropped
  positions[0, :n] = np.arange(n)
  stops = resolve_stop_ids(sampling, stop_ids)
  temperature = np.array([sampling.temperature], np.float32)
  top_p = np.array([sampling.top_p], np.float32)
  seeds = np.array([sampling.seed], np.uint32)

  start = time.perf_counter()
  cache = init_cache(cfg, 1, max_len)
  logits, cache = dense_step(params, cfg, cache, tokens, positions, np.array([n], np.int32),
                             np.array([n - 1], np.int32))
  out = [int(sample_step(logits, temperature, top_p, seeds, 0)[0])]
  ttft = time.perf_counter() - start
  pos = n
  while not is_finished(out, stops, sampling.max_new_tokens):
    logits, cache = dense_step(params, cfg, cache, np.array([[out[-1]]], np.int32),
                               np.array([[pos]], np.int32), np.array([pos + 1], np.int32),
                               np.zeros((1,), np.int32))
    out.append(int(sample_step(logits, temperature, top_p, seeds, len(out))[0]))
    pos += 1
  out, _ = finish(out, stops)
  return out, {"ttft_s": ttft, "decode_s": time.perf_counter() - start - ttft, "n_prompt": n}
