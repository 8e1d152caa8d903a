"""The shape of the code base, checked from its source (README, "Architecture").

* No import cycle: neither between mtx's packages (data, model, mtl, runtime, infer, eval,
  train, cli and the top-level modules) nor between its modules. Every import counts,
  those inside functions too.
* No import of an mtx module inside a function unless a ``# lazy:`` comment on that line
  says why (startup time of the CLI, say); a hidden import used to be the way around a
  cycle.
* No private name (``_name``) of one module used in another module or in a tool.
* No function longer than 60 lines of code (docstring, blank and comment lines and
  nested functions excluded) without a ``# long:`` comment in it saying why.
"""

import ast
import os
import pathlib
from typing import Iterator

REPO = pathlib.Path(__file__).resolve().parent.parent
MAX_LINES = 60


def _sources(*folders: str) -> Iterator[pathlib.Path]:
  for folder in folders:
    yield from sorted((REPO / folder).rglob("*.py"))


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _package(module: str) -> str:
  """'mtx.train.step' -> 'mtx.train'; top-level modules ('mtx.errors') are their own."""
  parts = module.split(".")
  return ".".join(parts[:2])


def _imports(path: pathlib.Path, modules: set) -> Iterator[tuple]:
  """(imported mtx module, line, inside a function?) for every import in ``path``."""
  tree = ast.parse(path.read_text(), str(path))
  inside = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      inside.update(id(n) for n in ast.walk(node) if n is not node)
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from mtx.train import step` imports mtx.train.step; `from mtx.x import f`, mtx.x.
      names = [
        f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
        for a in node.names
      ]
    for name in names:
      if name.split(".")[0] == "mtx" and name in modules:
        yield name, node.lineno, id(node) in inside


def _graph() -> tuple:
  paths = {_module_name(p): p for p in _sources("mtx")}
  modules = set(paths)
  edges = {m: set() for m in modules}
  hidden = []
  for module, path in paths.items():
    lines = path.read_text().splitlines()
    for target, line, in_function in _imports(path, modules):
      if target != module:
        edges[module].add(target)
      if in_function and "# lazy:" not in lines[line - 1]:
        hidden.append(f"{path.relative_to(REPO)}:{line} imports {target}")
  return edges, hidden


def _find_cycle(edges: dict):
  """A cycle of the directed graph as a list of nodes, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycle_between_modules():
  edges, _ = _graph()
  assert _find_cycle(edges) is None, " -> ".join(_find_cycle(edges))


def test_no_import_cycle_between_packages():
  edges, _ = _graph()
  packages = {}
  for module, targets in edges.items():
    for target in targets:
      a, b = _package(module), _package(target)
      if a != b:
        packages.setdefault(a, set()).add(b)
  cycle = _find_cycle(packages)
  assert cycle is None, "package cycle: " + " -> ".join(cycle)


def test_no_mtx_import_hidden_in_a_function():
  _, hidden = _graph()
  assert not hidden, (
    "imports inside functions (fix the cycle, or say why with "
    "'# lazy: ...'):\n" + "\n".join(hidden)
  )


def _private_uses(path: pathlib.Path, modules: set) -> Iterator[str]:
  tree = ast.parse(path.read_text(), str(path))
  aliases = {}  # local name -> mtx module it is bound to
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtx"):
      for a in node.names:
        if a.name.startswith("_") and not a.name.startswith("__"):
          yield f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}"
        full = f"{node.module}.{a.name}"
        if full in modules:
          aliases[a.asname or a.name] = full
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("mtx") and a.asname:
          aliases[a.asname] = a.name
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and isinstance(node.value, ast.Name)
      and node.value.id in aliases
      and node.attr.startswith("_")
      and not node.attr.startswith("__")
    ):
      yield (
        f"{path.relative_to(REPO)}:{node.lineno} uses "
        f"{aliases[node.value.id]}.{node.attr}"
      )


def test_no_private_name_used_across_modules():
  modules = {_module_name(p) for p in _sources("mtx")}
  found = [u for p in _sources("mtx", "tools") for u in _private_uses(p, modules)]
  assert not found, "private names used across modules:\n" + "\n".join(found)


def _code_lines(node, lines: list) -> int:
  """Lines of code of a function: no docstring, blank or comment lines, nor nested defs."""
  skip = set()
  body = node.body
  if (
    body
    and isinstance(body[0], ast.Expr)
    and isinstance(getattr(body[0], "value", None), ast.Constant)
    and isinstance(body[0].value.value, str)
  ):
    skip.update(range(body[0].lineno, body[0].end_lineno + 1))
  for child in ast.walk(node):
    if child is not node and isinstance(
      child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    ):
      skip.update(range(child.lineno, child.end_lineno + 1))
  count = 0
  for n in range(body[0].lineno, node.end_lineno + 1):
    text = lines[n - 1].strip()
    if n not in skip and text and not text.startswith("#"):
      count += 1
  return count


def test_no_long_function_without_a_reason():
  long = []
  for path in _sources("mtx", "tools"):
    text = path.read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text, str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = _code_lines(node, lines)
        own = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        if n > MAX_LINES and "# long:" not in own:
          long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
  assert not long, (
    f"functions over {MAX_LINES} lines of code without a '# long:' "
    "reason:\n" + "\n".join(long)
  )


def test_the_cycle_finder_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_checks_see_the_code():
  """Guards the checks above against passing on nothing."""
  edges, _ = _graph()
  assert "mtx.train.step" in edges and "mtx.mtl" in edges["mtx.train.step"]
  assert len(edges) > 40
  assert os.path.isdir(REPO / "tools")


def test_the_tree_is_formatted_by_its_one_formatter():
  """`ruff format` (configured in pyproject.toml) leaves every file as it is."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  for args in (["format", "--check"], ["check", "--select", "I"]):
    done = subprocess.run(
      [sys.executable, "-m", "ruff", *args, "."],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
    )
    assert "No module named ruff" not in done.stderr, (
      "ruff is missing: install the test extra (pip install -e '.[test]')"
    )
    assert done.returncode == 0, (
      f"`ruff {' '.join(args)} .` wants changes (run "
      f"`ruff format . && ruff check --select I --fix .`):\n"
      + done.stdout[-3000:]
      + done.stderr[-1000:]
    )
