"""Compiled programs kept on disk between processes (jax's persistent compilation cache).

A fresh process compiles every program its job meets; on an H100 a 1,000-request continuous job
of Llama-3-8B shapes spends 53 s of its 115 s in XLA's compiler, and a second process with the
programs on disk spends 3 s there (docs/throughput.md, round 5). Tracing and lowering (about 23 s
in that job) are paid in every process: the cache holds executables, keyed by the lowered program,
jax version, device and compiler options, so a different model, shape or jax never reads a stale
entry.

Where (first that is set): jax's own JAX_COMPILATION_CACHE_DIR (jax reads it itself), the CLI's
--compile-cache, $SPARSEX_COMPILE_CACHE, then $XDG_CACHE_HOME/sparsex-jax/xla (~/.cache/...).
"off" (flag or variable) turns it off. jax writes only programs that took at least
jax_persistent_cache_min_compile_time_secs (1 s by default) to compile.
"""

from __future__ import annotations

import os

ENV = "SPARSEX_COMPILE_CACHE"
OFF = ("off", "none", "")


def resolve(flag: str | None = None, environ=None) -> str | None:
  """The cache directory the settings above give, or None when it is off."""
  environ = os.environ if environ is None else environ
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  value = flag if flag is not None else environ.get(ENV)
  if value is None:
    home = environ.get("HOME") or os.path.expanduser("~")
    base = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    value = os.path.join(base, "sparsex-jax", "xla")
  return None if value.strip().lower() in OFF else value


class CompileStats:
  """Counts, from jax.monitoring, the programs compiled or read from the disk cache since the last
  reset (listeners cannot be removed: one instance per process, `stats()`): `programs` and
  `hits`, `compile_s` in XLA's compiler (reads included), `trace_s` tracing and lowering, and
  `compiled`, (function, compile seconds) in order."""

  TRACE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration")
  COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per program, hit or not

  def __init__(self):
    import jax
    self.reset()
    jax.monitoring.register_event_listener(self._on_event)
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)

  def reset(self) -> None:
    self.programs = self.hits = 0
    self.compile_s = self.trace_s = 0.0
    self.compiled: list[tuple[str, float]] = []

  def _on_event(self, event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
      self.hits += 1

  def _on_duration(self, event: str, duration: float, **kw) -> None:
    if event == self.COMPILE_EVENT:
      self.programs += 1
      self.compile_s += duration
      self.compiled.append((str(kw.get("fun_name", "?")), round(duration, 2)))
    elif event in self.TRACE_EVENTS:
      self.trace_s += duration


_STATS: list[CompileStats] = []


def stats() -> CompileStats:
  """The process's counters, reset."""
  if not _STATS:
    _STATS.append(CompileStats())
  _STATS[0].reset()
  return _STATS[0]


def enable(flag: str | None = None, warn=None) -> tuple[str | None, CompileStats]:
  """Points jax at the cache directory (made if missing) before anything compiles; returns it
  (None: off) and the counters. A directory that cannot be made or written is an error when the
  flag named it; a default one is skipped with a warning (`warn(message)`), so that a read-only
  home never stops a job."""
  import jax
  path = resolve(flag)
  if path is not None and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    try:
      os.makedirs(path, exist_ok=True)
      if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable")
    except OSError as e:
      if flag is not None:
        raise ValueError(f"--compile-cache {path}: cannot keep compiled programs there ({e})"
                         ) from e
      if warn is not None:
        warn(f"compile cache {path} cannot be used ({e}); compiling without it")
      path = None
    else:
      jax.config.update("jax_compilation_cache_dir", path)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
  return path, stats()


def describe(path: str | None, stats: CompileStats) -> str:
  """One line for a job's end: where the cache is and what it saved."""
  where = "compile cache off" if path is None else f"compile cache {path}"
  return (f"{where}: {stats.programs} programs, {stats.hits} of them read from the cache "
          f"({stats.compile_s:.1f} s in the compiler, reads included)")
