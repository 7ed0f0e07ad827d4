"""Loads a script of scripts/ as a module (scripts are not a package), or runs one in a process of
its own with a cheaper XLA CPU compile (a smoke run's tiny programs: compiling them is most of
its time; the flags only change how XLA's CPU backend emits code, the HLO is the same)."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# LLVM's optimisation off, and XLA's older elemental emitters instead of its fusion emitters: the
# latter compile the engine's programs about twice as slowly on the CPU (tests/engine/
# test_sparsex.py: 47 s -> 20 s of backend compile, 62 s -> 39 s in all, 2026-12-07). Every
# process of a test run uses these (tests/conftest.py), so that they share compiled programs.
CHEAP_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                   "--xla_cpu_use_fusion_emitters=false")


def load_script(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def script_env(**extra: str) -> dict:
  """The environment of a script's process: this checkout first, the CPU, the cheap compile."""
  path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
  return dict(os.environ, PYTHONPATH=path, JAX_PLATFORMS="cpu", XLA_FLAGS=CHEAP_XLA_FLAGS,
              **extra)


def run_script(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python scripts/NAME.py ARGS` in its own process (see script_env)."""
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", f"{name}.py"), *args],
                        cwd=ROOT, env=script_env(), capture_output=True, text=True,
                        timeout=timeout)
