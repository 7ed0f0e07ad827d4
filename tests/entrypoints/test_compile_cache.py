"""The CLI's compile cache on disk: where it goes, and that a second process reads the programs
the first compiled and gives the same outputs."""

import json
import os
import re
import subprocess
import sys

import pytest

from sparsex_jax.entrypoints import compile_cache
from tests.research.scripts import CHEAP_XLA_FLAGS

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_where_the_cache_goes():
  home = {"HOME": "/h"}
  assert compile_cache.resolve(None, home) == "/h/.cache/sparsex-jax/xla"
  assert compile_cache.resolve(None, {"XDG_CACHE_HOME": "/x"} | home) == "/x/sparsex-jax/xla"
  assert compile_cache.resolve(None, {"SPARSEX_COMPILE_CACHE": "/s"} | home) == "/s"
  assert compile_cache.resolve("/f", {"SPARSEX_COMPILE_CACHE": "/s"}) == "/f"  # the flag wins
  assert compile_cache.resolve(None, {"SPARSEX_COMPILE_CACHE": "off"}) is None
  assert compile_cache.resolve("OFF", {"SPARSEX_COMPILE_CACHE": "/s"}) is None
  # jax's own variable wins over everything: jax reads it itself
  assert compile_cache.resolve("/f", {"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"


def test_a_second_process_reads_the_programs_and_gives_the_same_outputs(tmp_path):
  req = tmp_path / "req.jsonl"
  req.write_text("".join(json.dumps({"id": f"r{i}", "max_new_tokens": 4, "segments": [
      {"tokens": list(range(10, 40))}, {"tokens": list(range(100 + i, 108 + i)),
                                        "cache": False}]}) + "\n" for i in range(3)))
  cache = tmp_path / "xla"
  # Every program is written (CPU compiles of the tiny model take less than jax's default 1 s).
  env = {k: v for k, v in os.environ.items() if k not in ("SPARSEX_COMPILE_CACHE",
                                                          "JAX_COMPILATION_CACHE_DIR")}
  env |= {"JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "XLA_FLAGS": CHEAP_XLA_FLAGS}  # both processes alike: a cheaper first compile
  runs = []
  for n in range(2):
    out = tmp_path / f"out{n}.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsex_jax.entrypoints.cli", "generate", "--model", "random:tiny",
         "--input", str(req), "--output", str(out), "--no-progress", "--pool-gib", "0.01",
         "--compile-cache", str(cache)], cwd=_ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = re.search(r"^compile cache \S+: (\d+) programs, (\d+) of them read from the cache",
                       proc.stderr, re.M)
    assert counts, proc.stderr[-2000:]
    programs, hits = int(counts.group(1)), int(counts.group(2))
    runs.append((programs, hits, [json.loads(x)["token_ids"] for x in
                                  out.read_text().splitlines()]))
  (p0, h0, tokens0), (p1, h1, tokens1) = runs
  assert p0 > 0 and h0 == 0 and len(os.listdir(cache)) > 0  # the first wrote what it compiled
  assert h1 == p1 == p0  # the second compiled nothing: every program came from the disk
  assert tokens1 == tokens0 and all(len(t) == 4 for t in tokens0)


def test_a_directory_that_cannot_be_written(tmp_path, monkeypatch):
  blocker = tmp_path / "a-file"
  blocker.write_text("")  # a directory cannot be made below a file
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  # Named by the flag: an error naming it, before any work.
  with pytest.raises(ValueError, match="--compile-cache .*a-file/xla: cannot keep"):
    compile_cache.enable(str(blocker / "xla"))
  # The default (here from the variable): a warning, and the job goes on without a cache.
  monkeypatch.setenv("SPARSEX_COMPILE_CACHE", str(blocker / "xla"))
  warnings = []
  path, stats = compile_cache.enable(None, warn=warnings.append)
  assert path is None and "cannot be used" in warnings[0] and str(blocker) in warnings[0]
  assert compile_cache.describe(path, stats).startswith("compile cache off: 0 programs")
