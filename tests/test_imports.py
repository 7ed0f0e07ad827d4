"""Imports run one way: models and pallas_kernels at the bottom, the engine on top.

Read from the source with ast (nothing is imported), module-level and function-level imports
alike; imports under `if TYPE_CHECKING:` are for annotations only and do not count. Rules:
  - pallas_kernels imports nothing of the project (only jax, numpy, the standard library and
    pallas_kernels itself), and no kernel module imports a sibling kernel: what they share lives
    in the private modules (pallas_kernels/_paged.py, _compat.py);
  - of the engine only sparsex_jax/programs/kernels.py imports pallas_kernels: it runs the ops
    per head shard under a mesh, so a program calling pallas_kernels.ops directly would lose
    tensor parallelism silently; everything else (programs, planner, engine) imports the kernels
    from there;
  - the library never imports the applications on top of it: sparsex_jax/entrypoints (the CLI,
    the demo) and sparsex_jax/research (evaluation, studies, benchmark baselines);
  - no import cycle among the project's modules.
An import of a package (`from sparsex_jax.kv import KVStore`) is an edge to its __init__; the
implicit execution of parent packages' __init__ is not counted (every submodule would otherwise
sit in a cycle with a package __init__ that re-exports it).
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sparsex_jax", "pallas_kernels", "models")
# pallas_kernels modules that put kernels together (the public surface and the backend dispatch);
# every other module there is a kernel or a private helper.
KERNEL_AGGREGATORS = ("pallas_kernels", "pallas_kernels.ops")


def _module_files() -> dict[str, str]:
  """Dotted module name -> path, for every .py file of the project's packages."""
  out = {}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
      dirnames[:] = [d for d in dirnames if d != "__pycache__"]
      for name in filenames:
        if not name.endswith(".py"):
          continue
        rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(dirpath, name)
  return out


MODULES = _module_files()


def _is_type_checking(test: ast.expr) -> bool:
  return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
          or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(node):
  """Every Import / ImportFrom under node, at any depth, skipping `if TYPE_CHECKING:` bodies."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.Import, ast.ImportFrom)):
      yield child
    elif isinstance(child, ast.If) and _is_type_checking(child.test):
      for orelse in child.orelse:
        yield from _import_nodes(ast.Module(body=[orelse], type_ignores=[]))
    else:
      yield from _import_nodes(child)


def _project(name: str) -> str | None:
  """The project module `name` resolves to (a module, else its nearest package), or None."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def imports_of(module: str) -> dict[str, int]:
  """Project modules `module` imports -> the line of the first such import."""
  path = MODULES[module]
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  is_package = os.path.basename(path) == "__init__.py"
  out: dict[str, int] = {}

  def add(name, line):
    target = _project(name)
    if target is not None and target != module:
      out.setdefault(target, line)

  for node in _import_nodes(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name, node.lineno)
      continue
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
      parts = module.split(".")
      parts = parts if is_package else parts[:-1]
      parts = parts[:len(parts) - (node.level - 1)]
      base = ".".join(parts + ([base] if base else []))
    for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
      full = f"{base}.{alias.name}"
      add(full if full in MODULES else base, node.lineno)
  return out


GRAPH = {m: imports_of(m) for m in sorted(MODULES)}


def _top(module: str) -> str:
  return module.split(".")[0]


def _where(module: str, target: str) -> str:
  return f"{os.path.relpath(MODULES[module], ROOT)}:{GRAPH[module][target]} imports {target}"


def test_graph_sees_the_known_edges():
  """The parser finds module-level, function-level and `from pkg import submodule` imports."""
  assert "sparsex_jax.sharding" in GRAPH["sparsex_jax.programs.kernels"]
  assert "pallas_kernels.ops" in GRAPH["sparsex_jax.programs.kernels"]
  assert "sparsex_jax.programs.copy" in GRAPH["sparsex_jax.programs"]  # inside a method
  assert "models.llama" in GRAPH["sparsex_jax.sharding"]  # inside a function
  assert "pallas_kernels._paged" in GRAPH["pallas_kernels.attention"]


