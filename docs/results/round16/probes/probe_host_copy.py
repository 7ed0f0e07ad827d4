"""Issue 31, round 16: what a host-tier load costs the host, and whether its copy overlaps compute.

The host tier kept each segment's K and V one pinned-host array per layer; a load of layers
[T, L) staged 2 (L - T) arrays with one `jax.device_put` per segment, and round 15 measured about
48 ms of host time per 8K request (15 loads, 840 arrays) on an H200. This probe times the copies
alone, with the engine's code out of the way (jax and numpy only), for Llama-3-8B-sized segments:
bf16 K/V of one 512-token segment, per layer [8 kv heads, 32 pages, 16, 128], 15 segments, T = 4
of 32 layers (881 MB per request in every layout).

Layouts (the same bytes):
  per_layer           15 device_put calls (one per segment, as the engine issues a load) of 56
                      arrays [8, 32, 16, 128] each: round 15's layout.
  split               15 calls of 2 arrays [28, 8, 32, 16, 128] (layers [4, 32) of K and of V):
                      round 16's layout.
  per_layer_one_call  the 840 per-layer arrays in one device_put call: per-call against
                      per-array cost.

Scenarios (each: medians of 5 runs after a warm-up, time.perf_counter):
  copy_alone            issue_s: until the device_puts return; ready_s: until the copies are
                        ready (block_until_ready).
  compute_then_copy     a ~25 ms bf16 matmul loop dispatched first, then the device_puts, then
                        block: copy_ready_s near the copy alone and total_s near max(compute,
                        copy) mean the copy overlaps the compute; near the sum, it waits for it.
  copy_then_compute     the engine's order (start_loads before the prefill's full layers): the
                        puts first, then the matmuls.
  copy_in_thread        the device_puts issued from a background thread (concurrent.futures)
                        while the main thread dispatches the matmuls: main_dispatch_s, the
                        main thread's dispatch time, grows by what of the puts' host work holds
                        the GIL.

    python probe_host_copy.py OUT.json            # H100 / H200: under 60 s
    python probe_host_copy.py OUT.json --small    # CPU check: small sizes

On a device without "pinned_host" memory the sources are numpy arrays, pageable host memory, as
the engine keeps them there (said in the JSON: host_memory_kind, host_memory_note).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

RUNS = 5
# Llama-3-8B: 32 layers, T = 4, 8 kv heads of 128; a 512-token segment is 32 pages of 16.
FULL = {"n_layers": 32, "threshold": 4, "kv_heads": 8, "pages": 32, "page_size": 16,
        "head_dim": 128, "segments": 15, "matmul_dim": 4096, "compute_chunks": 4,
        "compute_ms": 25.0}
# A CPU check of the script itself: the same structure, small enough to run in seconds.
SMALL = {"n_layers": 8, "threshold": 2, "kv_heads": 2, "pages": 4, "page_size": 16,
         "head_dim": 32, "segments": 3, "matmul_dim": 256, "compute_chunks": 4,
         "compute_ms": 25.0}


def host_memory(dev):
  """Where the sources live: pinned host memory of dev (a sharding), else None: numpy arrays,
  pageable host memory, as the engine keeps them there (a source in the device's own memory
  would not be copied at all: device_put to where an array already is returns it)."""
  kinds = sorted({m.kind for m in dev.addressable_memories()})
  if "pinned_host" in kinds:
    return jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"), kinds, None
  note = (f"no pinned_host memory on {dev.platform} (memory kinds {kinds}): the sources are "
          f"numpy arrays in pageable host memory")
  return None, kinds, note


def make_sources(sizes, where):
  """Each layout's host arrays, per segment: the leaves one load stages (in `where`, or numpy
  copies of their own when it is None)."""
  n_layers, t = sizes["n_layers"], sizes["threshold"]
  layer_shape = (sizes["kv_heads"], sizes["pages"], sizes["page_size"], sizes["head_dim"])
  rng = np.random.default_rng(0)
  # One random K and V (never zeros); each segment gets its own copies in `where`.
  k, v = (rng.standard_normal((n_layers,) + layer_shape, np.float32).astype(jnp.bfloat16)
          for _ in "kv")
  put = (lambda xs: [np.array(x) for x in xs]) if where is None else (
      lambda xs: jax.device_put(xs, where))
  per_layer, split = [], []
  for _ in range(sizes["segments"]):
    per_layer.append(put([k[i] for i in range(t, n_layers)] + [v[i] for i in range(t, n_layers)]))
    split.append(put([k[t:], v[t:]]))
  jax.block_until_ready((per_layer, split))
  return {"per_layer": (per_layer, False), "split": (split, False),
          "per_layer_one_call": (per_layer, True)}


def issue(segments, target, one_call):
  """The device_puts of one request's loads -> the device arrays (nothing waits)."""
  if one_call:
    return jax.device_put([x for seg in segments for x in seg], target)
  return [jax.device_put(seg, target) for seg in segments]  # the engine: one call per load


