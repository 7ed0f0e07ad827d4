"""Token sampling (greedy, temperature, top-p), the request's sampling parameters, and stop
tokens: one implementation for the paged engine and the dense reference path.

A row's PRNG key at output step i is fold_in(PRNGKey(seed), i): a request's samples depend on its
seed and its own logits only, never on its batch mates, its row, or the batch size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import jax
import jax.numpy as jnp

from sparsex_jax.validation import is_int, is_real


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick output tokens. temperature 0 is greedy; seed makes sampling reproducible."""

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  seed: int = 0
  stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's stop ids
  ignore_eos: bool = False

  def __post_init__(self):
    if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
    if not is_real(self.temperature) or not 0 <= self.temperature < math.inf:
      raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got "
                       f"{self.temperature!r}")
    if not is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if not is_int(self.seed) or not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
    if self.stop_token_ids is not None:
      ids = tuple(self.stop_token_ids)
      if not all(is_int(i) and i >= 0 for i in ids):
        raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
      object.__setattr__(self, "stop_token_ids", ids)


def sample(logits: jax.Array, temperature: jax.Array, top_p: jax.Array, keys: jax.Array):
  """Next tokens [B] from logits [B, V]; temperature, top_p [B] and PRNG keys [B, 2] per row.

  Temperature 0 is argmax. Per-row keys make a request's samples independent of its batch mates.
  Per-row parameters are arrays, not static, so one compiled program serves any mix of requests.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def nucleus(scaled):
    # top-p: keep the smallest set of tokens whose probability mass reaches top_p. A row with
    # top_p = 1 keeps every token here too (float rounding of the cumulative sum could otherwise
    # cut its tail), so it samples the same token whichever branch its batch takes.
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = mass_before < top_p[:, None]
    threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.where(top_p[:, None] < 1.0, threshold, -jnp.inf)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)

  def draw(_):
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    # The vocabulary sort (a real cost at 128K vocab, every step) only when some row truncates.
    scaled = jax.lax.cond(jnp.any((top_p < 1.0) & (temperature > 0)), nucleus, lambda s: s,
                          scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)

  # An all-greedy batch skips sampling altogether.
  return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)


def step_keys(seeds: jax.Array, step) -> jax.Array:
  """PRNG keys [B, 2] of output step `step` (a scalar, or [B]: one per row) for rows seeded with
  seeds [B]."""
  steps = jnp.broadcast_to(jnp.asarray(step, jnp.uint32), jnp.shape(seeds))
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds, steps)


@jax.jit
def sample_step(logits, temperature, top_p, seeds, step):
  """Samples output step `step` from logits [B, V] with per-row parameters (jitted)."""
  return sample(logits, temperature, top_p, step_keys(seeds, step))


def resolve_stop_ids(sampling: SamplingParams, default: Iterable[int] = ()) -> frozenset[int]:
  """The token ids that end a sequence: the request's, else the tokenizer's; none if ignore_eos."""
  if sampling.ignore_eos:
    return frozenset()
  if sampling.stop_token_ids is not None:
    return frozenset(sampling.stop_token_ids)
  return frozenset(default or ())


def is_finished(tokens: list[int], stops: frozenset[int], max_new_tokens: int) -> bool:
  return bool(tokens) and (tokens[-1] in stops or len(tokens) >= max_new_tokens)


def finish(tokens: list[int], stops: frozenset[int]) -> tuple[list[int], str]:
  """(output tokens, finish reason): a final stop token is dropped and gives "stop"."""
  if tokens and tokens[-1] in stops:
    return tokens[:-1], "stop"
  return tokens, "length"