def test_pallas_kernels_import_nothing_of_the_project():
  bad = [_where(m, t) for m in GRAPH if _top(m) == "pallas_kernels"
         for t in GRAPH[m] if _top(t) != "pallas_kernels"]
  assert not bad, "pallas_kernels must import only jax, numpy and itself:\n" + "\n".join(bad)


def test_kernel_modules_import_no_sibling_kernel():
  bad = [_where(m, t) for m in GRAPH
         if _top(m) == "pallas_kernels" and m not in KERNEL_AGGREGATORS
         for t in GRAPH[m] if not t.rpartition(".")[2].startswith("_")]
  assert not bad, ("a kernel module imports only pallas_kernels' private modules (_paged, "
                   "_compat):\n" + "\n".join(bad))


KERNEL_DOOR = "sparsex_jax.programs.kernels"


def test_only_the_programs_kernel_door_imports_pallas_kernels():
  bad = [_where(m, t) for m in GRAPH if _top(m) != "pallas_kernels" and m != KERNEL_DOOR
         for t in GRAPH[m] if _top(t) == "pallas_kernels"]
  assert not bad, (f"only {KERNEL_DOOR} imports pallas_kernels (it wraps the ops per head shard; "
                   "import the kernels from there):\n" + "\n".join(bad))


APPLICATIONS = ("sparsex_jax.entrypoints", "sparsex_jax.research")


def _in(module: str, packages) -> bool:
  return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_library_imports_no_application():
  bad = [_where(m, t) for m in GRAPH if not _in(m, APPLICATIONS)
         for t in GRAPH[m] if _in(t, APPLICATIONS)]
  assert not bad, ("the library (sparsex_jax outside entrypoints/ and research/, models, "
                   "pallas_kernels) must not import the applications:\n" + "\n".join(bad))


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """One cycle (a list of modules, the first repeated at the end) per strongly connected
  component of more than one module (Tarjan's algorithm, iterative)."""
  index, low, on_stack, stack, comps = {}, {}, set(), [], []
  counter = 0
  for root in graph:
    if root in index:
      continue
    work = [(root, iter(graph[root]))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on_stack.add(root)
    while work:
      node, children = work[-1]
      advanced = False
      for child in children:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(graph[child])))
          advanced = True
          break
        if child in on_stack:
          low[node] = min(low[node], index[child])
      if advanced:
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        comp = []
        while True:
          top = stack.pop()
          on_stack.discard(top)
          comp.append(top)
          if top == node:
            break
        if len(comp) > 1:
          comps.append(sorted(comp))
  cycles = []
  for comp in comps:  # a shortest path back to the component's first module, by BFS
    members, start = set(comp), comp[0]
    parent, frontier = {start: None}, [start]
    found = None
    while frontier and found is None:
      nxt = []
      for node in frontier:
        for child in graph[node]:
          if child == start:
            found = node
            break
          if child in members and child not in parent:
            parent[child] = node
            nxt.append(child)
        if found is not None:
          break
      frontier = nxt
    path = [found]
    while parent[path[-1]] is not None:
      path.append(parent[path[-1]])
    cycles.append([start] + path[::-1][1:] + [start] if len(path) > 1 else [start, found, start])
  return cycles


def test_cycle_finder_finds_a_planted_cycle():
  graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
  assert _cycles(graph) == [["a", "b", "c", "a"]]
  assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
  cycles = _cycles(GRAPH)
  lines = []
  for cycle in cycles:
    lines.append(" -> ".join(cycle))
    lines += ["    " + _where(a, b) for a, b in zip(cycle, cycle[1:])]
  assert not cycles, "import cycles among the project's modules:\n" + "\n".join(lines)
