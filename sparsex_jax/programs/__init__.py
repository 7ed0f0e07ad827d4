"""Device programs: pure jitted functions of explicit pytrees, a frozen config static.

Each takes the KV pool first, donates it, and returns (pool, outputs):
- prefill.prefill: the one prefill of every reuse policy;
- decode.decode_step: one token per sequence;
- copy.copy_slots: K/V moved between slots unchanged; copy.read_pages / write_pages: whole
  pages to and from the host (the persistent segment cache).
`KVPool` owns the device pool and is the only place that swaps it for a program's output.

With a mesh (tensor parallelism, sparsex_jax/sharding.py) `KVPool.run` runs each program under
it: host arguments become replicated global arrays, the program is traced under `jax.set_mesh`
(the attention ops then run per head shard) and jitted with the pool's sharding for the pool it
returns (so the donated pool is updated in place) and replicated outputs.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import jax
import numpy as np

from models.config import ModelConfig
from sparsex_jax.kv.layout import PoolLayout, pad_pages, page_bucket
from sparsex_jax.programs.options import COMPILER_OPTIONS


class CompileLog:
  """The distinct programs one engine has run, keyed by program, static arguments and argument
  shapes and dtypes. jit compiles each once per process, so this is the number of compilations
  the engine's work needs, whatever other engines in the process have compiled."""

  def __init__(self):
    self._seen: set = set()
    self._order: list = []  # the keys in the order first run

  @staticmethod
  def key(name: str, static, args) -> tuple:
    leaves, tree = jax.tree.flatten(args)
    shapes = tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)))
                   for x in leaves)
    return (name, static, tree, shapes)

  def note(self, key: tuple) -> None:
    if key not in self._seen:
      self._seen.add(key)
      self._order.append(key)

  def since(self, n: int) -> list[tuple]:
    """The keys first run after the first n (n: len(log) before some work)."""
    return self._order[n:]

  def __contains__(self, key: tuple) -> bool:
    return key in self._seen

  def __len__(self) -> int:
    return len(self._seen)

  def programs(self) -> set[str]:
    """The names of the programs run."""
    return {key[0] for key in self._seen}


# (program, static arguments, mesh) -> the program jitted with the pool's and outputs' layouts
# (module-wide like jit's own cache: engines on the same mesh share compilations).
_SHARDED_PROGRAMS: dict = {}


