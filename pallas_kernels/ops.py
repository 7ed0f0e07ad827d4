"""Dispatch layer: one attention interface, kernels on GPU, references on CPU.

backend:
  "auto"              Pallas kernel when jax.default_backend() == "gpu", else
                      the pure-jnp reference (CPU engine runs, tests).
  "reference"         pure-jnp reference.
  "pallas"            Pallas kernels (needs a GPU): the sparse-query attention on Mosaic GPU
                      where it runs (Hopper, bf16/f16, head dim a multiple of 64, pages that
                      tile 128 keys; attention_mgpu.supports), Triton everywhere else.
  "pallas_triton"     Pallas kernels with the Triton lowering only (the fallback, and the
                      baseline the Mosaic GPU kernel is measured against).
  "pallas_interpret"  Pallas kernel in interpret mode (CPU; slow, for tests).
(causal_attention, the full layers' dense attention, is cuDNN under "pallas" and
XLA otherwise: it has no Pallas kernel of ours. grouped_matmul, the experts of a mixture of
experts, is jax's Mosaic GPU kernel under "pallas" where it runs and XLA's ragged_dot otherwise.)
Extra keyword arguments (block sizes, num_warps, ...) go to the kernel and are
ignored by the reference.

layer: None (k_pages, v_pages are one layer [K, P, S, H]) or an int32 scalar
(traced or not) picking a layer of the whole pool [L, K, P, S, H]. Pass the
whole pool with layer= inside a layer loop: slicing pool[layer] there would
make XLA copy the layer's K/V for the kernel's custom call.

Tensor parallelism is not this module's business: it sees whole arrays or one
shard's, and imports nothing outside jax and pallas_kernels.
sparsex_jax/programs/kernels.py runs these ops per head shard under a mesh.
"""

import jax
import jax.numpy as jnp

from pallas_kernels import _compat, attention_mgpu
from pallas_kernels import grouped_matmul as _grouped
from pallas_kernels.assemble import assemble_kv as _assemble_kv_kernel
from pallas_kernels.assemble import assemble_kv_reference
from pallas_kernels.attention import paged_attention, paged_attention_reference
from pallas_kernels.decode import (paged_decode_attention,
                                   paged_decode_attention_reference)
from pallas_kernels.importance import (sparse_q_importance,
                                       sparse_q_importance_reference)
from pallas_kernels.write import write_kv as _write_kv_kernel
from pallas_kernels.write import write_kv_reference

# causal_attention: contiguous causal attention (cuDNN on GPU) for the full layers.
BACKENDS = ("auto", "reference", "pallas", "pallas_triton", "pallas_interpret")
COMPILED = ("pallas", "pallas_triton")  # backends that run compiled GPU kernels


