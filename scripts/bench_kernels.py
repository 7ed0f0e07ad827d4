"""Benchmark of pallas_kernels on one GPU, in one call: writes JSON, prints a table last.

  PYTHONUNBUFFERED=1 python3 scripts/bench_kernels.py --out "$OUT"
  python scripts/bench_kernels.py --report bench_kernels.json   # docs table + PNG

Measures, side by side in the same run (Llama-3-8B attention heads: 32 q, 8 kv,
dim 128; bf16; page size 16; pages shuffled in the pool):
  ceilings     the card's bf16 matmul rate (8192^3) and elementwise copy GB/s
               (bytes read + written);
  sparse       sparse-query attention, contexts 4K-32K, active fractions
               5-30% (uniformly random sorted positions plus the last token):
               our kernel; the jnp reference (where its [N, Tq, L] f32 logits
               fit); cuDNN (jax.nn.dot_product_attention, implementation=
               "cudnn") on the same queries with an explicit [Tq, L] mask; and
               cuDNN dense causal over all positions, the per-FLOP yardstick;
  importance   Sparse-Q importance over the same problems (QK^T FLOPs only);
  assemble     the one-pass assembly of reused K/V against XLA's gather/scatter;
  write        one layer's K/V write (the prefill's) against XLA's scatter;
  few          a few query rows over many keys (the key split);
  mask         cuDNN causal attention with and without sequence lengths;
  pool         the sparse-query kernel on a one-layer and on engine-sized pools;
  mgpu         the Mosaic GPU sparse-query kernel (attention_mgpu) beside the Triton
               one and cuDNN dense causal, on the sparse problems, over a few
               (block_kv, n_slots, key_splits) configs; its error against the reference (or
               against the Triton kernel where the reference does not fit);
  decode       batch 1-64 x context 2K-32K: our kernel, the jnp reference and
               jax.experimental.pallas.ops.gpu.paged_attention. Small cases
               are replicated over R disjoint page sets ("layers") inside one
               jitted step so the data exceeds L2 and launch gaps amortise.
Useful FLOPs count only visible (causal) keys: 4 * H * N * sum_t(pos_t + 1)
for attention (QK^T and PV), half that for importance. Decode bytes are the
K and V bytes of the visible keys (the floor). Times are medians of 5 timed
rounds after warm-up, each round long enough (>= 30 ms) that dispatch is
hidden behind queued device work.
"""

import argparse
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

N_HEADS, N_KV, HEAD_DIM, PAGE = 32, 8, 128, 16
# --smoke (CPU): kernels in interpret mode, tiny shapes, to check the script.
KERNEL_KW = {}
DECODE_MIN_BYTES = 512e6
SWEEP_CTX = 8192


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def _block(x):
  import jax
  jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)


def bench(fn, *args, min_round_s=0.03, rounds=5):
  """Median seconds per call of fn(*args) after compile + warm-up."""
  _block(fn(*args))
  t0 = time.perf_counter()
  _block(fn(*args))
  one = time.perf_counter() - t0
  n = max(1, min(2000, int(min_round_s / max(one, 1e-6))))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn(*args)
    _block(out)
    times.append((time.perf_counter() - t0) / n)
  return statistics.median(times)


def safe(label, fn, *args, **kw):
  """Runs a benchmark, turning failures into a recorded error (the run goes on)."""
  try:
    return fn(*args, **kw), None
  except Exception as e:  # noqa: BLE001  (a failed variant must not end the run)
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    print(f"  [{label}] FAILED {msg}", flush=True)
    traceback.print_exc(limit=3)
    return None, msg


# ----------------------------------------------------------------------------
# Environment and ceilings
# ----------------------------------------------------------------------------


def environment():
  import jax
  info = dict(jax=jax.__version__, python=platform.python_version(),
              backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()],
              device_kind=jax.devices()[0].device_kind,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat())
  apis = {}
  for mod, names in (
      ("jax.experimental.pallas.triton", ("CompilerParams", "dot", "load")),
      ("jax.experimental.pallas.mosaic_gpu",
       ("kernel", "wgmma", "emit_pipeline", "CompilerParams",
        "copy_gmem_to_smem")),
      ("jax.experimental.pallas.gpu", ("TritonCompilerParams",)),
      ("jax.experimental.pallas.ops.gpu.paged_attention", ("paged_attention",)),
      ("jax.experimental.pallas.ops.gpu.attention_mgpu", ("attention",)),
  ):
    try:
      m = __import__(mod, fromlist=["_"])
      apis[mod] = {n: hasattr(m, n) for n in names}
    except Exception as e:  # noqa: BLE001
      apis[mod] = f"import failed: {type(e).__name__}: {e}"
  info["pallas_apis"] = apis
  return info