class KVPool:
  """The device KV pool {"k", "v"}: [L, K, P, S, H] each, donated to every program.

  A program that fails after its pool was donated (or whose output pool carries the failure)
  leaves no valid pool behind: `recover` then puts a zero pool in its place and calls `on_lost`, so
  the KV store can forget the cache entries whose values went with it.
  """

  def __init__(self, cfg: ModelConfig, layout: PoolLayout,
               on_lost: Callable[[], None] | None = None, mesh=None):
    self.cfg, self.layout, self.on_lost, self.mesh = cfg, layout, on_lost, mesh
    self.arrays = self._zeros()
    self.log = CompileLog()
    self.times_lost = 0

  def _zeros(self):
    """A zero pool, committed to its device (or mesh): jit keys its compiled programs on whether
    each argument is committed, and a program given a committed argument (a host-tier copy)
    returns a committed pool, so an uncommitted first pool had every program compiled twice."""
    import jax.numpy as jnp
    shape, dtype = self.layout.pool_shape(self.cfg), self.cfg.jnp_dtype
    if self.mesh is None:
      where = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    else:
      from sparsex_jax import sharding  # created in its shards: no device holds the whole pool
      where = sharding.pool_sharding(self.mesh)
    zeros = jax.jit(lambda: {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
                    out_shardings=where)
    return zeros()

  def _jitted(self, program, args, static):
    """The jitted callable `run` calls with (pool, *args), and the args it takes."""
    if self.mesh is None:
      return functools.partial(program, **static), args
    from sparsex_jax import sharding
    key = (program, tuple(sorted(static.items())), self.mesh)
    fn = _SHARDED_PROGRAMS.get(key)
    if fn is None:  # the program itself, inlined into a jit that pins the output layouts
      # (its undecorated body: XLA options may only be given to the outermost jit)
      body = getattr(program, "__wrapped__", program)
      fn = jax.jit(lambda pool, *a: body(pool, *a, **static), donate_argnums=0,
                   out_shardings=(sharding.pool_sharding(self.mesh),
                                  sharding.replicated(self.mesh)),
                   compiler_options=COMPILER_OPTIONS)
      _SHARDED_PROGRAMS[key] = fn
    return fn, sharding.put_replicated(args, self.mesh)

  def _mesh_context(self):
    return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

  def _call(self, program, args, static):
    fn, args = self._jitted(program, args, static)
    with self._mesh_context():
      return fn(self.arrays, *args)

  def compile(self, program, *args, **static):
    """The compiled executable `run(program, *args, **static)` would run (nothing runs; for
    memory_analysis() and the HLO text: the sharding tests and benchmarks)."""
    if self.mesh is None:
      return program.lower(self.arrays, *args, **static).compile()
    fn, args = self._jitted(program, args, static)
    with self._mesh_context():
      return fn.lower(self.arrays, *args).compile()

  def compile_later(self, program, *args, **static) -> Callable[[], object]:
    """A call that compiles what `run(program, *args, **static)` will run, for another thread:
    the pool is taken as shapes and shardings now (the arrays themselves are donated to the
    next program), and so are the arguments under a mesh (replicated, as run puts them). jit
    keeps what it compiles, so that run then compiles nothing. Arguments may be shapes
    (jax.ShapeDtypeStruct: another compilation's outputs)."""
    pool = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        self.arrays)
    if self.mesh is None:
      return lambda: program.lower(pool, *args, **static).compile()
    from sparsex_jax import sharding
    fn, _ = self._jitted(program, (), static)
    args = sharding.replicated_shapes(args, self.mesh)
    mesh_context = self._mesh_context

    def compile_now():
      with mesh_context():
        return fn.lower(pool, *args).compile()

    return compile_now

  @staticmethod
  def program_key(program, *args, **static) -> tuple:
    """How `log` keys `run(program, *args, **static)` (what compiling ahead checks against)."""
    return CompileLog.key(program.__name__, tuple(sorted(static.items())), args)

  def run(self, program, *args, **static):
    """pool, out = program(pool, *args, **static); keeps the new pool, returns out."""
    self.log.note(self.program_key(program, *args, **static))
    with self.recovering():
      pool, out = self._call(program, args, static)
    self.arrays = pool
    return out

  @contextlib.contextmanager
  def recovering(self):
    """On any failure in the block, leaves a valid pool behind (and caches that match it)."""
    try:
      yield
    except BaseException:
      self.recover()
      raise

  def read_pages(self, pages) -> tuple[np.ndarray, np.ndarray]:
    """K, V [L, K, n, S, H] of whole pool pages, on the host (kv/persist.py's PageIO)."""
    pages = np.asarray(pages, np.int32)
    program, args, static = self.read_pages_call(pages)
    k, v = self.run(program, *args, **static)
    return np.asarray(k)[:, :, :pages.size], np.asarray(v)[:, :, :pages.size]

  @staticmethod
  def read_pages_call(pages) -> tuple:
    """(program, args, static) that read_pages runs: what compiling ahead compiles
    (step_runner.host_tier_compiles)."""
    from sparsex_jax.programs.copy import read_pages
    padded = np.zeros(page_bucket(pages.size), np.int32)  # the null page, dropped by read_pages
    padded[:pages.size] = pages
    return read_pages, (padded,), {}

  def read_pages_into(self, pages, n_stored: int, split_layer: int, memory) -> tuple:
    """K and V of whole pool pages, padded to n_stored pages and cut at split_layer as the host
    tier keeps them (kv/host_tier.StoredKV, the pool's dtype), copied into `memory` (a jax
    sharding: pinned host memory) without waiting: the gather runs on the device and the
    device-to-host copy is a DMA, so an eviction costs the engine loop a dispatch, not a
    round trip. The gathered arrays hold device memory until their copy is done.
    Returns (K parts, V parts), each a tuple of [l, K, n_stored, S, H] arrays."""
    program, args, static = self.read_pages_into_call(pages, n_stored, split_layer)
    k, v = self.run(program, *args, **static)
    k, v = jax.device_put([list(k), list(v)], memory)
    return tuple(k), tuple(v)

  @staticmethod
  def read_pages_into_call(pages, n_stored: int, split_layer: int) -> tuple:
    """(program, args, static) that read_pages_into runs."""
    from sparsex_jax.programs.copy import read_page_layers
    pages = np.asarray(pages, np.int32)
    if n_stored < pages.size:
      raise ValueError(f"{pages.size} pages do not fit {n_stored} stored pages")
    padded = np.zeros(n_stored, np.int32)  # the null page: padding, never loaded back
    padded[:pages.size] = pages
    return read_page_layers, (padded,), {"split_layer": int(split_layer)}

  def write_pages(self, pages, k, v) -> None:
    """Writes K, V [L, K, n, S, H] into whole pool pages (kv/persist.py's PageIO)."""
    from sparsex_jax.programs.copy import write_pages
    pages = np.asarray(pages, np.int32)
    n = page_bucket(pages.size)
    padded = np.full(n, self.layout.num_pages, np.int32)  # out of range: dropped
    padded[:pages.size] = pages
    k, v = pad_pages(k, n), pad_pages(v, n)
    if self.mesh is not None:  # straight into the pool's layout: each device gets its heads
      from sparsex_jax import sharding
      k, v = (sharding.put(x, sharding.pool_sharding(self.mesh)) for x in (k, v))
    self.run(write_pages, padded, k, v)

  def stage_page_layers(self, k, v) -> tuple:
    """Starts the host-to-device copies of a host-tier segment's layers (its StoredKV k, v: one
    or two arrays [l, K, n, S, H] of consecutive layers, 8-bit ones with scales) with one
    batched jax.device_put (DMAs from pinned host memory on a GPU) -> the device arrays, for
    write_page_layers. Nothing here waits: programs dispatched before write_page_layers (the
    prefill's full layers) run while the copies do. Under a mesh the arrays take the pool's
    layout: each device receives its own KV heads."""
    leaves = [k.values, v.values, k.scale or (), v.scale or ()]
    return tuple(tuple(x) for x in jax.device_put(leaves, self.arrays["k"].sharding))

  def write_page_layers(self, pages, staged, first_layer: int, start_layer: int | None = None,
                        end_layer: int | None = None) -> None:
    """Dispatches the program that writes layers [first_layer, end_layer) (end None: L) of the
    staged arrays (stage_page_layers; they hold consecutive layers from start_layer on, None:
    up to L, and may begin below first_layer) into whole pool pages; the host tier
    pads each segment once to its page bucket, so the staged arrays may hold more pages than
    `pages` (the rest are dropped), and a page of -1 is not written (a block of a host run that
    the request does not continue). Programs dispatched after it run after it."""
    program, args, static = self.write_page_layers_call(pages, staged, first_layer, start_layer,
                                                        end_layer)
    self.run(program, *args, **static)

  def write_page_layers_call(self, pages, staged, first_layer: int,
                             start_layer: int | None = None, end_layer: int | None = None
                             ) -> tuple:
    """(program, args, static) that write_page_layers runs (staged may be shapes:
    jax.ShapeDtypeStruct, for compiling ahead)."""
    from sparsex_jax.programs.copy import write_page_layers
    k_values, v_values, k_scale, v_scale = staged
    pages = np.asarray(pages, np.int32)
    n = int(k_values[0].shape[2])
    if n < pages.size:
      raise ValueError(f"host copy holds {n} pages, the lease has {pages.size}")
    padded = np.full(n, self.layout.num_pages, np.int32)  # out of range: dropped
    padded[:pages.size] = np.where(pages < 0, self.layout.num_pages, pages)  # -1: not written
    n_layers = self.arrays["k"].shape[0]
    if start_layer is None:
      start_layer = n_layers - sum(int(x.shape[0]) for x in k_values)
    return write_page_layers, (padded, k_values, v_values, k_scale or None, v_scale or None), {
        "first_layer": int(first_layer), "start_layer": int(start_layer),
        "end_layer": int(n_layers if end_layer is None else end_layer)}

  def is_valid(self) -> bool:
    """False when the pool was donated to a program that failed, or holds a failed result."""
    try:
      for a in self.arrays.values():
        if a.is_deleted():
          return False
        a.block_until_ready()  # raises if the program that produced it failed on the device
    except Exception:  # pylint: disable=broad-except
      return False
    return True

  def recover(self) -> bool:
    """After a failure: replaces a lost pool with a zero one (and calls on_lost); True if lost."""
    if self.is_valid():
      return False
    self.arrays = self._zeros()
    self.times_lost += 1
    if self.on_lost is not None:
      self.on_lost()
    return True
