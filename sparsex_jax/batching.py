"""The running batch: the host's view of the decode loop's rows between two device loops.

Plain numpy, no jax. The batch has a fixed number of rows (the decode program's batch dimension,
so one running loop compiles once, however requests come and go) and a fixed page-table width and
stop-list width. A request joins a free row after its prefill with its first sampled token,
advances by chunks of tokens (decode_loop), and leaves when it is done; whoever admitted it then
releases its pages. An empty row is "done" with position 0 and null pages: the device loop skips
it (its K/V write goes to the sentinel slot).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sparsex_jax.kv.layout import PoolLayout
from sparsex_jax.programs.decode import DecodeRows
from sparsex_jax.sampling import finish


def stop_width(stops) -> int:
  """The stop-list width of a job (a power of two, at least 1): few compiled shapes."""
  n = max([len(s) for s in stops] + [1])
  return 1 << (n - 1).bit_length()


@dataclasses.dataclass(eq=False)
class DecodingRequest:
  """One request in the running batch: its tokens so far and what its caller needs at the end."""

  key: Any  # the caller's handle (the scheduler's job)
  tokens: list[int]
  stops: frozenset[int]
  max_new_tokens: int
  payload: Any = None  # the caller's per-request state (leases, prefill account, times)

  @property
  def done(self) -> bool:
    return bool(self.tokens) and (self.tokens[-1] in self.stops
                                  or len(self.tokens) >= self.max_new_tokens)

  def result(self) -> tuple[list[int], str]:
    """(output tokens, finish reason), as sampling.finish."""
    return finish(self.tokens, self.stops)


class RunningBatch:
  """`n_rows` rows of decode state (host copies of DecodeRows) and the request decoding in each."""

  def __init__(self, n_rows: int, max_pages: int, max_stops: int, layout: PoolLayout):
    self.layout = layout
    self.requests: list[DecodingRequest | None] = [None] * n_rows
    self.tokens = np.zeros(n_rows, np.int32)
    self.positions = np.zeros(n_rows, np.int32)
    self.n_generated = np.zeros(n_rows, np.int32)
    self.max_new_tokens = np.ones(n_rows, np.int32)
    self.done = np.ones(n_rows, bool)
    self.stop_ids = np.full((n_rows, max_stops), -1, np.int32)
    self.page_table = np.zeros((n_rows, max_pages), np.int32)
    self.temperature = np.zeros(n_rows, np.float32)
    self.top_p = np.ones(n_rows, np.float32)
    self.seeds = np.zeros(n_rows, np.uint32)

  @property
  def n_rows(self) -> int:
    return len(self.requests)

  @property
  def n_running(self) -> int:
    return sum(s is not None for s in self.requests)

  @property
  def n_free(self) -> int:
    return self.n_rows - self.n_running

  def running(self) -> list[DecodingRequest]:
    return [s for s in self.requests if s is not None]

  def join(self, seq: DecodingRequest, prompt_len: int, page_table: np.ndarray, *,
           temperature: float, top_p: float, seed: int) -> int:
    """Puts a prefilled sequence (its first token sampled, not done) in a free row; its row."""
    if seq.done:
      raise ValueError("a sequence that is already done does not join the batch")
    if len(seq.stops) > self.stop_ids.shape[1] or page_table.size > self.page_table.shape[1]:
      raise ValueError("the sequence's stops or pages exceed the batch's widths")
    row = self.requests.index(None)
    self.requests[row] = seq
    self.tokens[row] = seq.tokens[-1]
    self.positions[row] = prompt_len + len(seq.tokens) - 1
    self.n_generated[row] = len(seq.tokens)
    self.max_new_tokens[row] = seq.max_new_tokens
    self.done[row] = False
    self.stop_ids[row] = -1
    self.stop_ids[row, :len(seq.stops)] = sorted(seq.stops)
    self.page_table[row] = 0
    self.page_table[row, :page_table.size] = page_table
    self.temperature[row], self.top_p[row], self.seeds[row] = temperature, top_p, seed
    return row

  def leave(self, row: int) -> DecodingRequest:
    """Empties a row; returns its sequence (the caller releases its pages)."""
    seq = self.requests[row]
    self.requests[row] = None
    self.tokens[row] = self.positions[row] = self.n_generated[row] = 0
    self.done[row] = True
    self.stop_ids[row] = -1
    self.page_table[row] = 0
    return seq

  def finished(self) -> list[DecodingRequest]:
    """The sequences that are done, taken out of their rows."""
    return [self.leave(r) for r, s in enumerate(self.requests) if s is not None and self.done[r]]

  def device_rows(self) -> DecodeRows:
    return DecodeRows(tokens=self.tokens, positions=self.positions, n_generated=self.n_generated,
                      max_new_tokens=self.max_new_tokens, done=self.done, stop_ids=self.stop_ids,
                      page_table=self.page_table, temperature=self.temperature, top_p=self.top_p,
                      seeds=self.seeds)

  def advance(self, rows: DecodeRows, new_tokens: np.ndarray) -> int:
    """Takes the decode loop's output: rows after the loop, new_tokens [B, steps] (-1 padded).
    Returns the number of tokens generated."""
    n_before = self.n_generated.copy()
    self.tokens = np.array(rows.tokens, np.int32)
    self.positions = np.array(rows.positions, np.int32)
    self.n_generated = np.array(rows.n_generated, np.int32)
    self.done = np.array(rows.done, bool)
    new_tokens = np.asarray(new_tokens)
    total = 0
    for r, seq in enumerate(self.requests):
      n = int(self.n_generated[r] - n_before[r])
      if seq is not None and n:
        seq.tokens.extend(int(t) for t in new_tokens[r, :n])
        total += n
    return total