def ceilings():
  import jax
  import jax.numpy as jnp
  key = jax.random.key(0)
  n = 8192
  a = jax.random.normal(key, (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda x, y: x @ y)
  t = bench(mm, a, b)
  tflops = 2 * n**3 / t / 1e12
  x = jax.random.normal(key, (256 * 2**20,), jnp.float32)  # 1 GiB
  cp = jax.jit(lambda v: v + 1.0)
  tc = bench(cp, x)
  gbs = 2 * x.size * 4 / tc / 1e9
  del a, b, x
  return dict(matmul_bf16_tflops=tflops, copy_gbs=gbs, matmul_n=n,
              copy_bytes=2 * 256 * 2**20 * 4)


# ----------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------


def make_pool(rng, n_pages, dtype):
  import jax.numpy as jnp
  shape = (N_KV, n_pages, PAGE, HEAD_DIM)
  k = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  v = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
  return k, v


def sparse_problem(ctx, frac, seed=0):
  """A random sorted subset of frac * ctx positions (the last one included) as queries."""
  rng = np.random.default_rng(seed)
  n_q = max(1, int(round(frac * ctx)))
  pos = np.sort(rng.choice(ctx - 1, size=n_q - 1, replace=False))
  return query_problem(ctx, np.concatenate([pos, [ctx - 1]]).astype(np.int32), rng)


def query_problem(ctx, pos, rng):
  """One ctx-token request in a shuffled bf16 pool, queries at positions pos."""
  import jax.numpy as jnp
  max_pages = ctx // PAGE
  n_pages = max_pages + 16
  k, v = make_pool(rng, n_pages, jnp.bfloat16)
  table = jnp.asarray(rng.permutation(n_pages)[:max_pages][None], jnp.int32)
  q = jnp.asarray(rng.standard_normal((1, pos.size, N_HEADS, HEAD_DIM), np.float32),
                  jnp.bfloat16)
  return dict(q=q, q_pos=jnp.asarray(pos[None]), k=k, v=v, table=table,
              kv_len=jnp.asarray([ctx], jnp.int32), pos_np=pos)


def attn_flops(pos_np):
  return 4.0 * HEAD_DIM * N_HEADS * float(np.sum(pos_np.astype(np.float64) + 1))


# ----------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------

SWEEP_ATTN = [  # (block_m, block_k, num_warps, num_stages, longest_first)
    (64, 64, 4, 2, False), (64, 64, 4, 2, True), (64, 64, 4, 3, True),
    (64, 128, 4, 2, True), (128, 64, 8, 2, True), (128, 128, 8, 2, True),
    (128, 64, 4, 3, True), (128, 64, 4, 2, True),
]
SWEEP_IMP = [  # (block_m, block_k, num_warps, num_stages)
    (64, 64, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2), (128, 128, 8, 2),
]
SWEEP_PROBLEMS = ((8192, 0.15), (32768, 0.05), (32768, 0.15))  # the last: T=2's sparse layers
SWEEP_DECODE = [  # (block_k, num_warps, num_stages)
    (64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 3), (32, 4, 4),
]


def cudnn_dense(ctx):
  import jax
  import jax.numpy as jnp
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((1, ctx, N_HEADS, HEAD_DIM), np.float32),
                  jnp.bfloat16)
  k = jnp.asarray(rng.standard_normal((1, ctx, N_KV, HEAD_DIM), np.float32),
                  jnp.bfloat16)
  v = jnp.asarray(rng.standard_normal((1, ctx, N_KV, HEAD_DIM), np.float32),
                  jnp.bfloat16)
  f = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                implementation="cudnn"))
  t = bench(f, q, k, v)
  flops = 4.0 * HEAD_DIM * N_HEADS * ctx * (ctx + 1) / 2
  return dict(ctx=ctx, ms=t * 1e3, tflops=flops / t / 1e12)


