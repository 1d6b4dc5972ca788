"""No import cycles between the package's modules.

Read from the source with `ast` (every import, also those inside functions, which only postpone a
cycle to the first call), not by importing. A module depends on the module an import names:
`import a.b.c` and `from a.b import c` (c a submodule) -> a.b.c; `from a.b import name` (an attribute)
-> a.b, i.e. its __init__; relative imports likewise. Importing a submodule also runs its parent
packages' __init__, but a submodule naming its own package during that __init__ is what Python
supports, so parents are not counted: otherwise every package __init__ importing a submodule would
look like a cycle.
"""
import ast
import pathlib

import adtr_jax

PACKAGE = pathlib.Path(adtr_jax.__file__).parent


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py under the package (a package is its __init__.py)."""
  root = package_dir.parent
  out = {}
  for path in sorted(package_dir.rglob('*.py')):
    parts = path.relative_to(root).with_suffix('').parts
    out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return out


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
  """The dotted names an import statement refers to: modules, or package.attribute candidates."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if node.level:   # relative: level 1 is the module's own package
    package = module.split('.') if is_package else module.split('.')[:-1]
    base = '.'.join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
  else:
    base = node.module
  return [base] + [f'{base}.{alias.name}' for alias in node.names]


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (see the module docstring for the rules)."""
  files = module_files(package_dir)
  graph = {}
  for module, path in files.items():
    is_package = path.name == '__init__.py'
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      names = [n for n in _imported(node, module, is_package) if n in files]
      if isinstance(node, ast.ImportFrom):
        # `from pkg import sub` imports pkg.sub; `from pkg import attr` imports pkg's __init__.
        submodules = names[1:]
        deps.update(submodules if len(submodules) == len(node.names) else names)
      else:
        deps.update(names)
    graph[module] = deps - {module}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v), on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(text)
  return root / 'pkg'


def test_package_has_no_import_cycles():
  found = cycles(import_graph(PACKAGE))
  assert not found, 'import cycles:\n' + '\n'.join(' <-> '.join(c) for c in found)


def test_the_graph_resolves_every_import_form():
  graph = import_graph(PACKAGE)
  assert 'adtr_jax.errors' in graph['adtr_jax.models.adtr']                 # from adtr_jax import errors
  assert 'adtr_jax.models.backbone' in graph['adtr_jax.models.adtr']        # from ...backbone import X
  assert {'adtr_jax.data.mvtec', 'adtr_jax.data.pipeline'} <= graph['adtr_jax.deploy']   # an __init__
  assert 'adtr_jax' not in graph['adtr_jax.models.adtr']                    # parents are not counted


def test_a_cycle_is_found_and_package_inits_are_not_one(tmp_path):
  """Control: a two-module cycle closed by a relative import inside a function is reported; a package
  __init__ importing its submodules, which import their siblings from the package, is not a cycle."""
  pkg = _write(tmp_path, {
      'pkg/__init__.py': 'from pkg import a, c\n',
      'pkg/a.py': 'import pkg.b\n',
      'pkg/b.py': 'def f():\n  from . import a\n',
      'pkg/c.py': 'from pkg import b\nfrom pkg.sub import d\n',
      'pkg/sub/__init__.py': 'from .d import VALUE\n',
      'pkg/sub/d.py': 'from .. import b\nVALUE = 1\n',
  })
  graph = import_graph(pkg)
  assert graph['pkg.sub'] == {'pkg.sub.d'} and graph['pkg.sub.d'] == {'pkg.b'}
  assert cycles(graph) == [['pkg.a', 'pkg.b']]
  (pkg / 'b.py').write_text('VALUE = 2\n')
  assert cycles(import_graph(pkg)) == []
