"""sparsex-jax: SparseX segment-level KV-cache reuse in JAX/Pallas."""

from sparsex_jax.api import (PrefillPlan, Request, RequestError, RequestOutput, RequestStats,
                             ReuseConfig, Segment)
from sparsex_jax.engine import Engine
from sparsex_jax.sampling import SamplingParams

__all__ = ["Engine", "PrefillPlan", "Request", "RequestError", "RequestOutput", "RequestStats",
           "ReuseConfig", "SamplingParams", "Segment"]
