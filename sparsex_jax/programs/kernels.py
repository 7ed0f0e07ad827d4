"""The kernels as the device programs call them: pallas_kernels.ops, per head shard under a mesh.

The one door from the engine to pallas_kernels (tests/test_imports.py keeps it so): the programs,
the planner (`full_attention_kind` asks `compiled` and `cudnn_can_run`) and the engine
(`resolve_backend`) import the kernels from here. pallas_kernels itself knows nothing of meshes.

Tensor parallelism: traced under a mesh (sparsex_jax/sharding.py), every op runs per shard under
jax.shard_map over the "tensor" axis: each shard gets its own query heads and the KV heads of the
pool it holds (contiguous head blocks keep the GQA grouping), and importance sums its local heads,
then over the shards. Without a mesh each op is the pallas_kernels.ops call itself.

backend, layer and the kernels' keyword arguments: as in pallas_kernels/ops.py.
"""

from __future__ import annotations

from pallas_kernels import ops
from pallas_kernels.ops import BACKENDS, compiled, cudnn_can_run, resolve_backend
from sparsex_jax import sharding

__all__ = ["BACKENDS", "assemble_kv", "attention", "causal_attention", "compiled",
           "cudnn_can_run", "decode_attention", "grouped_matmul", "importance", "resolve_backend",
           "write_kv"]

POOL = "pool"  # an argument whose head axis is the pool's KV-head axis (0 for one layer, 1 whole)


def _per_shard(op, args, arg_heads, out_heads, *, layer=None, sum_over_shards=False, **kwargs):
  """op(*args, layer=layer, **kwargs), run per head shard where a mesh is active.

  arg_heads: each arg's head axis (None: replicated; POOL: the pool's KV-head axis);
  out_heads: (ndim, head axis) of the output, or a tuple of them for several outputs, or None for
  a replicated output; sum_over_shards: the replicated output is each shard's partial sum.
  layer (None: the op gets no layer argument) travels as a replicated argument: it may be traced.
  """
  if sharding.context_mesh() is None:
    return op(*args, **kwargs) if layer is None else op(*args, layer=layer, **kwargs)
  pool_axis = 0 if layer is None else 1  # one layer [K, P, S, H] or the pool [L, K, P, S, H]
  in_specs = tuple(
      sharding.P() if a is None else sharding.heads_spec(x.ndim, pool_axis if a == POOL else a)
      for x, a in zip(args, arg_heads))
  if out_heads is None:
    out_specs = sharding.P()
  elif isinstance(out_heads[0], tuple):
    out_specs = tuple(sharding.heads_spec(*o) for o in out_heads)
  else:
    out_specs = sharding.heads_spec(*out_heads)
  if layer is None:
    def fn(*xs):
      return op(*xs, **kwargs)
  else:
    def fn(*xs):
      return op(*xs[:-1], layer=xs[-1], **kwargs)
    args, in_specs = (*args, layer), (*in_specs, sharding.P())
  if sum_over_shards:
    local = fn

    def fn(*xs):
      return sharding.sum_over_shards(local(*xs))
  return sharding.per_head_shard(fn, in_specs, out_specs)(*args)


def attention(q, q_pos, k_pages, v_pages, page_table, kv_len, *, sm_scale, layer=None,
              backend="auto", **kernel_kwargs):
  """Sparse-query paged attention -> (out [B, T, N, H], lse [B, T, N] f32)."""
  return _per_shard(ops.attention, (q, q_pos, k_pages, v_pages, page_table, kv_len),
                    (2, None, POOL, POOL, None, None), ((4, 2), (3, 2)), layer=layer,
                    sm_scale=sm_scale, backend=backend, **kernel_kwargs)


def importance(q, positions, rows, k_pool, page_table, kv_len, lse, *, sm_scale, layer=None,
               backend="auto", **kernel_kwargs):
  """Sparse-Q importance -> [B, MP*S] f32: the attention mass the rows marked in rows [B, T]
  give each key, summed over rows and query heads (each shard sums its heads, then the shards
  are summed)."""
  return _per_shard(ops.importance, (q, positions, rows, k_pool, page_table, kv_len, lse),
                    (2, None, None, POOL, None, None, 2), None, layer=layer,
                    sum_over_shards=True, sm_scale=sm_scale, backend=backend, **kernel_kwargs)


def decode_attention(q, k_pages, v_pages, page_table, kv_len, *, sm_scale, layer=None,
                     backend="auto", **kernel_kwargs):
  """Paged decode attention, one query token per request -> [B, N, H]."""
  return _per_shard(ops.decode_attention, (q, k_pages, v_pages, page_table, kv_len),
                    (1, POOL, POOL, None, None), (3, 1), layer=layer, sm_scale=sm_scale,
                    backend=backend, **kernel_kwargs)


def assemble_kv(k_pool, v_pool, src, dst, delta, inv_freq, first_layer=0, *, backend="auto",
                **kernel_kwargs):
  """Reused K/V of layers [first_layer, L) moved from slots src to dst, K re-rotated by delta
  -> (k_pool, v_pool); each shard assembles its own KV heads (axis 1 of the whole pools)."""
  return _per_shard(ops.assemble_kv, (k_pool, v_pool, src, dst, delta, inv_freq),
                    (1, 1, None, None, None, None), ((5, 1), (5, 1)), backend=backend,
                    first_layer=first_layer, **kernel_kwargs)


def write_kv(k_pool, v_pool, slots, k, v, *, layer, backend="auto", **kernel_kwargs):
  """One layer's K/V k, v [..., K, H] written at flat slots [...] of the whole pool
  -> (k_pool, v_pool); each shard writes its own KV heads (axis 1 of the pool, -2 of k, v)."""
  return _per_shard(ops.write_kv, (k_pool, v_pool, slots, k, v),
                    (POOL, POOL, None, k.ndim - 2, v.ndim - 2), ((5, 1), (5, 1)), layer=layer,
                    backend=backend, **kernel_kwargs)


def causal_attention(q, k, v, *, sm_scale, backend="auto"):
  """Causal attention over contiguous rows (the full layers' dense path; see ops.causal_attention).

  Not wrapped per shard: it is jax.nn.dot_product_attention, which XLA partitions itself.
  """
  return ops.causal_attention(q, k, v, sm_scale=sm_scale, backend=backend)


def grouped_matmul(lhs, rhs, group_sizes, *, backend="auto"):
  """The experts' grouped matmul (ops.grouped_matmul). Not wrapped per shard: it runs inside
  sharding.expert_parallel_ffn's shard_map already, on each shard's own experts."""
  return ops.grouped_matmul(lhs, rhs, group_sizes, backend=backend)
