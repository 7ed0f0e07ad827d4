"""GPU kernels (Pallas: Triton lowering; Mosaic GPU on Hopper), a pure-jnp reference beside each.

- paged_attention / paged_attention_reference: sparse-query attention over the
  paged KV pool (GQA, causal by absolute position), returns (out, lse).
- attention_mgpu.paged_attention_mgpu: the same attention with Mosaic GPU (Hopper), what
  ops.attention runs under "pallas" where attention_mgpu.supports holds.
- sparse_q_importance / sparse_q_importance_reference: per-key attention mass of
  the Sparse-Q rows, exact and deterministic.
- paged_decode_attention / paged_decode_attention_reference: flash-decoding.
- assemble.assemble_kv / assemble_kv_reference: reused K/V gathered, re-rotated and written in
  one pass, in place.
- write.write_kv / write_kv_reference: one layer's K/V written at flat slots, in place.
- ops: dispatch (kernels on GPU, references on CPU) behind one interface.
"""

from pallas_kernels import ops
from pallas_kernels.attention import paged_attention, paged_attention_reference
from pallas_kernels.decode import (paged_decode_attention,
                                   paged_decode_attention_reference)
from pallas_kernels.importance import (sparse_q_importance,
                                       sparse_q_importance_reference)
from pallas_kernels.ops import (attention, attention_with_importance,
                                decode_attention, importance)

__all__ = [
    "attention",
    "attention_with_importance",
    "decode_attention",
    "importance",
    "ops",
    "paged_attention",
    "paged_attention_reference",
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "sparse_q_importance",
    "sparse_q_importance_reference",
]
