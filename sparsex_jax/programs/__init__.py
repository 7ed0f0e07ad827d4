"""Device programs: pure jitted functions of explicit pytrees, a frozen config static.

Each takes the KV pool first, donates it, and returns (pool, outputs):
- prefill.prefill: the one prefill of every reuse policy;
- decode.decode_step: one token per sequence;
- copy.copy_slots: K/V moved between slots unchanged.
`KVPool` owns the device pool and is the only place that swaps it for a program's output.
"""

from __future__ import annotations

import jax

from models.config import ModelConfig
from sparsex_jax.kv.layout import PoolLayout


class CompileLog:
  """The distinct programs one engine has run, keyed by program, static arguments and argument
  shapes and dtypes. jit compiles each once per process, so this is the number of compilations
  the engine's work needs, whatever other engines in the process have compiled."""

  def __init__(self):
    self._seen: set = set()

  def note(self, name: str, static, args) -> None:
    leaves, tree = jax.tree.flatten(args)
    shapes = tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)))
                   for x in leaves)
    self._seen.add((name, static, tree, shapes))

  def __len__(self) -> int:
    return len(self._seen)


class KVPool:
  """The device KV pool {"k", "v"}: [L, K, P, S, H] each, donated to every program."""

  def __init__(self, cfg: ModelConfig, layout: PoolLayout):
    self.cfg, self.layout = cfg, layout
    self.arrays = self._zeros()
    self.log = CompileLog()

  def _zeros(self):
    import jax.numpy as jnp
    shape = self.layout.pool_shape(self.cfg)
    return {"k": jnp.zeros(shape, self.cfg.jnp_dtype), "v": jnp.zeros(shape, self.cfg.jnp_dtype)}

  def run(self, program, *args, **static):
    """pool, out = program(pool, *args, **static); keeps the new pool, returns out."""
    self.log.note(program.__name__, tuple(sorted(static.items())), args)
    self.arrays, out = program(self.arrays, *args, **static)
    return out