def resolve_backend(backend: str) -> str:
  """'auto' -> 'pallas' on GPU, 'reference' elsewhere; validates the name."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "auto":
    return "pallas" if _compat.on_gpu() else "reference"
  return backend


def compiled(backend: str) -> bool:
  """Whether backend runs compiled GPU kernels (cuDNN for the dense full layers among them)."""
  return resolve_backend(backend) in COMPILED


def _call(kernel, reference, backend, args, kwargs, kernel_kwargs):
  """reference(*args, **kwargs), or kernel(*args, **kwargs, **kernel_kwargs) compiled or
  interpreted, as backend says."""
  backend = resolve_backend(backend)
  if backend == "reference":
    return reference(*args, **kwargs)
  return kernel(*args, **kwargs, **kernel_kwargs, interpret=(backend == "pallas_interpret"))


def attention(q, q_pos, k_pages, v_pages, page_table, kv_len, *, sm_scale,
              layer=None, backend="auto", **kernel_kwargs):
  """Sparse-query paged attention -> (out [B,T,N,H], lse [B,T,N] f32).

  Under "pallas" the Mosaic GPU kernel where it supports the inputs (kernel_kwargs, Triton
  block sizes, keep the Triton kernel)."""
  kernel = paged_attention
  if (resolve_backend(backend) == "pallas" and not kernel_kwargs
      and attention_mgpu.supports(q, k_pages, page_table)):
    kernel = attention_mgpu.paged_attention_mgpu
  return _call(kernel, paged_attention_reference, backend,
               (q, q_pos, k_pages, v_pages, page_table, kv_len),
               dict(sm_scale=sm_scale, layer=layer), kernel_kwargs)


def importance(q, positions, rows, k_pool, page_table, kv_len, lse, *, sm_scale, layer=None,
               backend="auto", **kernel_kwargs):
  """Sparse-Q importance -> [B, MP*S] f32: the attention mass the rows marked in rows [B, T]
  give each key, summed over the rows and the query heads."""
  return _call(sparse_q_importance, sparse_q_importance_reference, backend,
               (q, positions, rows, k_pool, page_table, kv_len, lse),
               dict(sm_scale=sm_scale, layer=layer), kernel_kwargs)


def attention_with_importance(q, q_pos, q_is_sparse, k_pages, v_pages,
                              page_table, kv_len, *, sm_scale, layer=None, backend="auto"):
  """Attention plus the Sparse-Q importance of the same layer -> (out, lse, imp).

  Two passes by necessity: the probabilities need the final lse of each row,
  which the attention pass produces; the importance pass recomputes Q K^T
  for the Sparse-Q rows only.
  """
  out, lse = attention(q, q_pos, k_pages, v_pages, page_table, kv_len,
                       sm_scale=sm_scale, layer=layer, backend=backend)
  imp = importance(q, q_pos, q_is_sparse, k_pages, page_table, kv_len, lse,
                   sm_scale=sm_scale, layer=layer, backend=backend)
  return out, lse, imp


def assemble_kv(k_pool, v_pool, src, dst, delta, inv_freq, first_layer=0, *, backend="auto",
                **kernel_kwargs):
  """Reused K/V of layers [first_layer, L) from slots src to dst [B, T], K re-rotated by delta,
  in one pass -> (k_pool, v_pool). The kernel needs a power-of-two half head dim (else: the
  reference)."""
  half = k_pool.shape[-1] // 2
  if half & (half - 1):
    backend = "reference"
  return _call(_assemble_kv_kernel, assemble_kv_reference, backend,
               (k_pool, v_pool, src, dst, delta, inv_freq), dict(first_layer=first_layer),
               kernel_kwargs)


def write_kv(k_pool, v_pool, slots, k, v, *, layer, backend="auto", **kernel_kwargs):
  """One layer's K/V k, v [..., K, H] written at flat slots [...] of the whole pool (sentinel
  slots dropped) -> (k_pool, v_pool); in place where the pool is donated."""
  return _call(_write_kv_kernel, write_kv_reference, backend, (k_pool, v_pool, slots, k, v),
               dict(layer=layer), kernel_kwargs)


def causal_attention(q, k, v, *, sm_scale, backend="auto"):
  """Causal attention over contiguous rows: query row t sees key rows j <= t.

  q [B, S, N, H], k, v [B, S, K, H] (GQA) -> [B, S, N, H]. No lengths: for a row of length n
  padded to S, a real query t < n reads only real keys j <= t, so the causal mask alone is exact
  there, and rows t >= n are garbage (callers mask them). cuDNN's padding-aware causal mask is
  slower than the plain one even at 20% padding on an H100 (32K: 14.8 ms at 80% length, 15.9 ms
  at full length, 14.5 ms without lengths; docs/ttft.md), so it is not used. The full layers'
  dense path: cuDNN flash attention on the GPU (compiled backends; bf16/f16, head dim a multiple
  of 8 up to 128), XLA's materialised softmax elsewhere (small problems and tests: it holds
  [B, N, S, S] logits).
  """
  impl = "cudnn" if compiled(backend) else "xla"
  return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=True,
                                      implementation=impl)


def cudnn_can_run(dtype, head_dim: int) -> bool:
  """Whether causal_attention's cuDNN path takes these inputs (checked before choosing it)."""
  return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and head_dim % 8 == 0 and head_dim <= 128)


def decode_attention(q, k_pages, v_pages, page_table, kv_len, *, sm_scale,
                     layer=None, backend="auto", **kernel_kwargs):
  """Paged decode attention, one query token per request -> [B, N, H]."""
  return _call(paged_decode_attention, paged_decode_attention_reference, backend,
               (q, k_pages, v_pages, page_table, kv_len),
               dict(sm_scale=sm_scale, layer=layer), kernel_kwargs)


def grouped_matmul(lhs, rhs, group_sizes, *, backend="auto", **kernel_kwargs):
  """lhs [M, K] with rows sorted by group, rhs [G, K, N], group_sizes [G] -> [M, N]: each group's
  rows times its matrix; rows past sum(group_sizes) unspecified (pallas_kernels/grouped_matmul.py).
  The Mosaic GPU kernel under "pallas" where it runs (grouped_matmul.supports), XLA's ragged_dot
  otherwise (the Triton backends included: this kernel has no Triton form)."""
  if resolve_backend(backend) == "pallas" and _grouped.supports(lhs, rhs):
    return _grouped.grouped_matmul(lhs, rhs, group_sizes, **kernel_kwargs)
  return _grouped.grouped_matmul_reference(lhs, rhs, group_sizes)
