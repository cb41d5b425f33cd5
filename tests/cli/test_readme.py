"""README.md and docs/*.md: CI runs the README's test command, every command shown names a module,
subcommand and options that exist, the training commands parse (--dry-run), and the layout table
lists exactly the modules there are."""

import glob
import importlib
import importlib.util
import os
import re
import shlex

import click
import numpy as np
import pytest
from click.testing import CliRunner

import train
from conftest import ROOT, write_image_zip
from training.evaluation.feature_stats import save_stats
from training.evaluation.inception import load_detector

README = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
PAGES = {'README.md': README} | {os.path.relpath(path, ROOT): open(path, encoding='utf-8').read()
    for path in sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))}
SCRIPTS = ('train.py', 'generate.py', 'fid.py', 'dataset_tool.py')
PACKAGES = ('fdm', 'training', 'torch_utils', 'dnnlib')

def shell_commands(texts=PAGES.values()):
    """Every command in the bash blocks of the given pages, continuation lines joined, comments dropped."""
    commands = []
    for text in texts:
        for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
            block = re.sub(r'\\\n\s*', ' ', block)
            commands += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith('#')]
    return commands

def our_invocations():
    """(program, its command, its arguments, world size) of every call of a script or of one of our
    `python -m` modules in the bash blocks (a chain with && may hold several)."""
    found = []
    for command in shell_commands():
        for part in command.split('&&'):
            words = shlex.split(part, comments=True)
            nproc = next((int(w.split('=')[1]) for w in words if w.startswith('--nproc_per_node=')), 1)
            nnodes = next((int(w.split('=')[1]) for w in words if w.startswith('--nnodes=')), 1)
            for i, word in enumerate(words):
                if word in SCRIPTS:
                    module, args = word[:-3], words[i + 1:]
                elif word == '-m' and i + 1 < len(words) and words[i + 1].split('.')[0] in PACKAGES:
                    module, args = words[i + 1], words[i + 2:]
                else:
                    continue
                found.append((word if word in SCRIPTS else module, importlib.import_module(module).main, args, nproc * nnodes))
                break
    return found

def train_invocations():
    return [(args, world) for program, _, args, world in our_invocations() if program == 'train.py']

def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in open(os.path.join(ROOT, '.ci', 'run')) if 'python -m pytest' in line]
    assert len(ci) == 1 and ci[0] in shell_commands([README])
    assert ci[0].endswith('python -m pytest')
    # The quick start is the demo that .ci/run smoke-tests.
    assert any(c.endswith('python -m training.tools.demo --outdir=demo-run') for c in shell_commands([README]))

def test_docs_show_all_nine_paper_configurations():
    pairs = {(next((a for a in args if a.startswith('--data=')), None), next((a for a in args if a.startswith('--precond=')), None))
        for args, _ in train_invocations()}
    for data in ['cifar10-32x32', 'ffhq-64x64', 'afhqv2-64x64']:
        for precond in ['fdm_edm', 'fdm_vp', 'fdm_ve']:
            assert (f'--data=datasets/{data}.zip', f'--precond={precond}') in pairs

# Every `python -m X` anywhere in the text (prose, bash and text blocks) names a command line of ours.
def test_named_modules_are_command_lines():
    wrong, seen = [], set()
    for page, text in PAGES.items():
        for module in re.findall(r'(?:python3? |torchrun .*?)-m ([A-Za-z_][\w.]*)', text):
            if module.split('.')[0] in PACKAGES and module not in seen:
                seen.add(module)
                if importlib.util.find_spec(module) is None or not isinstance(getattr(importlib.import_module(module), 'main', None), click.Command):
                    wrong.append(f'{page}: python -m {module}')
    assert not wrong, 'commands that do not exist:\n' + '\n'.join(wrong)
    assert {'training.tools.demo', 'training.tools.tables', 'training.tools.phema'} <= seen

