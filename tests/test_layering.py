"""Imports point one way: core <- training <- apps, and offline tools stay apart.

Walks every module's AST, function-level imports included, and fails on:
- any `s3jax.*` module importing `data_prep`;
- a core module importing `s3jax.training` or an app module;
- a training module importing an app module;
- an import cycle among `s3jax` modules.
"""

import ast
import pathlib
import shutil

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "s3jax"

APPS = ("s3jax.train", "s3jax.edit", "s3jax.evaluate", "s3jax.evaluation", "s3jax.convert")
TRAINING = ("s3jax.training",)


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_name(path: pathlib.Path, root: pathlib.Path = REPO) -> str:
  parts = list(path.relative_to(root).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def imported_modules(path: pathlib.Path, root: pathlib.Path = REPO) -> set:
  """Every module `path` imports, at any depth of its AST (function bodies too)."""
  this = module_name(path, root)
  package = this if path.name == "__init__.py" else this.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
      else:
        mod = node.module or ""
      found.add(mod)
      # `from s3jax import diffusion` imports the module s3jax.diffusion.
      found.update(f"{mod}.{alias.name}" for alias in node.names)
  return found


def import_graph(root: pathlib.Path = REPO, package: str = "s3jax") -> dict:
  """{module: set of s3jax modules it imports} over the package under `root`."""
  files = sorted((root / package).rglob("*.py"))
  modules = {module_name(f, root): f for f in files}
  graph = {}
  for name, f in modules.items():
    deps = set()
    for imp in imported_modules(f, root):
      if imp in modules and imp != name:
        deps.add(imp)
    graph[name] = deps
  return graph, {name: imported_modules(f, root) for name, f in modules.items()}


def find_cycle(graph: dict):
  """One import cycle as a list of modules, or None."""
  WHITE, GREY, BLACK = 0, 1, 2
  color = {n: WHITE for n in graph}
  stack = []

  def visit(n):
    color[n] = GREY
    stack.append(n)
    for m in sorted(graph[n]):
      # A package's __init__ is imported implicitly with its submodules; only
      # explicit edges count, so `s3jax` -> `s3jax.x` is what __init__ itself imports.
      if color[m] == GREY:
        return stack[stack.index(m) :] + [m]
      if color[m] == WHITE:
        cycle = visit(m)
        if cycle:
          return cycle
    stack.pop()
    color[n] = BLACK
    return None

  for n in sorted(graph):
    if color[n] == WHITE:
      cycle = visit(n)
      if cycle:
        return cycle
  return None


def layering_violations(root: pathlib.Path = REPO) -> list:
  graph, raw = import_graph(root)
  problems = []
  for name, imports in sorted(raw.items()):
    offline = sorted({".".join(i.split(".")[:2]) for i in imports if _within(i, ("data_prep",))})
    for imp in offline:
      problems.append(f"{name} imports {imp}: s3jax never imports the offline tools")
    if _within(name, APPS):
      continue
    for dep in sorted(graph[name]):
      if _within(dep, APPS):
        problems.append(f"{name} imports the app module {dep}")
      elif _within(dep, TRAINING) and not _within(name, TRAINING):
        problems.append(f"core module {name} imports the training module {dep}")
  cycle = find_cycle(graph)
  if cycle:
    problems.append("import cycle: " + " -> ".join(cycle))
  return problems


def test_imports_point_one_way():
  problems = layering_violations()
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("s3jax/diffusion.py", "from s3jax.training import runner\n", "core module"),
        ("s3jax/loading.py", "def f():\n  from s3jax import edit\n", "app module"),
        ("s3jax/video.py", "import data_prep.sample\n", "offline tools"),
        ("s3jax/training/loop.py", "def f():\n  from s3jax.training import runner\n", "cycle"),
    ],
)
def test_the_check_catches_a_planted_violation(tmp_path, module, source, expected):
  """A copy of the package with one bad import added fails the check, naming it."""
  shutil.copytree(PACKAGE, tmp_path / "s3jax", ignore=shutil.ignore_patterns("__pycache__"))
  target = tmp_path / module
  target.write_text(target.read_text() + "\n" + source)
  problems = layering_violations(tmp_path)
  assert any(expected in p for p in problems), problems
