"""The layout rule, read from the source with ast: scripts -> training/ -> fdm/ -> torch_utils/, dnnlib/.

Imports only point down, including imports inside functions; the top-level scripts are
command lines that nothing imports except tests that drive their command line.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'train', 'generate', 'fid', 'dataset_tool'}
PACKAGES = ['training', 'fdm', 'torch_utils', 'dnnlib']

# What each package may import from this repository.
ALLOWED = dict(
    training={'training', 'fdm', 'torch_utils', 'dnnlib'},
    fdm={'fdm', 'torch_utils', 'dnnlib'},
    torch_utils={'torch_utils', 'dnnlib'},
    dnnlib={'dnnlib'},
)

# The one import across the rule: the preconditioner D builds its U-Net F, and the U-Nets live in
# training/networks.py by the project's layout (they know nothing of diffusion).
EXCEPTIONS = {('fdm/preconditioning.py', 'training.networks')}

# Tests may use a script only through its command line (click's main, or a subprocess).
SCRIPT_CLI_NAMES = {'main'}

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
                # `from training import dataset` imports the module training.dataset.
                for alias in node.names:
                    yield f'{node.module}.{alias.name}', node.lineno

def ours(module):
    top = module.split('.')[0]
    return top if top in SCRIPTS or top in ALLOWED else None

@pytest.mark.parametrize('package', PACKAGES)
def test_packages_import_only_downwards(package):
    wrong = []
    for path in python_files(package):
        for module, line in imported_modules(path):
            top = ours(module)
            if top is None or any(path == p and (module == m or module.startswith(m + '.')) for p, m in EXCEPTIONS):
                continue
            if top not in ALLOWED[package]:
                wrong.append(f'{path}:{line} imports {module}')
    assert not wrong, 'imports that point upwards:\n' + '\n'.join(wrong)

def test_tests_use_scripts_only_through_their_command_line():
    wrong = []
    for path in python_files('tests'):
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
    # Shared helpers live in conftest.py (importable, as pytest puts tests/ on the path); a test
    # module that imports another would run or break with it.
    test_modules = {name[:-3] for name in os.listdir(os.path.join(ROOT, 'tests'))
        if name.startswith('test_') and name.endswith('.py')}
    wrong = []
    for path in python_files('tests'):
        for module, line in imported_modules(path):
            if module.split('.')[0] in test_modules or module.startswith('tests.'):
                wrong.append(f'{path}:{line} imports {module}')
    assert not wrong, '\n'.join(wrong)

@pytest.mark.parametrize('script', sorted(SCRIPTS))
def test_scripts_are_command_lines(script):
    """A script defines its click command and small option helpers, nothing more (about 200 lines)."""
    lines = open(os.path.join(ROOT, f'{script}.py'), encoding='utf-8').read().splitlines()
    assert len(lines) <= 220, f'{script}.py has {len(lines)} lines; move library code into the packages'
