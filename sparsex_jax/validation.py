"""Type checks for user-facing numbers: a bool is not an int, a string is not a ratio."""

from __future__ import annotations

import numpy as np


def is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def is_real(x) -> bool:
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)
