"""The package's import graph: no cycles, and the models import nothing above them.

Read with `ast` alone (nothing is imported, so this runs in well under a second). Every
import counts, the ones inside functions too: an import moved into a function to dodge a
cycle still is one. An import of a package (`from sqllava_jax.convert import x`) counts as
importing the module `x` when it is one, else the package's `__init__`.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "sqllava_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE
# What the models may not import: everything that is built on them.
ABOVE_MODELS = ("convert", "training", "evaluation", "commands", "demo", "cli")
# Cycles still to be broken, each as its sorted module names (empty when the house is clean).
ALLOWED_CYCLES: list[list[str]] = []


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The package's modules that `name` imports, anywhere in its file."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
  return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
  mods = modules()
  return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)


def test_the_graph_is_read(tmp_path):
  graph = import_graph()
  assert f"{PACKAGE}.models.key_map" in graph[f"{PACKAGE}.models.llama"]
  assert f"{PACKAGE}.convert.reference_export" in graph[f"{PACKAGE}.convert.export"]
  hidden = tmp_path / "hidden.py"
  hidden.write_text("def f():\n  from sqllava_jax.convert import hf\n")
  assert imports_of("x", hidden, set(graph)) == {f"{PACKAGE}.convert.hf"}


def test_cycles_are_found():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
  assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
  found = cycles(import_graph())
  new = [c for c in found if c not in ALLOWED_CYCLES]
  assert not new, "import cycles (break them; an import inside a function still counts):\n" + (
      "\n".join(" <-> ".join(c) for c in new))
  gone = [c for c in ALLOWED_CYCLES if c not in found]
  assert not gone, f"these cycles are gone; remove them from ALLOWED_CYCLES: {gone}"


def test_models_import_nothing_above_them():
  above = tuple(f"{PACKAGE}.{name}" for name in ABOVE_MODELS)
  wrong = sorted(f"{name} imports {dep}" for name, deps in import_graph().items()
                 if (name + ".").startswith(f"{PACKAGE}.models.") for dep in deps
                 if any(dep == a or dep.startswith(a + ".") for a in above))
  assert not wrong, "the models import what is built on them:\n" + "\n".join(wrong)


# The demo is a client of the library: only the command line (and the demo itself) imports
# it; the core finds the demo's source and tasks through entry points (`sqllava_jax.plugins`).
DEMO_CLIENTS = ("demo", "cli", "commands")


def test_only_the_command_line_imports_the_demo():
  clients = tuple(f"{PACKAGE}.{name}" for name in DEMO_CLIENTS)
  demo = f"{PACKAGE}.demo"
  wrong = sorted(f"{name} imports {dep}" for name, deps in import_graph().items()
                 if not any(name == c or name.startswith(c + ".") for c in clients)
                 for dep in deps if dep == demo or dep.startswith(demo + "."))
  assert not wrong, "the core imports the demo:\n" + "\n".join(wrong)
