"""The import structure of twa_jax: imports only go down.

Each module imports alone (no other twa_jax module loaded); the
module-level import graph (read from the source with `ast`) has no cycle,
the library never imports the training world, no import sits inside a
function, and no module uses another module's _private names. The
library's entry points load neither orbax nor TensorStore (the store's
backends).
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
PACKAGE = ROOT / "twa_jax"


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(code: str, *args: str) -> str:
  """Runs `python -c code args` in a fresh interpreter; its stdout."""
  p = subprocess.run([sys.executable, "-c", code, *args], env=_env(), cwd=ROOT,
                     capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode == 0, p.stderr[-2000:]
  return p.stdout


def _imports(tree: ast.Module, name: str) -> list[tuple[ast.AST, str, str, str]]:
  """Every import of a twa_jax module anywhere in the module's source.

  Returns:
    (node, module, imported, alias): `imported` is the name taken from the
    module ("" when the module itself is imported), `alias` the local name
    bound to the module itself ("" otherwise).
  """
  package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node, a.name, "", a.asname or a.name) for a in node.names
                if a.name.split(".")[0] == "twa_jax"]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + [base] * bool(base))
      if base.split(".")[0] != "twa_jax":
        continue
      for a in node.names:
        if f"{base}.{a.name}" in MODULES:  # `from twa_jax import kernels`
          found.append((node, f"{base}.{a.name}", "", a.asname or a.name))
        else:
          found.append((node, base, a.name, ""))
  return found


def _parsed():
  return {name: ast.parse(path.read_text(), str(path))
          for name, path in MODULES.items()}


# Each module is imported by a fork of one interpreter that has loaded only
# the third-party packages `import twa_jax` loads; importing any twa_jax
# module loads them first in a fresh interpreter too, so each child still
# meets the module alone, without paying for jax again.
_IMPORT_EACH = """
import importlib, json, os, sys, traceback
packages, names = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for package in packages:
  importlib.import_module(package)
assert not [m for m in sys.modules if m.startswith("twa_jax")]
failed = {}
for name in names:
  read, write = os.pipe()
  if not os.fork():
    os.close(read)
    try:
      importlib.import_module(name)
    except BaseException:
      os.write(write, traceback.format_exc()[-2000:].encode())
      os._exit(1)
    os._exit(0)
  os.close(write)
  with os.fdopen(read) as f:
    error = f.read()
  if os.wait()[1]:
    failed[name] = error or "no traceback"
print(json.dumps(failed))
"""


def test_each_module_imports_alone():
  packages = _run(
      "import json, sys, twa_jax\n"
      "tops = {m.split('.')[0] for m in sys.modules} - {'twa_jax'}\n"
      "print(json.dumps(sorted(t for t in tops if t[0] != '_')))")
  failed = json.loads(_run(_IMPORT_EACH, packages.strip(),
                           json.dumps(sorted(MODULES))))
  assert not failed, failed


def test_import_graph_goes_down():
  trees = _parsed()
  graph, problems = {}, []
  for name, tree in trees.items():
    top_level = set(map(id, tree.body))
    graph[name] = set()
    for node, module, imported, _ in _imports(tree, name):
      where = f"{name}:{node.lineno}"
      if id(node) not in top_level:
        problems.append(f"{where}: import inside a function or block")
      if module not in MODULES:
        problems.append(f"{where}: imports unknown module {module}")
        continue
      if imported.startswith("_") and not imported.startswith("__"):
        problems.append(f"{where}: imports private {module}.{imported}")
      if module != name:
        graph[name].add(module)
      if (not name.startswith("twa_jax.training")
          and module.startswith("twa_jax.training")):
        problems.append(f"{where}: the library imports {module}")
  # Private names of another module used through its alias (`mod._name`).
  for name, tree in trees.items():
    aliases = {alias: module for _, module, _, alias in _imports(tree, name)
               if alias and module != name}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in aliases and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        problems.append(f"{name}:{node.lineno}: uses private "
                        f"{aliases[node.value.id]}.{node.attr}")
  assert not problems, "\n".join(problems)
  # No cycle: depth-first search with colours.
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycle = stack[stack.index(nxt):] + [nxt]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)


def test_the_graph_walk_finds_what_it_forbids():
  """The checks above can fail: a made-up module with each fault."""
  tree = ast.parse(
      "from twa_jax import kernels\n"
      "def f():\n"
      "  from twa_jax import basis\n"
      "  return kernels._private\n")
  found = _imports(tree, "twa_jax.build")
  assert [f[1:] for f in found] == [("twa_jax.kernels", "", "kernels"),
                                    ("twa_jax.basis", "", "basis")]
  assert id(found[1][0]) not in set(map(id, tree.body))


@pytest.mark.parametrize("module", ["twa_jax", "twa_jax.transform"])
def test_library_entry_points_load_no_store_backend(module):
  out = _run(f"import sys, {module}\n"
             "print(sorted({m.split('.')[0] for m in sys.modules}\n"
             "             & {'orbax', 'tensorstore', 'tensorflow_datasets',\n"
             "                'ml_collections'}))")
  assert out.strip() == "[]", out
