"""The layout rule, read from the source with ast.

Top-level packages import only downwards: scripts -> training/ -> fdm/ -> torch_utils/ -> dnnlib/.
Inside them, each folder (package or sub-package) is a unit, and the units form no cycle: a
package may re-export its own sub-packages from __init__.py, nothing else points back up. Imports
inside functions count too. The top-level scripts are command lines that nothing imports except
tests that drive their command line.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = {'train', 'generate', 'fid', 'dataset_tool'}
PACKAGES = ['training', 'fdm', 'torch_utils', 'dnnlib']

# What each top-level package may import from this repository.
ALLOWED = dict(
    training={'training', 'fdm', 'torch_utils', 'dnnlib'},
    fdm={'fdm', 'torch_utils', 'dnnlib'},
    torch_utils={'torch_utils', 'dnnlib'},
    dnnlib={'dnnlib'},
)

# Tests may use a script only through its command line (click's main, or a subprocess).
SCRIPT_CLI_NAMES = {'main'}

# Every folder of a package that holds Python files, as a dotted name ('training.data').
def units():
    found = []
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = sorted(d for d in dirs if d != '__pycache__')
            if '__init__.py' in files:
                found.append(os.path.relpath(folder, ROOT).replace(os.sep, '.'))
    return found

def python_files(folder):
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith('.py'):
            yield f'{folder}/{name}'

def imported_modules(path):
    """(module name, line) of every import in the file, at any depth; relative imports resolved."""
    tree = ast.parse(open(os.path.join(ROOT, path), encoding='utf-8').read(), filename=path)
    package = os.path.dirname(path).replace('/', '.')
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit('.', node.level - 1)[0] if node.level > 1 else package
                yield (f'{base}.{node.module}' if node.module else base), node.lineno
            else:
                yield node.module, node.lineno
                # `from training import data` imports the module training.data.
                for alias in node.names:
                    yield f'{node.module}.{alias.name}', node.lineno

def ours(module):
    top = module.split('.')[0]
    return top if top in SCRIPTS or top in ALLOWED else None

# The unit a module belongs to: the longest unit name that prefixes it.
def unit_of(module, all_units):
    parts = module.split('.')
    for k in range(len(parts), 0, -1):
        if '.'.join(parts[:k]) in all_units:
            return '.'.join(parts[:k])
    return None

@pytest.mark.parametrize('package', PACKAGES)
def test_packages_import_only_downwards(package):
    wrong = []
    for unit in units():
        if unit.split('.')[0] != package:
            continue
        for path in python_files(unit.replace('.', '/')):
            for module, line in imported_modules(path):
                top = ours(module)
                if top is not None and top not in ALLOWED[package]:
                    wrong.append(f'{path}:{line} imports {module}')
    assert not wrong, 'imports that point upwards:\n' + '\n'.join(wrong)

def test_no_cycle_between_folders():
    all_units = set(units())
    edges = {u: set() for u in all_units}
    for unit in all_units:
        for path in python_files(unit.replace('.', '/')):
            for module, _line in imported_modules(path):
                target = unit_of(module, all_units) if ours(module) else None
                reexport = path.endswith('/__init__.py') and target is not None and target.startswith(unit + '.')
                if target is not None and target != unit and not reexport:
                    edges[unit].add(target)
    # Depth-first search for a back edge.
    state, cycles = {}, []
    def visit(u, trail):
        state[u] = 'open'
        for v in sorted(edges[u]):
            if state.get(v) == 'open':
                cycles.append(' -> '.join(trail[trail.index(v):] + [v]))
            elif v not in state:
                visit(v, trail + [v])
        state[u] = 'done'
    for u in sorted(all_units):
        if u not in state:
            visit(u, [u])
    assert not cycles, 'import cycles between folders:\n' + '\n'.join(cycles)

# Every Python file of tests/ and its folders.
def files_of_tests():
    found = []
    for folder, dirs, files in os.walk(os.path.join(ROOT, 'tests')):
        dirs[:] = sorted(d for d in dirs if d != '__pycache__')
        found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in sorted(files) if f.endswith('.py')]
    return found

def test_tests_follow_the_layout():
    # Tests live in a folder named for what they test; shared code is conftest.py's fixtures and helpers.py.
    top = sorted(os.path.basename(p) for p in files_of_tests() if os.path.dirname(p) == 'tests')
    assert top == ['conftest.py', 'helpers.py', 'kill_drill.py'], top
    assert not [p for p in files_of_tests() if os.path.basename(p).startswith('test_') and len(open(os.path.join(ROOT, p),
        encoding='utf-8').read().splitlines()) > 600], 'a test file over 600 lines: split it by concept'

def test_tests_use_scripts_only_through_their_command_line():
    wrong = []
    for path in files_of_tests():
        tree = ast.parse(open(os.path.join(ROOT, path), encoding='utf-8').read(), filename=path)
        scripts = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                scripts |= {alias.asname or alias.name for alias in node.names if alias.name in SCRIPTS}
            elif isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
                wrong += [f'{path}:{node.lineno} from {node.module} import {alias.name}' for alias in node.names
                    if alias.name not in SCRIPT_CLI_NAMES]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in scripts:
                if node.attr not in SCRIPT_CLI_NAMES:
                    wrong.append(f'{path}:{node.lineno} uses {node.value.id}.{node.attr}')
    assert not wrong, 'tests that reach into a script instead of the library:\n' + '\n'.join(wrong)

def test_no_test_module_imports_another():
    # Shared helpers live in conftest.py and helpers.py (importable, as pytest puts tests/ on the
    # path); a test module that imports another would run or break with it.
    test_modules = {os.path.basename(p)[:-3] for p in files_of_tests() if os.path.basename(p).startswith('test_')}
    wrong = []
    for path in files_of_tests():
        for module, line in imported_modules(path):
            if module.split('.')[0] in test_modules or module.startswith('tests.'):
                wrong.append(f'{path}:{line} imports {module}')
    assert not wrong, '\n'.join(wrong)

# Command lines live in the four scripts and in the modules run with `python -m` (training/tools/),
# built from torch_utils/cli/; generation.py keeps the --seeds click type that generate.py and fid.py share.
CLICK_ALLOWED = {f'{script}.py' for script in SCRIPTS} | {'training/evaluation/generation.py'}
CLICK_FOLDERS = ('training/tools/', 'torch_utils/cli/')

def test_only_command_lines_import_click():
    paths = [path for unit in units() for path in python_files(unit.replace('.', '/'))]  # the scripts may
    wrong = [f'{path}:{line}' for path in paths for module, line in imported_modules(path)
        if module.split('.')[0] == 'click' and path not in CLICK_ALLOWED and not path.startswith(CLICK_FOLDERS)]
    assert not wrong, 'library modules that import click (move their command line into training/tools/):\n' + '\n'.join(wrong)

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_scripts_are_command_lines(script):
    """A script defines its click command and small option helpers, nothing more (about 200 lines)."""
    lines = open(os.path.join(ROOT, f'{script}.py'), encoding='utf-8').read().splitlines()
    assert len(lines) <= 220, f'{script}.py has {len(lines)} lines; move library code into the packages'
