"""Issue 30, round 20 (round 17's probe, first run here): where an 8K prefill's MoE FFN layer of Qwen3-30B-A3B spends its time.

Full prefill measured 2.31x its active-parameter FLOP floor (round 15). This probe times one layer's
pieces at its real shapes (8,192 tokens, D 2048, 128 experts of F 768, k 8: 65,536 assignments;
bf16, random weights and routing from a random router), each as its own jitted program, medians of
timed loops after a warm-up (jax and numpy only, plus the repo's models.moe for the whole layer):

  dense_equivalent  a dense [65536, 2048] x [2048, 768] matmul: the rate the experts could reach
  route             router matmul, softmax, top-k
  sort_gather       argsort of the assignments, group sizes, the rows gathered in expert order
  grouped[cfg]      ragged_dot_mgpu at the gate/up shape and the down shape, per tile config
  combine_f32       the layer's current combine: scale in float32, unsort gather, sum over k
  combine_bf16      the same in the model's dtype, summed in float32
  combine_now       round 20's combine (models/moe.py): gather the rows in bf16, then scale and sum
                    in float32 in token order, the inverse order by a scatter
  gate_up_fused     one grouped matmul at N = 2F (gate and up weights side by side) against two
  moe_ffn           models.moe.moe_ffn with the engine's grouped matmul (the whole layer)
  capacity_*        (round 21) the experts as one batched matmul over rows padded to a capacity

    python probe_moe_layer.py OUT.json          (Hopper GPU)
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

M, D, E, F, K_TOP = 8192, 2048, 128, 768, 8


def timeit(fn, *args, iters=20, runs=5):
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return round(statistics.median(times), 4)


def main(argv=None) -> int:
  out_path = (argv or sys.argv[1:])[0]
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
  from models import moe
  from models.config import get_config
  from pallas_kernels import grouped_matmul as gm
  key = jax.random.split(jax.random.key(0), 8)
  bf = jnp.bfloat16
  hx = jax.random.normal(key[0], (M, D), bf)
  router = (jax.random.normal(key[1], (D, E), bf) / np.sqrt(D)).astype(bf)  # a numpy scalar is not weakly typed
  w_gate = (jax.random.normal(key[2], (E, D, F), bf) / np.sqrt(D)).astype(bf)
  w_up = (jax.random.normal(key[3], (E, D, F), bf) / np.sqrt(D)).astype(bf)
  w_down = (jax.random.normal(key[4], (E, F, D), bf) / np.sqrt(F)).astype(bf)
  cfg = get_config("qwen3-30b-a3b")
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "shapes": {"M": M, "D": D, "E": E, "F": F, "k": K_TOP}, "ms": {}}
  ms = res["ms"]

  dense_w = jax.random.normal(key[5], (D, F), bf)
  rows_dense = jax.random.normal(key[6], (M * K_TOP, D), bf)
  ms["dense_equivalent_gate"] = timeit(jax.jit(lambda a, b: a @ b), rows_dense, dense_w)
  route = jax.jit(lambda h: moe.route(h, router, cfg))
  ms["route"] = timeit(route, hx)
  experts, weights = route(hx)

  @jax.jit
  def sort_gather(h, experts):
    group = experts.reshape(-1)
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=E).astype(jnp.int32)
    return h[order // K_TOP], order, sizes

  ms["sort_gather"] = timeit(sort_gather, hx, experts)
  rows, order, sizes = sort_gather(hx, experts)
  res["group_sizes"] = {"min": int(sizes.min()), "max": int(sizes.max())}
  h_mid = jax.random.normal(key[7], (M * K_TOP, F), bf)

  flops_gate = 2 * M * K_TOP * D * F
  res["dense_equivalent_tflops"] = round(flops_gate / ms["dense_equivalent_gate"] / 1e9, 1)
  ms["engine_grouped_gate"] = timeit(gm.grouped_matmul, rows, w_gate, sizes)
  ms["engine_grouped_down"] = timeit(gm.grouped_matmul, h_mid, w_down, sizes)

  out_rows = jax.random.normal(key[5], (M * K_TOP, D), bf)

  @jax.jit
  def combine_f32(out, weights, order):
    scale = weights.reshape(-1)[order]
    out = out.astype(jnp.float32) * scale[:, None]
    return jnp.sum(out[jnp.argsort(order)].reshape(M, K_TOP, D), axis=1).astype(bf)

  @jax.jit
  def combine_bf16(out, weights, order):
    scale = weights.reshape(-1)[order].astype(out.dtype)
    out = out * scale[:, None]
    return jnp.sum(out[jnp.argsort(order)].reshape(M, K_TOP, D).astype(jnp.float32),
                   axis=1).astype(bf)

  @jax.jit
  def combine_now(out, weights, order):
    unsort = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                                   unique_indices=True)
    out = out[unsort].reshape(M, K_TOP, D).astype(jnp.float32)
    return jnp.sum(out * weights.reshape(M, K_TOP, 1), axis=1).astype(bf)

  ms["combine_now"] = timeit(combine_now, out_rows, weights, order)
  w_gate_up = jnp.concatenate([w_gate, w_up], axis=-1)
  ms["gate_up_fused"] = timeit(gm.grouped_matmul, rows, w_gate_up, sizes)
  ms["argsort"] = timeit(jax.jit(lambda e: jnp.argsort(e.reshape(-1), stable=True)), experts)
  ms["gather_rows"] = timeit(jax.jit(lambda h, o: h[o // K_TOP]), hx, order)
  ms["combine_f32"] = timeit(combine_f32, out_rows, weights, order)
  ms["combine_bf16"] = timeit(combine_bf16, out_rows, weights, order)
  ms["silu_mul"] = timeit(jax.jit(lambda g, u: jax.nn.silu(g) * u), h_mid, h_mid)
  params = {"router": router, "expert_gate": w_gate, "expert_up": w_up, "expert_down": w_down}
  ms["moe_ffn"] = timeit(jax.jit(lambda h: moe.moe_ffn(h, params, cfg,
                                                        grouped_matmul=gm.grouped_matmul)), hx)

  def moe_ffn_before(h):  # models/moe.py before round 20: float32 scale, then unsort by a sort
    ex, wt = moe.route(h, router, cfg)
    order = jnp.argsort(ex.reshape(-1), stable=True)
    sizes_ = jnp.bincount(ex.reshape(-1), length=E).astype(jnp.int32)
    r = h[order // K_TOP]
    mid = jax.nn.silu(gm.grouped_matmul(r, w_gate, sizes_)) * gm.grouped_matmul(r, w_up, sizes_)
    out = gm.grouped_matmul(mid, w_down, sizes_).astype(jnp.float32)
    out = out * wt.reshape(-1)[order][:, None]
    return jnp.sum(out[jnp.argsort(order)].reshape(M, K_TOP, D), axis=1).astype(bf)

  ms["moe_ffn_before"] = timeit(jax.jit(moe_ffn_before), hx)
  # Round 21 candidate: every expert's rows padded to one static capacity C (a multiple of 128
  # above the largest group here), as one batched matmul [E, C, D] x [E, D, F] (cuBLAS): the
  # same row count as the Mosaic kernel's static grid (cdiv(M k, 128) + E - 1 row blocks), at
  # the dense rate if cuBLAS keeps it; overflow past C would go to the grouped kernel.
  cap = -(-int(sizes.max()) // 128) * 128
  res["capacity"] = cap
  x_cap = jax.random.normal(key[6], (E, cap, D), bf)
  m_cap = jax.random.normal(key[7], (E, cap, F), bf)
  ms["capacity_gate"] = timeit(jax.jit(lambda a, b: jnp.einsum("ecd,edf->ecf", a, b)), x_cap,
                               w_gate)
  ms["capacity_down"] = timeit(jax.jit(lambda a, b: jnp.einsum("ecf,efd->ecd", a, b)), m_cap,
                               w_down)
  ms["capacity_gate_up"] = timeit(jax.jit(lambda a, b: jnp.einsum("ecd,edf->ecf", a, b)), x_cap,
                                  w_gate_up)
  print(json.dumps(ms), flush=True)
  with open(out_path, "w") as f:  # the sweep below may be cut by a timeout
    json.dump(res, f, indent=1)
  grouped = {}
  for bm, bn, bk, steps, gbn in itertools.product([128], [128, 256], [64, 128], [2, 4], [1, 4]):
    name = f"m{bm}n{bn}k{bk}s{steps}g{gbn}"
    row = {}
    for shape, (lhs, rhs) in (("gate", (rows, w_gate)), ("down", (h_mid, w_down))):
      try:
        fn = jax.jit(lambda a, b, s, bm=bm, bn=bn, bk=bk, steps=steps, gbn=gbn:
                     ragged_dot_mgpu.ragged_dot(a, b, group_sizes=s, block_m=bm, block_n=bn,
                                                block_k=bk, max_concurrent_steps=steps,
                                                grid_block_n=gbn))
        row[shape] = timeit(fn, lhs, rhs, sizes, iters=10, runs=3)
      except Exception as e:  # noqa: BLE001  an invalid config for this kernel
        row[shape] = f"{type(e).__name__}: {str(e)[:120]}"
    grouped[name] = row
    print(name, row, flush=True)
  res["grouped"] = grouped
  with open(out_path, "w") as f:
    json.dump(res, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