def free(tree):
  for x in jax.tree.leaves(tree):
    x.delete()


@functools.partial(jax.jit, static_argnames=("steps",))
def matmul_loop(x, w, steps):
  """steps chained bf16 matmuls. A static count: with a traced one XLA's GPU while loop reads its
  condition back to the host every step, a synchronisation the prefill's programs do not have."""
  return jax.lax.fori_loop(0, steps, lambda i, y: (y @ w).astype(y.dtype), x)


class Compute:
  """A ~compute_ms bf16 matmul load on the device, dispatched as `chunks` programs (a prefill is
  several programs too)."""

  def __init__(self, sizes, dev):
    d = sizes["matmul_dim"]
    key = jax.random.key(0)
    self.x = jax.device_put(jax.random.normal(key, (d, d), jnp.bfloat16), dev)
    # Entries of variance 1/d keep the chain's scale from step to step (no overflow to inf).
    w = jax.random.normal(jax.random.key(1), (d, d), jnp.bfloat16) / float(np.sqrt(d))
    self.w = jax.device_put(w, dev)
    assert self.x.dtype == self.w.dtype == jnp.bfloat16  # a bf16 matmul, as the prefill's
    self.chunks = sizes["compute_chunks"]
    self.steps = 8
    self.dispatch().block_until_ready()  # compiles
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      self.dispatch().block_until_ready()
      times.append(time.perf_counter() - t0)
    per_step = statistics.median(times) / (self.chunks * 8)
    self.steps = max(1, round(sizes["compute_ms"] / 1e3 / per_step / self.chunks))
    self.dispatch().block_until_ready()  # compiles the calibrated count

  def dispatch(self):
    y = self.x
    for _ in range(self.chunks):
      y = matmul_loop(y, self.w, steps=self.steps)
    return y


def copy_alone(segments, target, one_call, compute):
  t0 = time.perf_counter()
  out = issue(segments, target, one_call)
  t1 = time.perf_counter()
  jax.block_until_ready(out)
  t2 = time.perf_counter()
  free(out)
  return {"issue_s": t1 - t0, "ready_s": t2 - t0}


def compute_alone(compute):
  t0 = time.perf_counter()
  y = compute.dispatch()
  t1 = time.perf_counter()
  y.block_until_ready()
  return {"dispatch_s": t1 - t0, "ready_s": time.perf_counter() - t0}


def compute_then_copy(segments, target, one_call, compute):
  t0 = time.perf_counter()
  y = compute.dispatch()
  t1 = time.perf_counter()
  out = issue(segments, target, one_call)
  t2 = time.perf_counter()
  jax.block_until_ready(out)
  t3 = time.perf_counter()
  y.block_until_ready()
  t4 = time.perf_counter()
  free(out)
  return {"compute_dispatch_s": t1 - t0, "issue_s": t2 - t1, "copy_ready_s": t3 - t0,
          "total_s": t4 - t0}


def copy_then_compute(segments, target, one_call, compute):
  t0 = time.perf_counter()
  out = issue(segments, target, one_call)
  t1 = time.perf_counter()
  y = compute.dispatch()
  t2 = time.perf_counter()
  jax.block_until_ready(out)
  t3 = time.perf_counter()
  y.block_until_ready()
  t4 = time.perf_counter()
  free(out)
  return {"issue_s": t1 - t0, "compute_dispatch_s": t2 - t1, "copy_ready_s": t3 - t0,
          "total_s": t4 - t0}


def copy_in_thread(segments, target, one_call, compute, pool):
  def timed_issue():
    t = time.perf_counter()
    out = issue(segments, target, one_call)
    return out, time.perf_counter() - t

  t0 = time.perf_counter()
  future = pool.submit(timed_issue)
  y = compute.dispatch()
  t1 = time.perf_counter()
  out, thread_issue_s = future.result()
  jax.block_until_ready(out)
  t2 = time.perf_counter()
  y.block_until_ready()
  t3 = time.perf_counter()
  free(out)
  return {"main_dispatch_s": t1 - t0, "thread_issue_s": thread_issue_s,
          "copy_ready_s": t2 - t0, "total_s": t3 - t0}


