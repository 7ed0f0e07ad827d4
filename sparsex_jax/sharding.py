"""Tensor parallelism over a jax Mesh: the one room for sharding rules (docs/SHARDING.md).

The mesh has two axes, ("data", "tensor"); data is 1 for now (room for data parallelism).
Megatron-style layout over "tensor":

  q/k/v projections (and their biases), gate/up   split by output columns (heads, ffn)
  o, down                                          split by input rows (heads, ffn)
  experts [E, D, F] / [E, F, D] (MoE)              split by experts (expert parallel)
  embedding [V, D]                                 split by D; untied lm_head [D, V] by V
  norms (q/k norms too), MoE router                replicated
  KV pool [L, K, P, S, H]                          split by KV heads
  plans, page tables, tokens, positions, logits    replicated

so every layer's attention runs on each device's own heads, and XLA inserts one all-reduce after
o and one after down (the residual stream is constrained replicated: `constrain_replicated`).
A mixture-of-experts FFN runs per shard under `jax.shard_map` (`expert_parallel_ffn`): every shard
routes every token (the router is replicated), computes its own experts' share and the shares are
summed (one all-reduce, where the dense FFN has the one after down).
The attention kernels run per shard under `jax.shard_map` over "tensor" (`per_head_shard`, called
by sparsex_jax/programs/kernels.py):
each shard sees its local query heads and the KV heads they read (contiguous head blocks keep the
GQA grouping: query head n reads KV head n // G on the same shard).

Where n_kv_heads % tp != 0 `check_model` raises a ValueError naming the degrees that work (the
divisors of n_kv_heads): we do not replicate KV heads (vllm-project/tpu-inference does), which
would store the pool tp / n_kv_heads times over; see docs/SHARDING.md.

Programs find the mesh in jax's context (`jax.set_mesh`, entered by `programs.KVPool.run`), so
device programs stay pure functions of their pytrees and run unchanged (no shard_map, no
constraint) without a mesh.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models import moe

DATA, TENSOR = "data", "tensor"
AXES = (DATA, TENSOR)

# Logical axes of every weight (by its name in the params pytree, docs/CONTRACTS.md), and the mesh
# axis each logical axis maps to. "layers" is the stacked L axis of params["layers"].
LOGICAL_AXES = {
    "embed": ("vocab", "embed_tp"),
    "lm_head": ("embed", "vocab_tp"),
    "final_norm": ("embed",),
    # layers/attn_in
    "attn_in/norm": ("layers", "embed"),
    "wqkv": ("layers", "embed", "kv_heads", "qkv", "head_dim"),
    "bqkv": ("layers", "kv_heads", "qkv", "head_dim"),
    # layers/attn_out_mlp
    "wo": ("layers", "heads", "head_dim", "embed"),
    "attn_out_mlp/norm": ("layers", "embed"),
    "w_gate_up": ("layers", "embed", "gate_up", "ffn"),
    "w_down": ("layers", "ffn", "embed"),
    # Qwen3: per-head q/k norms
    "q_norm": ("layers", "head_dim"),
    "k_norm": ("layers", "head_dim"),
    # Qwen3 MoE: the router (every shard routes every token) and the experts
    "router": ("layers", "embed", "router_experts"),
    "expert_gate": ("layers", "experts", "embed", "expert_ffn"),
    "expert_up": ("layers", "experts", "embed", "expert_ffn"),
    "expert_down": ("layers", "experts", "expert_ffn", "embed"),
}
RULES = {"heads": TENSOR, "kv_heads": TENSOR, "ffn": TENSOR, "embed_tp": TENSOR,
         "vocab_tp": TENSOR, "experts": TENSOR}
# One layer's expert weights inside expert_parallel_ffn (the layer axis indexed away).
_EXPERT_SPECS = {"router": P(), "expert_gate": P(TENSOR), "expert_up": P(TENSOR),
                 "expert_down": P(TENSOR)}

# The KV pool [L, K, P, S, H]: KV heads over the tensor axis.
POOL = P(None, TENSOR, None, None, None)


def make_mesh(tp: int = 1, dp: int = 1, devices: Sequence | None = None) -> Mesh:
  """A ("data", "tensor") mesh of dp x tp devices (default: the first dp * tp of jax.devices(),
  every process's devices under jax.distributed)."""
  if not isinstance(tp, int) or not isinstance(dp, int) or tp < 1 or dp < 1:
    raise ValueError(f"tp and dp must be ints >= 1, got tp={tp!r}, dp={dp!r}")
  if dp != 1:
    raise ValueError("data parallelism (dp > 1) is not implemented yet: the mesh has room for it")
  devices = list(jax.devices() if devices is None else devices)
  if len(devices) < dp * tp:
    raise ValueError(f"tp={tp} x dp={dp} needs {tp * dp} devices, {len(devices)} available")
  grid = np.array(devices[:dp * tp], dtype=object).reshape(dp, tp)
  auto = getattr(jax.sharding, "AxisType", None)
  if auto is not None:  # GSPMD propagation ("Auto") everywhere: explicit sharding is not needed
    return Mesh(grid, AXES, axis_types=(auto.Auto, auto.Auto))
  return Mesh(grid, AXES)


def mesh_for(tp: int | None) -> Mesh | None:
  """The CLI's --tp: None -> no mesh (one device, unsharded); N -> make_mesh(N) (N = 1 runs the
  sharded code path on one device)."""
  return None if tp is None else make_mesh(tp)


def describe(x) -> str:
  """Where an array lives: its device, or its mesh and spec."""
  s = x.sharding
  if isinstance(s, NamedSharding):
    kind = next(iter(s.device_set)).device_kind
    return f"{len(s.device_set)} x {kind} ({dict(s.mesh.shape)}, {s.spec})"
  return str(next(iter(s.device_set)))


def tp_size(mesh: Mesh | None) -> int:
  return 1 if mesh is None else int(mesh.shape[TENSOR])


def valid_tp(cfg) -> list[int]:
  """Tensor-parallel degrees this model supports: the divisors of n_kv_heads (and of
  n_experts)."""
  return [d for d in range(1, cfg.n_kv_heads + 1)
          if cfg.n_kv_heads % d == 0 and cfg.n_experts % d == 0]


def check_model(cfg, mesh: Mesh | None) -> None:
  """Raises a ValueError unless the model's KV heads (and experts) split evenly over the mesh's
  tensor axis."""
  if mesh is None:
    return
  if tuple(mesh.axis_names) != AXES:
    raise ValueError(f"the mesh must have axes {AXES} (make_mesh), got {mesh.axis_names}")
  tp = tp_size(mesh)
  if cfg.n_kv_heads % tp:
    raise ValueError(
        f"tensor parallelism tp={tp} does not divide {cfg.name}'s n_kv_heads={cfg.n_kv_heads}: "
        f"the KV pool is split by KV heads; degrees that work: {valid_tp(cfg)}")
  if cfg.n_experts % tp:
    raise ValueError(
        f"tensor parallelism tp={tp} does not divide {cfg.name}'s n_experts={cfg.n_experts}: "
        f"the experts are split over the tensor axis")


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------

def _logical(path) -> tuple[str, ...]:
  names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  name = names[-1]
  if name == "norm":  # two norms per layer: name them by their module
    name = f"{names[-2]}/norm"
  if name not in LOGICAL_AXES:
    raise ValueError(f"no sharding rule for the weight {'/'.join(map(str, names))}")
  return LOGICAL_AXES[name]


def _spec(logical: tuple[str, ...], shape, tp: int) -> P:
  """Logical axes -> a PartitionSpec; a dim the axis does not divide stays replicated."""
  axes = []
  for name, n in zip(logical, shape):
    axis = RULES.get(name)
    axes.append(axis if axis is not None and n % tp == 0 else None)
  return P(*axes)


def param_specs(params, mesh: Mesh | None = None):
  """The PartitionSpec of every weight (a pytree like params; params may be ShapeDtypeStructs)."""
  tp = tp_size(mesh)
  return jax.tree_util.tree_map_with_path(
      lambda path, w: _spec(_logical(path), w.shape, tp), params)


def param_shardings(params, mesh: Mesh):
  return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh),
                      is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh: Mesh):
  """params laid out over the mesh (host or single-device arrays in; global arrays out)."""
  return jax.tree.map(put, params, param_shardings(params, mesh))


