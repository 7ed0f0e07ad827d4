"""What the round-22 probes share: the median time of a jitted call, after a warm-up."""

from __future__ import annotations

import statistics
import time

import jax


def timeit(fn, *args, iters=20, runs=5) -> float:
  """Milliseconds per call: the median over `runs` timed loops of `iters` calls each."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return round(statistics.median(times), 4)
