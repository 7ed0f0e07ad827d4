"""Version shims for the Pallas Triton lowering (jax 0.10.x CPU, jax 0.11.x GPU).

Why this exists: pallas_call picks its GPU backend from the type of
`compiler_params`, and the default backend changed between jax 0.10 (Triton)
and 0.11 (Mosaic GPU). Every kernel in this package is written for the Triton
lowering, so every pallas_call passes `triton_params(...)` explicitly.
"""

import functools

import jax


@functools.cache
def _triton_params_cls():
  """Returns the Triton CompilerParams class under whichever name exists."""
  try:  # jax >= 0.6: jax.experimental.pallas.triton.CompilerParams
    from jax.experimental.pallas import triton as pl_triton
    return pl_triton.CompilerParams
  except (ImportError, AttributeError):
    pass
  try:  # older jax: jax.experimental.pallas.gpu.TritonCompilerParams
    from jax.experimental.pallas import gpu as pl_gpu  # type: ignore
    return pl_gpu.TritonCompilerParams
  except (ImportError, AttributeError) as e:
    raise ImportError(
        f"no Pallas Triton CompilerParams found in jax {jax.__version__}") from e


def triton_params(num_warps: int, num_stages: int):
  """Triton compiler params (selects the Triton lowering on GPU)."""
  return _triton_params_cls()(num_warps=num_warps, num_stages=num_stages)


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def next_pow2(x: int) -> int:
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


@functools.cache
def mosaic_gpu_available() -> bool:
  """Whether this process can run Mosaic GPU kernels: a Hopper GPU (compute capability 9.x) and
  jax's plgpu module."""
  try:
    import jax.experimental.pallas.mosaic_gpu  # noqa: F401  (present in this jax?)
  except ImportError:
    return False
  if not on_gpu():
    return False
  cc = getattr(jax.devices()[0], "compute_capability", "")
  return str(cc).startswith("9.")