# Every file path the pages name exists (placeholders such as training-runs/00000-... are not files).
def test_named_files_exist():
    wrong = []
    for page, text in PAGES.items():
        for path in set(re.findall(r'(?<![\w/.-])((?:[\w-]+/)+[\w.-]+\.(?:py|sh|md))\b', text)):
            if path.split('/')[0] in PACKAGES + ('tests', 'docs', '.ci') and not os.path.exists(os.path.join(ROOT, path)):
                wrong.append(f'{page}: {path}')
    for page, text in PAGES.items():
        for link in re.findall(r'\]\(([^)#:]+\.md)(?:#[\w-]*)?\)', text):
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), link)):
                wrong.append(f'{page}: link {link}')
    assert not wrong, 'paths that do not exist:\n' + '\n'.join(wrong)

# The options and subcommands of every command shown exist (their values are checked by the dry runs below for train.py).
@pytest.mark.parametrize('program, command, args', [(p, c, a) for p, c, a, _ in our_invocations()],
    ids=lambda v: ' '.join(v)[:60] if isinstance(v, list) else v if isinstance(v, str) else '')
def test_command_options_exist(program, command, args):
    args = list(args)
    while isinstance(command, click.Group):
        assert args and args[0] in command.commands, f'{program}: no subcommand {args[:1]}'
        command, program = command.commands[args[0]], f'{program} {args[0]}'
        args = args[1:]
    known = {name for param in command.params if isinstance(param, click.Option) for name in param.opts + param.secondary_opts}
    unknown = [arg for arg in args if arg.startswith('-') and arg.split('=', 1)[0] not in known | {'--help'}]
    assert not unknown, f'{program}: no such option {unknown}'

@pytest.mark.parametrize('args, world', train_invocations(), ids=lambda v: ' '.join(v)[:60] if isinstance(v, list) else str(v))
def test_train_command_dry_runs(tmp_path, monkeypatch, args, world):
    # Stand-in datasets with the resolution in their name (labels, so --cond=1 works).
    args = list(args)
    for i, arg in enumerate(args):
        if arg.startswith('--data='):
            name = os.path.basename(arg.split('=', 1)[1])
            resolution = int(re.search(r'-(\d+)x\d+', name).group(1))
            args[i] = '--data=' + write_image_zip(tmp_path / name, num_images=4, resolution=resolution)
        if arg.startswith('--outdir='):
            args[i] = f'--outdir={tmp_path / "runs"}'
        if arg.startswith('--metric-ref='):  # stand-in statistics of the embedded digits detector's dimension
            assert '--metrics=fd-digits' in args, 'docs show only metrics whose detector needs no download'
            dim = load_detector('digits', verbose=False).feature_dim
            args[i] = '--metric-ref=' + str(tmp_path / 'ref.npz')
            save_stats(tmp_path / 'ref.npz', np.zeros(dim), np.eye(dim))
        if arg.startswith('--resume='):  # a real run to continue: one step on a stand-in dataset
            run = tmp_path / 'run'
            data = write_image_zip(tmp_path / 'resumed.zip', num_images=4, resolution=8)
            made = CliRunner().invoke(train.main, ['--outdir', str(run), '--nosubdir', '--data', data, '--cbase=8',
                '--cres=1', '--batch=4', '--duration=0.000004', '--workers=0', '--grid-images=0'])
            assert made.exit_code == 0, made.output
            args[i] = f'--resume={run}'
    monkeypatch.setenv('WORLD_SIZE', str(world))
    result = CliRunner().invoke(train.main, args + ['--dry-run'])
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output
    assert not (tmp_path / 'runs').exists()

# The README's layout table names every module (a bare name continues the folder of the path before it).
def test_layout_table_lists_every_module():
    section = README.split('## Layout', 1)[1].split('\n## ', 1)[0]
    listed = set()
    for row in re.findall(r'^\| (.*?) \|', section, flags=re.M):
        folder = ''
        for name in re.findall(r'`([^`]+\.py)`', row):
            if '/' in name:
                folder = os.path.dirname(name)
            listed.add(name if '/' in name or not folder else f'{folder}/{name}')
    modules = {os.path.relpath(path, ROOT).replace(os.sep, '/') for package in PACKAGES
        for path in glob.glob(os.path.join(ROOT, package, '**', '*.py'), recursive=True)}
    missing = sorted(m for m in modules - listed if not m.endswith('__init__.py'))
    stale = sorted(listed - modules - set(SCRIPTS))
    assert not missing and not stale, f'README layout table: missing {missing}, not in the tree {stale}'