def cudnn_sparse_masked(p):
  """cuDNN on the same sparse queries: contiguous K/V, explicit [Tq, L] mask."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels._paged import gather_kv
  k = jnp.swapaxes(gather_kv(p["k"], p["table"]), 1, 2)  # [1, L, K, H]
  v = jnp.swapaxes(gather_kv(p["v"], p["table"]), 1, 2)
  ctx = k.shape[1]
  mask = (jnp.arange(ctx)[None, :] <= p["q_pos"][0][:, None])[None, None]
  f = jax.jit(functools.partial(jax.nn.dot_product_attention,
                                implementation="cudnn"))
  return bench(lambda a, b, c, m: f(a, b, c, mask=m), p["q"], k, v, mask)


def section_sparse(contexts, fracs, sweep, results):
  import jax
  from pallas_kernels import (paged_attention, paged_attention_reference,
                              sparse_q_importance,
                              sparse_q_importance_reference)
  scale = 1.0 / math.sqrt(HEAD_DIM)
  dense = {}
  for ctx in contexts:
    r, err = safe(f"cudnn dense {ctx}", cudnn_dense, ctx)
    dense[ctx] = r
    print(f"cudnn dense causal ctx={ctx}: {r}", flush=True)
  results["cudnn_dense"] = list(dense.values())

  # Block-size sweep on two problems; the config with the smallest summed
  # time relative to each problem's best is used everywhere.
  def pick(rows, n_prob):
    ok = {}
    for r in rows:
      if r["ms"]:
        ok.setdefault(tuple(r["cfg"]), []).append(r["ms"])
    best = [min(r["ms"] for r in rows if r["ms"] and r["problem"] == i)
            for i in range(n_prob)] if ok else []
    full = {c: v for c, v in ok.items() if len(v) == n_prob}
    if not full:
      return None
    return min(full, key=lambda c: sum(t / b for t, b in zip(full[c], best)))

  attn_cfg, imp_cfg = SWEEP_ATTN[1], SWEEP_IMP[0]
  if sweep:
    rows, irows = [], []
    for pi, (ctx, frac) in enumerate(SWEEP_PROBLEMS):
      p = sparse_problem(ctx, frac)
      fl = attn_flops(p["pos_np"])
      args = (p["q"], p["q_pos"], p["k"], p["v"], p["table"], p["kv_len"])
      for cfg in SWEEP_ATTN:
        bm, bk, nw, ns, lf = cfg
        f = jax.jit(functools.partial(
            paged_attention, sm_scale=scale, block_m=bm, block_k=bk,
            num_warps=nw, num_stages=ns, longest_first=lf, **KERNEL_KW))
        t, err = safe(f"sweep {cfg}", bench, f, *args)
        rows.append(dict(problem=pi, ctx=ctx, frac=frac, cfg=cfg,
                         ms=t and t * 1e3, tflops=t and fl / t / 1e12,
                         error=err))
        print(f"sweep attn {ctx} {frac} {cfg}: {rows[-1]}", flush=True)
      lse = jax.jit(functools.partial(paged_attention, sm_scale=scale,
                                      **KERNEL_KW))(*args)[1]
      iargs = (p["q"], p["q_pos"], p["q_pos"] >= 0, p["k"], p["table"],
               p["kv_len"], lse)
      for cfg in SWEEP_IMP:
        bm, bk, nw, ns = cfg
        f = jax.jit(functools.partial(
            sparse_q_importance, sm_scale=scale, block_m=bm, block_k=bk,
            num_warps=nw, num_stages=ns, **KERNEL_KW))
        t, err = safe(f"sweep imp {cfg}", bench, f, *iargs)
        irows.append(dict(problem=pi, ctx=ctx, frac=frac, cfg=cfg,
                          ms=t and t * 1e3, tflops=t and fl / 2 / t / 1e12,
                          error=err))
        print(f"sweep imp {ctx} {frac} {cfg}: {irows[-1]}", flush=True)
    results["sweep_attention"] = rows
    results["sweep_importance"] = irows
    attn_cfg = pick(rows, len(SWEEP_PROBLEMS)) or attn_cfg
    imp_cfg = pick(irows, len(SWEEP_PROBLEMS)) or imp_cfg
  results["attention_cfg"] = attn_cfg
  results["importance_cfg"] = imp_cfg
  print("picked", attn_cfg, imp_cfg, flush=True)
  bm, bk, nw, ns, lf = attn_cfg
  kern = jax.jit(functools.partial(paged_attention, sm_scale=scale, block_m=bm,
                                   block_k=bk, num_warps=nw, num_stages=ns,
                                   longest_first=lf, **KERNEL_KW))
  ref = jax.jit(functools.partial(paged_attention_reference, sm_scale=scale))
  bm, bk, nw, ns = imp_cfg
  imp_k = jax.jit(functools.partial(sparse_q_importance, sm_scale=scale,
                                    block_m=bm, block_k=bk, num_warps=nw,
                                    num_stages=ns, **KERNEL_KW))
  imp_r = jax.jit(functools.partial(sparse_q_importance_reference,
                                    sm_scale=scale))

  rows = []
  for ctx in contexts:
    for frac in fracs:
      p = sparse_problem(ctx, frac)
      args = (p["q"], p["q_pos"], p["k"], p["v"], p["table"], p["kv_len"])
      n_q = p["q"].shape[1]
      fl = attn_flops(p["pos_np"])
      row = dict(ctx=ctx, frac=frac, n_q=n_q, useful_gflop=fl / 1e9)
      t, row["kernel_error"] = safe("kernel", bench, kern, *args)
      row["kernel_ms"] = t and t * 1e3
      row["kernel_tflops"] = t and fl / t / 1e12
      logits_bytes = 4.0 * N_HEADS * n_q * ctx
      if logits_bytes <= 4e9:
        t, row["ref_error"] = safe("ref", bench, ref, *args)
        row["ref_ms"] = t and t * 1e3
        row["ref_tflops"] = t and fl / t / 1e12
      else:
        row["ref_ms"] = None
        row["ref_error"] = f"skipped: logits {logits_bytes / 1e9:.0f} GB"
      t, row["cudnn_masked_error"] = safe("cudnn masked", cudnn_sparse_masked,
                                          p)
      row["cudnn_masked_ms"] = t and t * 1e3
      row["cudnn_masked_tflops"] = t and fl / t / 1e12
      d = dense.get(ctx)
      row["cudnn_dense_tflops"] = d and d["tflops"]
      if d and row["kernel_tflops"]:
        row["kernel_vs_cudnn_dense"] = row["kernel_tflops"] / d["tflops"]
      # Importance: all active rows are Sparse-Q rows here (QK^T FLOPs only).
      out_lse, _ = safe("lse", kern, *args)
      if out_lse is not None:
        lse = out_lse[1]
        is_sp = p["q_pos"] >= 0
        iargs = (p["q"], p["q_pos"], is_sp, p["k"], p["table"], p["kv_len"],
                 lse)
        t, row["imp_error"] = safe("imp", bench, imp_k, *iargs)
        row["imp_ms"] = t and t * 1e3
        row["imp_tflops"] = t and fl / 2 / t / 1e12
        if logits_bytes <= 4e9:
          t, row["imp_ref_error"] = safe("imp ref", bench, imp_r, *iargs)
          row["imp_ref_ms"] = t and t * 1e3
      rows.append(row)
      print("sparse", {k: (round(v, 3) if isinstance(v, float) else v)
                       for k, v in row.items()}, flush=True)
  results["sparse"] = rows


# (block_kv, n_slots, key_splits, token_major); None: the kernel's own choice (key splits only
# for few row blocks; token-major q and out where the head group allows)
MGPU_CONFIGS = ((128, 2, None, None), (128, 2, 1, None), (128, 2, None, False), (64, 2, None, None))


def rel_err(x, ref):
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def device_kernels(fn, args, out_dir, calls=20):
  """Where fn's device time goes: {GPU kernel name: us per call}, from a jax.profiler trace."""
  import jax
  from sparsex_jax.research.profiling import kernel_times
  _block(fn(*args))
  with jax.profiler.trace(out_dir):
    for _ in range(calls):
      out = fn(*args)
    _block(out)
  totals, _ = kernel_times(out_dir)
  return {name: us / calls for name, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def section_mgpu(contexts, fracs, results, profile_dir=None, configs=MGPU_CONFIGS):
  """The Mosaic GPU kernel against the Triton kernel and cuDNN dense, per useful FLOP.

  profile_dir: also trace the default config on each problem and keep its kernels' device times
  (the Mosaic GPU kernel apart from the XLA work around it: row grouping, the key-split merge).
  """
  import jax
  import jax.numpy as jnp
  from pallas_kernels import paged_attention, paged_attention_reference
  from pallas_kernels.attention_mgpu import paged_attention_mgpu
  scale = 1.0 / math.sqrt(HEAD_DIM)
  dense = {r["ctx"]: r for r in results.get("cudnn_dense") or [] if r}
  rows = []
  for ctx in contexts:
    if ctx not in dense:
      dense[ctx], _ = safe(f"cudnn dense {ctx}", cudnn_dense, ctx)
    for frac in fracs:
      p = sparse_problem(ctx, frac)
      args = (p["q"], p["q_pos"], p["k"], p["v"], p["table"], p["kv_len"])
      fl = attn_flops(p["pos_np"])
      row = dict(ctx=ctx, frac=frac, n_q=int(p["q"].shape[1]), useful_gflop=fl / 1e9,
                 cudnn_dense_tflops=dense[ctx] and dense[ctx]["tflops"])
      triton = jax.jit(functools.partial(paged_attention, sm_scale=scale))
      t, row["triton_error"] = safe("triton", bench, triton, *args)
      row["triton_ms"] = t and t * 1e3
      row["triton_tflops"] = t and fl / t / 1e12
      if 4.0 * N_HEADS * row["n_q"] * ctx <= 4e9:
        want = jax.jit(functools.partial(paged_attention_reference, sm_scale=scale))(*args)
        row["checked_against"] = "reference"
      else:
        want = triton(*args)
        row["checked_against"] = "triton"
      want_out = np.asarray(jnp.asarray(want[0], jnp.float32))
      want_lse = np.asarray(want[1])
      real = np.asarray(p["q_pos"]) >= 0
      row["configs"] = []
      for block_kv, n_slots, key_splits, token_major in configs:
        f = jax.jit(functools.partial(paged_attention_mgpu, sm_scale=scale, block_kv=block_kv,
                                      n_slots=n_slots, key_splits=key_splits,
                                      token_major=token_major))
        cfg = dict(block_kv=block_kv, n_slots=n_slots, key_splits=key_splits,
                   token_major=token_major)
        got, cfg["error"] = safe(f"mgpu {cfg}", f, *args)
        if got is not None:
          out = np.asarray(jnp.asarray(got[0], jnp.float32))
          cfg["nan"] = bool(np.isnan(out).any())
          cfg["out_rel_err"] = rel_err(out, want_out)
          cfg["lse_rel_err"] = rel_err(np.asarray(got[1])[real], want_lse[real])
          t, cfg["error"] = safe(f"mgpu {cfg}", bench, f, *args)
          cfg["ms"] = t and t * 1e3
          cfg["tflops"] = t and fl / t / 1e12
          if t and row["cudnn_dense_tflops"]:
            cfg["vs_cudnn_dense"] = cfg["tflops"] / row["cudnn_dense_tflops"]
        row["configs"].append(cfg)
        print("mgpu", ctx, frac, cfg, flush=True)
      if profile_dir:
        f = jax.jit(functools.partial(paged_attention_mgpu, sm_scale=scale))
        row["profile_us"], row["profile_error"] = safe(
            "profile", device_kernels, f, args, os.path.join(profile_dir, f"{ctx}_{frac}"))
        print("mgpu profile", ctx, frac, row["profile_us"], flush=True)
      ok = [c for c in row["configs"] if c.get("ms")]
      if ok:
        best = min(ok, key=lambda c: c["ms"])
        row["mgpu_best"] = best
        if row["triton_ms"]:
          row["mgpu_speedup_vs_triton"] = row["triton_ms"] / best["ms"]
      rows.append(row)
      print("mgpu row", {k: v for k, v in row.items() if k != "configs"}, flush=True)
  results["mgpu"] = rows


def few_query_problem(ctx, n_q, seed=0):
  """The last n_q positions of a ctx-token request as queries (naive reuse: the new tokens)."""
  return query_problem(ctx, np.arange(ctx - n_q, ctx, dtype=np.int32),
                       np.random.default_rng(seed))


def section_few(contexts, n_queries, results):
  """Few queries over many keys (naive reuse's 32 new tokens, the Sparse-Q probe): K/V-bytes
  bound. The kernel with key splits (the default, choose_key_splits) against none (key_splits=1),
  and the byte floor: every K/V byte read once at the measured copy bandwidth."""
  import jax
  from pallas_kernels._paged import choose_key_splits, default_block_m
  from pallas_kernels import paged_attention
  scale = 1.0 / math.sqrt(HEAD_DIM)
  copy_gbps = (results.get("ceilings") or {}).get("copy_gbs")
  rows = []
  for ctx in contexts:
    for n_q in n_queries:
      p = few_query_problem(ctx, n_q)
      args = (p["q"], p["q_pos"], p["k"], p["v"], p["table"], p["kv_len"])
      kv_bytes = 2.0 * ctx * N_KV * HEAD_DIM * 2
      rows_g = n_q * (N_HEADS // N_KV)
      n_blk = -(-rows_g // default_block_m(rows_g))
      row = dict(ctx=ctx, n_q=n_q, kv_gb=kv_bytes / 1e9,
                 auto_splits=choose_key_splits(1, N_KV, n_blk, ctx, 64),
                 floor_ms=copy_gbps and kv_bytes / (copy_gbps * 1e9) * 1e3)
      for name, splits in (("no_split", 1), ("split", None)):
        f = jax.jit(functools.partial(paged_attention, sm_scale=scale, key_splits=splits,
                                      **KERNEL_KW))
        t, row[f"{name}_error"] = safe(f"few {name}", bench, f, *args)
        row[f"{name}_ms"] = t and t * 1e3
        row[f"{name}_gbps"] = t and kv_bytes / t / 1e9
      rows.append(row)
      print("few", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()},
            flush=True)
  results["few_query"] = rows


def decode_problem(batch, ctx, min_bytes=None, seed=0):
  """R disjoint page sets of one pool, R chosen so R * K/V bytes >= min_bytes."""
  import jax.numpy as jnp
  rng = np.random.default_rng(seed)
  min_bytes = DECODE_MIN_BYTES if min_bytes is None else min_bytes
  max_pages = ctx // PAGE
  kv_bytes = batch * ctx * N_KV * HEAD_DIM * 2 * 2
  reps = int(max(1, min(32, math.ceil(min_bytes / kv_bytes))))
  n_pages = reps * batch * max_pages
  k, v = make_pool(rng, n_pages, jnp.bfloat16)
  perm = rng.permutation(n_pages).reshape(reps, batch, max_pages)
  tables = [jnp.asarray(perm[r], jnp.int32) for r in range(reps)]
  qs = [jnp.asarray(rng.standard_normal((batch, N_HEADS, HEAD_DIM), np.float32),
                    jnp.bfloat16) for _ in range(reps)]
  kv_len = jnp.full((batch,), ctx, jnp.int32)
  return dict(k=k, v=v, tables=tables, qs=qs, kv_len=kv_len, reps=reps,
              bytes=kv_bytes)


def replicated(op):
  """jit of a step that runs op once per page set (one 'layer' each)."""
  import jax

  @jax.jit
  def step(qs, k, v, tables, kv_len):
    return [op(q, k, v, t, kv_len) for q, t in zip(qs, tables)]
  return step


def section_decode(batches, contexts, sweep, results):
  from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
  from pallas_kernels import (paged_decode_attention,
                              paged_decode_attention_reference)
  scale = 1.0 / math.sqrt(HEAD_DIM)

  def ours(cfg):
    bk, nw, ns = cfg
    return replicated(functools.partial(
        paged_decode_attention, sm_scale=scale, block_k=bk, num_warps=nw,
        num_stages=ns, **KERNEL_KW))

  best = SWEEP_DECODE[0]
  if sweep:
    p = decode_problem(32, SWEEP_CTX)
    rows = []
    for cfg in SWEEP_DECODE:
      t, err = safe(f"sweep {cfg}", bench, ours(cfg), p["qs"], p["k"], p["v"],
                    p["tables"], p["kv_len"])
      t = t and t / p["reps"]
      rows.append(dict(cfg=cfg, ms=t and t * 1e3, gbs=t and p["bytes"] / t / 1e9,
                       error=err))
      print(f"sweep decode {cfg}: {rows[-1]}", flush=True)
    results["sweep_decode"] = rows
    ok = [r for r in rows if r["ms"]]
    if ok:
      best = min(ok, key=lambda r: r["ms"])["cfg"]
  results["decode_cfg"] = best
  kern = ours(best)
  ref = replicated(functools.partial(paged_decode_attention_reference,
                                     sm_scale=scale))

  def jax_op(q, k, v, t, kv_len):
    # jax's kernel takes the softmax scale folded into q; its block_tables
    # must split evenly into k_splits partitions.
    pages = t.shape[1]
    splits = 16 if pages % 16 == 0 else 1
    return jax_pa.paged_attention(q * scale, k, v, t, kv_len, k_splits=splits,
                                  pages_per_compute_block=min(8, pages // splits),
                                  **KERNEL_KW)
  jx = replicated(jax_op)

  rows = []
  for ctx in contexts:
    for batch in batches:
      p = decode_problem(batch, ctx)
      args = (p["qs"], p["k"], p["v"], p["tables"], p["kv_len"])
      row = dict(batch=batch, ctx=ctx, reps=p["reps"], mbytes=p["bytes"] / 1e6)
      for name, fn in (("kernel", kern), ("ref", ref), ("jax_pallas", jx)):
        t, row[f"{name}_error"] = safe(name, bench, fn, *args)
        t = t and t / p["reps"]
        row[f"{name}_us"] = t and t * 1e6
        row[f"{name}_gbs"] = t and p["bytes"] / t / 1e9
      rows.append(row)
      print("decode", {k: (round(v, 2) if isinstance(v, float) else v)
                       for k, v in row.items()}, flush=True)
      del p
  results["decode"] = rows


# ----------------------------------------------------------------------------
# Report (tables and plot, run where matplotlib is)
# ----------------------------------------------------------------------------


def fmt(x, nd=1):
  return "-" if x is None else f"{x:.{nd}f}"


def tables(res):
  out = []
  c = res.get("ceilings", {})
  out.append(f"Ceilings measured in the run: bf16 matmul {fmt(c.get('matmul_bf16_tflops'))} "
             f"TFLOP/s, copy {fmt(c.get('copy_gbs'), 0)} GB/s (read + write).\n")
  if res.get("sparse"):
    out.append("Sparse-query attention (useful TFLOP/s; batch 1, 32 q / 8 kv heads, dim 128, bf16, page 16):\n")
    out.append("| context | active | queries | kernel ms | kernel TFLOP/s | jnp ref TFLOP/s | cuDNN masked TFLOP/s | cuDNN dense causal TFLOP/s | kernel / cuDNN dense | importance ms | importance TFLOP/s | importance ref ms |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["sparse"]:
      out.append(
          f"| {r['ctx']} | {r['frac']:.0%} | {r['n_q']} | {fmt(r.get('kernel_ms'), 2)} | "
          f"{fmt(r.get('kernel_tflops'))} | {fmt(r.get('ref_tflops'))} | "
          f"{fmt(r.get('cudnn_masked_tflops'))} | {fmt(r.get('cudnn_dense_tflops'))} | "
          f"{fmt(r.get('kernel_vs_cudnn_dense') and 100 * r['kernel_vs_cudnn_dense'], 0)}% | "
          f"{fmt(r.get('imp_ms'), 2)} | {fmt(r.get('imp_tflops'))} | {fmt(r.get('imp_ref_ms'), 2)} |")
    out.append("")
  if res.get("mgpu"):
    out.append("Sparse-query attention, Mosaic GPU kernel (attention_mgpu) against the Triton "
               "kernel and cuDNN dense causal (useful TFLOP/s; the kernel's default config: "
               "block_kv 128, 2 slots, key splits chosen by the kernel; best of the configs tried "
               "in brackets):\n")
    out.append("| context | active | queries | Triton ms | Mosaic GPU ms | speed-up | "
               "Mosaic TFLOP/s | cuDNN dense TFLOP/s | Mosaic / cuDNN dense | "
               "(best config, / cuDNN) | rel. error |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["mgpu"]:
      d = (r.get("configs") or [{}])[0]
      b = r.get("mgpu_best") or {}
      dense = r.get("cudnn_dense_tflops")
      out.append(
          f"| {r['ctx']} | {r['frac']:.0%} | {r['n_q']} | {fmt(r.get('triton_ms'), 3)} | "
          f"{fmt(d.get('ms'), 3)} | "
          f"{fmt(d.get('ms') and r.get('triton_ms') and r['triton_ms'] / d['ms'], 2)}x | "
          f"{fmt(d.get('tflops'))} | {fmt(dense)} | "
          f"{fmt(d.get('tflops') and dense and 100 * d['tflops'] / dense, 0)}% | "
          f"({b.get('block_kv')}, {b.get('n_slots')}, {b.get('key_splits') or 'auto'}"
          f"{', grouped rows' if b.get('token_major') is False else ''}"
          f"{', balanced splits' if b.get('balanced_splits') else ''}): "
          f"{fmt(b.get('vs_cudnn_dense') and 100 * b['vs_cudnn_dense'], 0)}% | "
          f"{fmt(d.get('out_rel_err'), 4)} vs {r.get('checked_against')} |")
    out.append("")
    for r in res["mgpu"]:
      if r.get("profile_us"):
        top = sorted(r["profile_us"].items(), key=lambda kv: -kv[1])
        total = sum(us for _, us in top)
        out.append(f"- {r['ctx']}, {r['frac']:.0%}: device kernels {total:.1f} us per call: " +
                   ", ".join(f"{name[:48]} {us:.1f}" for name, us in top[:6]))
    out.append("")
  if res.get("few_query"):
    out.append("Few queries over many keys (the last n queries of a request; K/V bytes bound; floor: "
               "every K/V byte read once at the copy bandwidth):\n")
    out.append("| context | queries | K/V MB | splits | no split ms | split ms | speed-up | floor ms | split / floor |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in res["few_query"]:
      a, b, fl = r.get("no_split_ms"), r.get("split_ms"), r.get("floor_ms")
      out.append(
          f"| {r['ctx']} | {r['n_q']} | {fmt(r['kv_gb'] * 1e3, 0)} | {r['auto_splits']} | "
          f"{fmt(a, 3)} | {fmt(b, 3)} | {fmt(a and b and a / b, 2)}x | {fmt(fl, 3)} | "
          f"{fmt(b and fl and b / fl, 1)}x |")
    out.append("")
  if res.get("decode"):
    cp = c.get("copy_gbs")
    out.append("Paged decode attention (GB/s of K/V bytes read; 32 q / 8 kv heads, dim 128, bf16, page 16):\n")
    out.append("| batch | context | K/V MB | kernel us | kernel GB/s | % of copy | jnp ref GB/s | jax Pallas paged_attention GB/s |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in res["decode"]:
      pct = r.get("kernel_gbs") and cp and 100 * r["kernel_gbs"] / cp
      out.append(
          f"| {r['batch']} | {r['ctx']} | {fmt(r['mbytes'], 0)} | {fmt(r.get('kernel_us'), 0)} | "
          f"{fmt(r.get('kernel_gbs'), 0)} | {fmt(pct, 0)}% | {fmt(r.get('ref_gbs'), 0)} | "
          f"{fmt(r.get('jax_pallas_gbs'), 0)} |")
    out.append("")
  return "\n".join(out)


def plot_mgpu(res, path):
  """Useful TFLOP/s against context: Mosaic GPU (default config), Triton, cuDNN dense causal."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = res.get("mgpu") or []
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for i, frac in enumerate(sorted({r["frac"] for r in rows})):
    rs = [r for r in rows if r["frac"] == frac]
    color = f"C{i}"
    mosaic = [(r.get("configs") or [{}])[0].get("tflops") or 0 for r in rs]
    ax.plot([r["ctx"] for r in rs], mosaic, "o-", color=color,
            label=f"Mosaic GPU, {frac:.0%} active")
    ax.plot([r["ctx"] for r in rs], [r.get("triton_tflops") or 0 for r in rs], "x--",
            color=color, alpha=0.6, label=f"Triton, {frac:.0%} active")
  dense = sorted({(r["ctx"], r["cudnn_dense_tflops"]) for r in rows
                  if r.get("cudnn_dense_tflops")})
  ax.plot([c for c, _ in dense], [t for _, t in dense], "k^-", label="cuDNN dense causal")
  ax.plot([c for c, _ in dense], [0.7 * t for _, t in dense], "k:", label="70% of cuDNN (target)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("useful TFLOP/s")
  env = res.get("env", {})
  ax.set_title(f"Sparse-query attention, {env.get('device_kind', '?')}, jax {env.get('jax', '?')}")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot(res, path):
  if res.get("mgpu") and not res.get("sparse") and not res.get("decode"):
    return plot_mgpu(res, path)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  ax = axes[0]
  sp = res.get("sparse") or []
  fracs = sorted({r["frac"] for r in sp})
  for frac in fracs:
    rs = [r for r in sp if r["frac"] == frac and r.get("kernel_tflops")]
    ax.plot([r["ctx"] for r in rs], [r["kernel_tflops"] for r in rs], "o-",
            label=f"kernel, {frac:.0%} active")
    rs = [r for r in sp if r["frac"] == frac and r.get("cudnn_masked_tflops")]
    ax.plot([r["ctx"] for r in rs], [r["cudnn_masked_tflops"] for r in rs],
            "x--", alpha=0.6, label=f"cuDNN masked, {frac:.0%}")
  dn = [d for d in (res.get("cudnn_dense") or []) if d]
  ax.plot([d["ctx"] for d in dn], [d["tflops"] for d in dn], "k^-",
          label="cuDNN dense causal")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("context (tokens)")
  ax.set_ylabel("useful TFLOP/s")
  ax.set_title("Sparse-query attention")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  ax = axes[1]
  dc = res.get("decode") or []
  for ctx in sorted({r["ctx"] for r in dc}):
    rs = [r for r in dc if r["ctx"] == ctx]
    ax.plot([r["batch"] for r in rs], [r.get("kernel_gbs") or 0 for r in rs],
            "o-", label=f"kernel, ctx {ctx}")
    ax.plot([r["batch"] for r in rs], [r.get("jax_pallas_gbs") or 0 for r in rs],
            "x--", alpha=0.6, label=f"jax paged_attention, ctx {ctx}")
  cp = res.get("ceilings", {}).get("copy_gbs")
  if cp:
    ax.axhline(cp, color="k", ls=":", label="measured copy GB/s")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("batch")
  ax.set_ylabel("GB/s (K/V bytes)")
  ax.set_title("Paged decode attention")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  env = res.get("env", {})
  fig.suptitle(f"{env.get('device_kind', '?')}, jax {env.get('jax', '?')}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------
# Assembly: gather cached K/V, re-rotate K, write the request's slots
# ----------------------------------------------------------------------------


def section_assemble(token_counts, sweep, results):
  """Assembly of n reused tokens of Llama-3-8B (32 layers, 8 kv heads, dim 128, bf16, page 16):
  kernel vs the jnp reference (XLA gather + rotate + scatter), both inside a donating jit as in
  the prefill. Bytes = K and V of every layer read once and written once."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.assemble import assemble_kv, assemble_kv_reference
  n_layers = 32 if not KERNEL_KW.get("interpret") else 2
  rows = []
  for n in token_counts:
    n_pages = 2 * (n // PAGE) + 8
    rng = np.random.default_rng(n)
    shape = (n_layers, N_KV, n_pages, PAGE, HEAD_DIM)
    src_pages = rng.permutation(np.arange(1, n_pages // 2))[: n // PAGE]
    dst_pages = rng.permutation(np.arange(n_pages // 2, n_pages))[: n // PAGE]
    off = np.arange(PAGE)
    src = (src_pages[:, None] * PAGE + off).reshape(1, -1).astype(np.int32)
    dst = (dst_pages[:, None] * PAGE + off).reshape(1, -1).astype(np.int32)
    delta = np.full_like(src, 1234)
    inv = (1.0 / (500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM))).astype(np.float32)
    nbytes = 2 * 2 * n_layers * N_KV * HEAD_DIM * 2 * src.size
    pool = {"k": jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16),
            "v": jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)}

    def make(fn, **kw):
      @functools.partial(jax.jit, donate_argnums=(0,))
      def step(pool, src, dst, delta):
        k, v = fn(pool["k"], pool["v"], src, dst, delta, inv, **kw)
        return {"k": k, "v": v}
      return step

    ref = make(assemble_kv_reference)
    configs = [(64, 4), (128, 4), (32, 4), (64, 8)] if sweep else [(64, 4)]
    want = ref(jax.tree.map(jnp.copy, pool), src, dst, delta)
    row = dict(tokens=int(src.size), mbytes=nbytes / 1e6)
    for bt, nw in configs:
      ker = make(assemble_kv, block_t=bt, num_warps=nw, **KERNEL_KW)
      got = ker(jax.tree.map(jnp.copy, pool), src, dst, delta)
      err = max(float(jnp.max(jnp.abs(got[x].astype(jnp.float32) - want[x].astype(jnp.float32))))
                for x in ("k", "v"))
      state = {"p": jax.tree.map(jnp.copy, pool)}

      def call():
        state["p"] = ker(state["p"], src, dst, delta)
        return state["p"]
      t = bench(call)
      row.setdefault("kernel", []).append(dict(block_t=bt, num_warps=nw, ms=t * 1e3,
                                               gbs=nbytes / t / 1e9, max_abs_err=err))
      print(f"assemble {src.size} tokens ({bt}, {nw}): {t * 1e3:.3f} ms "
            f"{nbytes / t / 1e9:.0f} GB/s, max err vs reference {err:.3g}", flush=True)
    state = {"p": jax.tree.map(jnp.copy, pool)}

    def call_ref():
      state["p"] = ref(state["p"], src, dst, delta)
      return state["p"]
    t = bench(call_ref)
    row.update(ref_ms=t * 1e3, ref_gbs=nbytes / t / 1e9)
    print(f"assemble {src.size} tokens reference: {t * 1e3:.3f} ms {nbytes / t / 1e9:.0f} GB/s",
          flush=True)
    rows.append(row)
  results["assemble"] = rows


def section_write(token_counts, results):
  """One layer's K/V write of n tokens of Llama-3-8B (8 kv heads, dim 128, bf16, page 16) into a
  32-layer pool at a traced layer: the kernel (pallas_kernels/write.py) vs its reference (XLA's
  scatter), both inside a donating jit as in the prefill's layer loop. Bytes = the new K and V
  read once and written once (the floor; the kernel also reads each old row, for padding)."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels.write import write_kv, write_kv_reference
  n_layers = 32 if not KERNEL_KW.get("interpret") else 2
  layer = jnp.int32(n_layers // 2)
  rows = []
  for n in token_counts:
    n_pages = n // PAGE + 8
    rng = np.random.default_rng(n)
    shape = (n_layers, N_KV, n_pages, PAGE, HEAD_DIM)
    pages = rng.permutation(np.arange(1, n_pages))[: n // PAGE]  # a request's own pages
    slots = (pages[:, None] * PAGE + np.arange(PAGE)).reshape(1, -1).astype(np.int32)
    kv = [jnp.asarray(rng.standard_normal((1, slots.size, N_KV, HEAD_DIM), np.float32),
                      jnp.bfloat16) for _ in range(2)]
    nbytes = 2 * 2 * slots.size * N_KV * HEAD_DIM * 2
    pool = {"k": jnp.zeros(shape, jnp.bfloat16), "v": jnp.zeros(shape, jnp.bfloat16)}

    def make(fn, **kw):
      @functools.partial(jax.jit, donate_argnums=(0,))
      def step(pool, slots, k, v):
        k_pool, v_pool = fn(pool["k"], pool["v"], slots, k, v, layer=layer, **kw)
        return {"k": k_pool, "v": v_pool}
      return step

    row = dict(tokens=int(slots.size), mbytes=nbytes / 1e6)
    ref = make(write_kv_reference)
    want = ref(jax.tree.map(jnp.copy, pool), slots, *kv)
    for name, fn in (("kernel", make(write_kv, **KERNEL_KW)), ("reference", ref)):
      got = fn(jax.tree.map(jnp.copy, pool), slots, *kv)
      equal = all(bool(jnp.all(got[x] == want[x])) for x in ("k", "v"))
      state = {"p": jax.tree.map(jnp.copy, pool)}

      def call(fn=fn):
        state["p"] = fn(state["p"], slots, *kv)
        return state["p"]
      t = bench(call)
      row[name] = dict(ms=t * 1e3, gbs=nbytes / t / 1e9, equal_to_reference=equal)
      print(f"write {slots.size} tokens {name}: {t * 1e3:.3f} ms {nbytes / t / 1e9:.0f} GB/s, "
            f"equal to the reference: {equal}", flush=True)
    rows.append(row)
  results["write"] = rows


def section_mask(contexts, results):
  """cuDNN causal attention (B = 1, Llama-3-8B heads) with the plain causal mask, and with
  sequence lengths (cuDNN's padding-aware causal mask) at the full length and at 80% of it: the
  engine's full layers pass no lengths (docs/ttft.md, round 4)."""
  import jax
  import jax.numpy as jnp
  rows = []
  for ctx in contexts:
    key = jax.random.PRNGKey(ctx)
    q = jax.random.normal(key, (1, ctx, N_HEADS, HEAD_DIM), jnp.bfloat16)
    kv = jax.random.normal(key, (1, ctx, N_KV, HEAD_DIM), jnp.bfloat16)
    causal = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                       implementation="cudnn"))
    row = dict(ctx=ctx, causal_ms=bench(causal, q, kv, kv) * 1e3)

    def padded(q, k, v, n):
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=n,
                                          key_value_seq_lengths=n, implementation="cudnn")
    for name, n in (("lengths_full_ms", ctx), ("lengths_80pct_ms", int(0.8 * ctx))):
      row[name] = bench(jax.jit(padded), q, kv, kv, jnp.asarray([n], jnp.int32)) * 1e3
    rows.append(row)
    print(f"cudnn causal {ctx}: {row}", flush=True)
  results["mask"] = rows


def section_pool(results):
  """The sparse-query kernel (32K keys, 15% active) on a one-layer pool and on 32-layer pools of
  0.5 and 2.5 x 2^31 elements (the engine's size: 64-bit offsets), at layers 0 and 16."""
  import jax
  import jax.numpy as jnp
  from pallas_kernels import paged_attention
  scale = 1.0 / math.sqrt(HEAD_DIM)
  p = sparse_problem(32768, 0.15)
  fl = attn_flops(p["pos_np"])
  one = jax.jit(functools.partial(paged_attention, sm_scale=scale, **KERNEL_KW))
  t = bench(one, p["q"], p["q_pos"], p["k"], p["v"], p["table"], p["kv_len"])
  rows = [dict(pool=list(p["k"].shape), layer=None, ms=t * 1e3, tflops=fl / t / 1e12)]
  layered = jax.jit(lambda q, qp, k, v, t, kl, layer: paged_attention(
      q, qp, k, v, t, kl, sm_scale=scale, layer=layer, **KERNEL_KW))
  for n_pages in (2100, 10304):
    shape = (32, N_KV, n_pages, PAGE, HEAD_DIM)
    k = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(1), shape, jnp.bfloat16)
    for layer in (0, 16):
      t = bench(layered, p["q"], p["q_pos"], k, v, p["table"], p["kv_len"], jnp.int32(layer))
      rows.append(dict(pool=list(shape), layer=layer, ms=t * 1e3, tflops=fl / t / 1e12))
    del k, v
  for r in rows:
    print(f"pool {r['pool']} layer {r['layer']}: {r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s",
          flush=True)
  results["pool"] = rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
  ap.add_argument("--sections", default="ceilings,sparse,decode")
  ap.add_argument("--contexts", default="4096,8192,16384,32768")
  ap.add_argument("--fracs", default="0.05,0.15,0.3")
  ap.add_argument("--batches", default="1,8,32,64")
  ap.add_argument("--decode-contexts", default="2048,8192,32768")
  ap.add_argument("--assemble-tokens", default="7680,30720")
  ap.add_argument("--write-tokens", default="8192,32768")
  ap.add_argument("--few-queries", default="1,32,128",
                  help="section few: query rows over each context")
  ap.add_argument("--no-sweep", action="store_true")
  ap.add_argument("--mgpu-profile", action="store_true",
                  help="section mgpu: also trace each problem (kernel vs XLA work around it)")
  ap.add_argument("--mgpu-configs", default=None,
                  help="section mgpu: configs to time, block_kv:n_slots:key_splits:token_major "
                       "comma-separated ('auto': the kernel's choice); default: four")
  ap.add_argument("--smoke", action="store_true",
                  help="CPU check of this script: interpret mode, tiny shapes")
  ap.add_argument("--report", help="JSON from a run: print tables, write PNG")
  ap.add_argument("--png", default="docs/bench_kernels.png")
  a = ap.parse_args()
  if a.report:
    with open(a.report) as f:
      res = json.load(f)
    print(tables(res))
    plot(res, a.png)
    return
  if a.smoke:
    global DECODE_MIN_BYTES, SWEEP_CTX
    KERNEL_KW["interpret"] = True
    global SWEEP_PROBLEMS
    DECODE_MIN_BYTES, SWEEP_CTX = 1e6, 256
    SWEEP_PROBLEMS = ((256, 0.15), (512, 0.05))
    a.contexts, a.fracs, a.batches, a.decode_contexts = "256", "0.1", "2", "256"
    a.sections = "sparse,decode,assemble,few,write"
    a.few_queries = "4"
    a.assemble_tokens = a.write_tokens = "64"
  os.makedirs(a.out, exist_ok=True)
  res = dict(env=environment(), command=" ".join(sys.argv))
  print(json.dumps(res["env"], indent=1), flush=True)
  path = os.path.join(a.out, "bench_kernels.json")

  def save():
    with open(path, "w") as f:
      json.dump(res, f, indent=1, default=str)

  sections = a.sections.split(",")
  if "ceilings" in sections:
    res["ceilings"], err = safe("ceilings", ceilings)
    print("ceilings", res["ceilings"], flush=True)
    save()
  ints = lambda s: [int(x) for x in s.split(",") if x]
  if "sparse" in sections:
    section_sparse(ints(a.contexts), [float(x) for x in a.fracs.split(",")],
                   not a.no_sweep, res)
    save()
  if "assemble" in sections:
    section_assemble(ints(a.assemble_tokens), not a.no_sweep, res)
    save()
  if "mask" in sections:
    section_mask(ints(a.contexts), res)
    save()
  if "pool" in sections:
    section_pool(res)
    save()
  if "mgpu" in sections:
    from pallas_kernels.attention_mgpu import parse_configs
    section_mgpu(ints(a.contexts), [float(x) for x in a.fracs.split(",")], res,
                 os.path.join(a.out, "traces") if a.mgpu_profile else None,
                 parse_configs(a.mgpu_configs) if a.mgpu_configs else MGPU_CONFIGS)
    save()
  if "write" in sections:
    section_write(ints(a.write_tokens), res)
    save()
  if "few" in sections:
    section_few(ints(a.contexts), ints(a.few_queries), res)
    save()
  if "decode" in sections:
    section_decode(ints(a.batches), ints(a.decode_contexts), not a.no_sweep,
                   res)
    save()
  res["ceilings"] = res.get("ceilings") or {}
  print(tables(res))


if __name__ == "__main__":
  main()