def init_params_sharded(cfg, mesh: Mesh, seed: int = 0):
  """Random params created directly in their shards (a 70B model never sits on one device)."""
  from models import llama
  fn = lambda: llama.init_params(cfg, seed)  # noqa: E731
  return jax.jit(fn, out_shardings=param_shardings(jax.eval_shape(fn), mesh))()


# ------------------------------------------------------------------------------------------------
# Pool and host inputs
# ------------------------------------------------------------------------------------------------

def pool_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, POOL)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(x, sharding: NamedSharding):
  """x (numpy, a scalar or a jax array) as a global array with `sharding`.

  Multi-host: every process passes the same host value (planning is replicated) and contributes
  its own devices' shards; jax arrays already laid out this way are returned as they are.
  """
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if jax.process_count() == 1 or x.is_fully_addressable:
      return jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicated_shapes(tree, mesh: Mesh):
  """As put_replicated, as shapes (nothing moves): what a program run with put_replicated's
  arguments is compiled for. Leaves already placed on the mesh (arrays, or shapes with a
  sharding over its devices) keep theirs."""
  rep = replicated(mesh)
  devices = set(mesh.devices.flat)

  def shape(x):
    placed = getattr(x, "sharding", None)
    if placed is not None and placed.device_set == devices:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed)
    x = x if hasattr(x, "dtype") and hasattr(x, "shape") else np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)

  return jax.tree.map(shape, tree)


