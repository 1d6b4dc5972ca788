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


def imports_of(tree: ast.AST, module: str, is_package: bool, files: dict,
               skip=lambda node: False) -> set[str]:
  """The modules of `files` that the parsed module `module` imports (see the module docstring), but
  not those inside a node for which `skip(node)` holds."""
  deps = set()
  for node in _walk(tree, skip):
    if not isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    names = [n for n in _imported(node, module, is_package) if n in files]
    if isinstance(node, ast.ImportFrom):
      # `from pkg import sub` imports pkg.sub; `from pkg import attr` imports pkg's __init__.
      submodules = names[1:]
      deps.update(submodules if len(submodules) == len(node.names) else names)
    else:
      deps.update(names)
  return deps - {module}


def _walk(node: ast.AST, skip):
  """ast.walk, without the subtrees of nodes for which skip(node) holds."""
  yield node
  for child in ast.iter_child_nodes(node):
    if not skip(child):
      yield from _walk(child, skip)


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (see the module docstring for the rules)."""
  files = module_files(package_dir)
  return {module: imports_of(ast.parse(path.read_text(), str(path)), module, path.name == '__init__.py',
                             files)
          for module, path in files.items()}


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


def _is_slow_mark(node: ast.AST) -> bool:
  """`pytest.mark.slow` (or `mark.slow`), called or not."""
  node = node.func if isinstance(node, ast.Call) else node
  return isinstance(node, ast.Attribute) and node.attr == 'slow'


def imports_by_test_file(tests_dir: pathlib.Path, package_dir: pathlib.Path) -> dict[str, tuple[bool, set]]:
  """Test file name -> (whether the fast tier, `-m 'not slow'`, runs a test of it, the package's modules
  it imports or runs (`python -m`) outside its slow tests). The fast tier runs a `test_*` function
  without a slow mark in a file whose `pytestmark` is not slow."""
  files = module_files(package_dir)
  out = {}
  for path in sorted(tests_dir.glob('test_*.py')):
    tree = ast.parse(path.read_text(), str(path))
    file_marks = [n.value for n in tree.body if isinstance(n, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == 'pytestmark' for t in n.targets)]
    slow_file = any(_is_slow_mark(m) or any(_is_slow_mark(e) for e in getattr(m, 'elts', ()))
                    for m in file_marks)
    tests = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith('test')]
    fast = not slow_file and any(not any(_is_slow_mark(d) for d in t.decorator_list) for t in tests)
    slow_test = lambda n: n in tests and any(_is_slow_mark(d) for d in n.decorator_list)
    # A module the file runs as a program (`python -m adtr_jax.main`: the string 'adtr_jax.main') counts.
    run = {n.value for n in _walk(tree, slow_test) if isinstance(n, ast.Constant) and n.value in files}
    out[path.name] = (fast, imports_of(tree, f'tests.{path.stem}', False, files, skip=slow_test) | run)
  return out


def untouched_by_fast_tier(tests_dir: pathlib.Path, package_dir: pathlib.Path) -> set[str]:
  """The package's modules with code that the fast tier does not touch. A module that some test file
  imports must be imported by a fast-tier file; a module that no test file imports (a helper tested
  through its callers, e.g. visualize through evaluate) must be imported by a module that a fast-tier
  file imports."""
  files = module_files(package_dir)
  graph = import_graph(package_dir)
  by_tests = imports_by_test_file(tests_dir, package_dir)
  tested = set().union(*(mods for _, mods in by_tests.values()))
  fast = set().union(*(mods for is_fast, mods in by_tests.values() if is_fast))
  through = fast | set().union(*(graph[m] for m in fast))
  return {m for m, path in files.items() if _has_code(path)
          and m not in (fast if m in tested else through)}


def _has_code(path: pathlib.Path) -> bool:
  """A module with a definition or statement of its own (a package __init__ may hold only imports)."""
  body = ast.parse(path.read_text()).body
  return any(not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr)) for n in body)


def test_the_fast_tier_imports_every_module():
  """Every module of adtr_jax that holds code is imported by a test file the fast tier runs, so a
  change anywhere in the package is exercised by `pytest -m 'not slow'`, not only by the full suite."""
  missing = untouched_by_fast_tier(PACKAGE.parent / 'tests', PACKAGE)
  assert not missing, f'the fast tier does not import {sorted(missing)}: unmark or add a fast test'


def test_modules_only_slow_tests_import_are_reported(tmp_path):
  """Control: a module whose tests are all slow (a slow function, a slow file) is reported; a helper
  that no test imports counts when a fast-tier file imports a module that imports it."""
  pkg = _write(tmp_path, {'pkg/__init__.py': '', 'pkg/a.py': 'from pkg import helper\nA = 1\n',
                          'pkg/helper.py': 'H = 1\n', 'pkg/b.py': 'B = 1\n', 'pkg/c.py': 'C = 1\n',
                          'pkg/d.py': 'D = 1\n'})
  tests = tmp_path / 'tests'
  _write(tmp_path, {
      'tests/test_one.py': ('import pytest\nfrom pkg import a\n\n\n@pytest.mark.slow\n'
                            'def test_slow():\n  import pkg.b\n\n\ndef test_fast():\n  import pkg.c\n'
                            "  run(['-m', 'pkg.d'])\n"),
      'tests/test_two.py': 'import pytest\nfrom pkg import c\npytestmark = [pytest.mark.slow]\n\n\n'
                           'def test_y():\n  pass\n',
  })
  # test_one's fast test puts its module-level imports in the tier (a, and through it helper), its own
  # (c) and the module it runs (d); its slow test's b, and test_two's c, do not count.
  assert untouched_by_fast_tier(tests, pkg) == {'pkg.b'}
  (tests / 'test_one.py').write_text('import pytest\nfrom pkg import a\n\n\n@pytest.mark.slow\n'
                                     'def test_slow():\n  pass\n')
  assert untouched_by_fast_tier(tests, pkg) == {'pkg.a', 'pkg.helper', 'pkg.b', 'pkg.c', 'pkg.d'}