def medians(fn, *args):
  """Median of each timing over RUNS runs after one warm-up (all runs kept, in ms)."""
  fn(*args)
  runs = [fn(*args) for _ in range(RUNS)]
  return {key: {"median_ms": 1e3 * statistics.median(r[key] for r in runs),
                "runs_ms": [round(1e3 * r[key], 3) for r in runs]} for key in runs[0]}


def overlap(compute_ms, copy_ms, total_ms):
  """1: the copy hid behind the compute (total = max); 0: they ran one after the other
  (total = sum); in between, partly. Not clipped: outside [0, 1] is noise, meaningful only when
  the copy alone takes a good part of the compute's time (as it does at full size)."""
  hidden = compute_ms + copy_ms - total_ms
  return round(hidden / max(min(compute_ms, copy_ms), 1e-9), 3)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("out", help="JSON path")
  p.add_argument("--small", action="store_true", help="small sizes (a CPU check of the script)")
  args = p.parse_args(argv)
  started = time.perf_counter()
  sizes = SMALL if args.small else FULL
  dev = jax.devices()[0]
  where, kinds, note = host_memory(dev)
  target = jax.sharding.SingleDeviceSharding(dev)  # the pool's memory, as stage_page_layers
  layouts = make_sources(sizes, where)
  compute = Compute(sizes, dev)
  per_layer_bytes = 2 * np.prod([sizes[k] for k in ("kv_heads", "pages", "page_size",
                                                    "head_dim")])
  moved_layers = sizes["n_layers"] - sizes["threshold"]
  result = {
      "jax": jax.__version__, "backend": jax.default_backend(), "device": dev.device_kind,
      "host_memory_kind": "numpy" if where is None else where.memory_kind,
      "memory_kinds": kinds,
      "host_memory_note": note, "sizes": sizes, "small": args.small, "runs": RUNS,
      "bytes_per_request": int(2 * moved_layers * per_layer_bytes * sizes["segments"]),
      "arrays_per_request": {"per_layer": 2 * moved_layers * sizes["segments"],
                             "split": 2 * sizes["segments"],
                             "per_layer_one_call": 2 * moved_layers * sizes["segments"]},
      "device_put_calls_per_request": {"per_layer": sizes["segments"],
                                       "split": sizes["segments"], "per_layer_one_call": 1},
      "compute": {"chunks": compute.chunks, "steps_per_chunk": compute.steps},
      "layouts": {},
  }
  result["compute"]["alone"] = medians(compute_alone, compute)
  compute_ms = result["compute"]["alone"]["ready_s"]["median_ms"]
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    for name, (segments, one_call) in layouts.items():
      row = {name_: medians(fn, segments, target, one_call, compute)
             for name_, fn in (("copy_alone", copy_alone),
                               ("compute_then_copy", compute_then_copy),
                               ("copy_then_compute", copy_then_compute))}
      row["copy_in_thread"] = medians(copy_in_thread, segments, target, one_call, compute, pool)
      copy_ms = row["copy_alone"]["ready_s"]["median_ms"]
      row["copy_gb_per_s"] = round(result["bytes_per_request"] / (copy_ms / 1e3) / 1e9, 2)
      row["overlap"] = {scenario: overlap(compute_ms, copy_ms,
                                          row[scenario]["total_s"]["median_ms"])
                        for scenario in ("compute_then_copy", "copy_then_compute",
                                         "copy_in_thread")}
      result["layouts"][name] = row
  result["wall_s"] = round(time.perf_counter() - started, 2)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)

  print(f"{result['device']} jax {result['jax']}, sources in {result['host_memory_kind']}"
        f"{' (' + note + ')' if note else ''}; {result['bytes_per_request'] / 1e6:.2f} MB per "
        f"request; compute alone {compute_ms:.1f} ms")
  for name, row in result["layouts"].items():
    ms = lambda scenario, key: row[scenario][key]["median_ms"]  # noqa: E731
    print(f"  {name:19s} ({result['arrays_per_request'][name]} arrays): issue "
          f"{ms('copy_alone', 'issue_s'):.1f} ms, ready {ms('copy_alone', 'ready_s'):.1f} ms "
          f"({row['copy_gb_per_s']} GB/s) | compute then copy: total "
          f"{ms('compute_then_copy', 'total_s'):.1f} ms | copy then compute: total "
          f"{ms('copy_then_compute', 'total_s'):.1f} ms | in a thread: main held "
          f"{ms('copy_in_thread', 'main_dispatch_s'):.1f} ms, total "
          f"{ms('copy_in_thread', 'total_s'):.1f} ms | overlap (1 = hidden, 0 = serial) "
          f"{row['overlap']}")
  print(f"wall {result['wall_s']} s -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