def put_replicated(tree, mesh: Mesh):
  """Host leaves of a program's arguments -> replicated global arrays; arrays already on the mesh
  (the params, the pool, earlier outputs) pass through."""
  rep = replicated(mesh)
  devices = set(mesh.devices.flat)
  leaves, treedef = jax.tree.flatten(tree)
  todo = [i for i, x in enumerate(leaves)
          if not (isinstance(x, jax.Array) and x.sharding.device_set == devices)]
  if jax.process_count() == 1:  # one batched transfer (the decode loop calls this every step)
    moved = jax.device_put([leaves[i] for i in todo], [rep] * len(todo))
  else:
    moved = [put(leaves[i], rep) for i in todo]
  for i, x in zip(todo, moved):
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


# ------------------------------------------------------------------------------------------------
# Inside device programs (read the mesh from jax's context; no-ops without one)
# ------------------------------------------------------------------------------------------------

def context_mesh():
  """The mesh programs are traced under (jax.set_mesh), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or TENSOR not in mesh.axis_names:
    return None
  return mesh


def constrain_replicated(x):
  """The residual stream between layers: replicated, so XLA all-reduces the partial sums of o and
  down (row-parallel) right there. A no-op without a mesh."""
  if context_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, P())


def heads_spec(ndim: int, head_axis: int) -> P:
  axes = [None] * ndim
  axes[head_axis] = TENSOR
  return P(*axes)


def per_head_shard(fn, in_specs, out_specs):
  """fn run per tensor shard (jax.shard_map) when traced under a mesh, else fn itself."""
  if context_mesh() is None:
    return fn
  return _shard_map(fn, in_specs, out_specs)


def _shard_map(fn, in_specs, out_specs):
  # jax.shard_map (jax >= 0.7; 0.10 on CPU and 0.11 on GPU here) takes the mesh from the context.
  # check_vma=False: the Pallas calls inside carry no varying-axes annotations.
  return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def expert_parallel_ffn(hx, params, cfg, grouped_matmul=jax.lax.ragged_dot):
  """The mixture-of-experts FFN (models.moe.moe_ffn) with the experts split over the tensor axis:
  each shard routes every token, runs its own E / tp experts on the tokens routed to them, and the
  shares are summed over the shards. Without a mesh: moe_ffn itself. hx: replicated.
  grouped_matmul: the experts' matmul (models.moe.experts_ffn), run on each shard's experts."""
  if context_mesh() is None:
    return moe.moe_ffn(hx, params, cfg, grouped_matmul=grouped_matmul)

  def local(hx, params):
    first = jax.lax.axis_index(TENSOR) * params["expert_gate"].shape[0]
    return jax.lax.psum(moe.moe_ffn(hx, params, cfg, first_expert=first,
                                    grouped_matmul=grouped_matmul), TENSOR)

  return _shard_map(local, in_specs=(P(), _EXPERT_SPECS), out_specs=P())(hx, params)


def sum_over_shards(x):
  """Inside per_head_shard: the sum of x over the tensor axis (heads split there)."""
  return jax.lax.psum(x, TENSOR)


def memory_per_device(tree) -> dict:
  """Bytes of `tree`'s arrays held on each device (addressable shards), by device id."""
  out: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device.id] = out.get(shard.device.id, 0) + shard.data.nbytes
  return out


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
