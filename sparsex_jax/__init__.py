"""sparsex-jax: SparseX segment-level KV-cache reuse in JAX/Pallas."""

from sparsex_jax.api import (PrefillPlan, Request, RequestError, RequestOutput, RequestStats,
                             Segment)
from sparsex_jax.chat import chat_request, chat_segments, message_segments
from sparsex_jax.engine import Engine
from sparsex_jax.kv.persist import CacheError
from sparsex_jax.reuse import (CacheBlend, Epic, Full, Naive, Prefix, Random, ReuseConfig,
                               ReuseMethod, SparseX, SparseXAttention, SparseXPaper)
from sparsex_jax.sampling import SamplingParams
from sparsex_jax.sharding import make_mesh, mesh_for

__all__ = ["CacheBlend", "CacheError", "Engine", "Epic", "Full", "Naive", "Prefix", "PrefillPlan",
           "Random", "Request", "RequestError", "RequestOutput", "RequestStats", "ReuseConfig",
           "ReuseMethod", "SamplingParams", "Segment", "SparseX", "SparseXAttention",
           "SparseXPaper", "chat_request", "chat_segments", "make_mesh", "mesh_for",
           "message_segments"]
