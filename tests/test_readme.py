"""README.md's commands: CI runs its test command, and its training commands parse."""

import os
import re
import shlex

import pytest
from click.testing import CliRunner

import train
from conftest import ROOT, write_image_zip

README = open(os.path.join(ROOT, 'README.md')).read()

def shell_commands():
    """Every command in the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', README, flags=re.S):
        block = re.sub(r'\\\n\s*', ' ', block)
        commands += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith('#')]
    return commands

def train_invocations():
    """The train.py argument lists of every command (a chain with && may hold one)."""
    found = []
    for command in shell_commands():
        for part in command.split('&&'):
            words = shlex.split(part)
            if 'train.py' in words:
                nproc = next((int(w.split('=')[1]) for w in words if w.startswith('--nproc_per_node=')), 1)
                nnodes = next((int(w.split('=')[1]) for w in words if w.startswith('--nnodes=')), 1)
                found.append((words[words.index('train.py') + 1:], nproc * nnodes))
    return found

def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in open(os.path.join(ROOT, '.ci', 'run')) if 'python -m pytest' in line]
    assert len(ci) == 1 and ci[0] in shell_commands()
    ci = ci[0]
    assert ci.endswith('python -m pytest')

def test_readme_shows_all_nine_paper_configurations():
    runs = [args for args, _ in train_invocations()]
    pairs = {(next((a for a in args if a.startswith('--data=')), None), next((a for a in args if a.startswith('--precond=')), None))
        for args in runs}
    for data in ['cifar10-32x32', 'ffhq-64x64', 'afhqv2-64x64']:
        for precond in ['fdm_edm', 'fdm_vp', 'fdm_ve']:
            assert (f'--data=datasets/{data}.zip', f'--precond={precond}') in pairs

@pytest.mark.parametrize('args, world', train_invocations(), ids=lambda v: ' '.join(v)[:60] if isinstance(v, list) else str(v))
def test_readme_train_command_dry_runs(tmp_path, monkeypatch, args, world):
    # Stand-in datasets with the resolution in their name (labels, so --cond=1 works).
    args = list(args)
    for i, arg in enumerate(args):
        if arg.startswith('--data='):
            name = os.path.basename(arg.split('=', 1)[1])
            resolution = int(re.search(r'-(\d+)x\d+', name).group(1))
            args[i] = '--data=' + write_image_zip(tmp_path / name, num_images=4, resolution=resolution)
        if arg.startswith('--outdir='):
            args[i] = f'--outdir={tmp_path / "runs"}'
    monkeypatch.setenv('WORLD_SIZE', str(world))
    result = CliRunner().invoke(train.main, args + ['--dry-run'])
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output
    assert not (tmp_path / 'runs').exists()
