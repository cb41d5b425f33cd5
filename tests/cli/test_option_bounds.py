"""Options bounded where they enter: sampling steps, NFE and protocol sizes within what a study
uses (training/evaluation/generation.py MAX_STEPS, MAX_SEEDS), refused by the option's click type
before any work; and a --device this machine lacks refused in one line by the one reader of
--device (torch_utils/distributed.py device) instead of a traceback from the first tensor moved there."""

import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from conftest import one_line_error
from fdm.io.network_files import save_snapshot
from torch_utils import distributed
from torch_utils.errors import OptionError
from training.evaluation.generation import MAX_SEEDS, MAX_STEPS, select_sampler
from training.tools.tables import main as tables_main

HUGE = 10**10  # --steps=1e10 used to allocate its time steps until the memory ran out

def usage_error(result, option):
    assert result.exit_code == 2, (repr(result.exception), result.output)
    assert f"Invalid value for '{option}'" in result.output and 'Traceback' not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith('Error')][0]

# Each command with everything it requires; nothing is read before the options are parsed.
COMMANDS = dict(
    generate=(generate.main, ['--network', 'net.pt', '--outdir', 'out']),
    fid_gen=(fid.main, ['gen', '--network', 'net.pt', '--ref', 'ref.npz']),
    fid_protocol=(fid.main, ['protocol', '--network', 'net.pt', '--ref', 'ref.npz']),
    tables_kimg=(tables_main, ['kimg', 'run', '--ref', 'ref.npz', '--outdir', 'out']),
)

@pytest.mark.parametrize('command', sorted(COMMANDS))
@pytest.mark.parametrize('steps', [HUGE, MAX_STEPS + 1])
def test_steps_beyond_the_bound_are_a_usage_error(tmp_path, monkeypatch, command, steps):
    monkeypatch.chdir(tmp_path)
    main, args = COMMANDS[command]
    line = usage_error(CliRunner().invoke(main, args + ['--steps', str(steps)]), '--steps')
    assert f'{steps} is not in the range 1<=x<={MAX_STEPS}' in line
    assert list(tmp_path.iterdir()) == []

@pytest.mark.parametrize('option, value, words', [
    ('--nfe', f'25,{HUGE}', f'{HUGE} is not in the range 1<=x<={MAX_STEPS}'),
    ('--nfe', str(MAX_STEPS + 1), f'{MAX_STEPS + 1} is not in the range'),
    ('--protocol', str(HUGE), f'{HUGE} is not in the range 2<=x<={MAX_SEEDS // 3}'),
])
def test_tables_counts_beyond_their_bounds_are_a_usage_error(tmp_path, monkeypatch, option, value, words):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(tables_main, ['nfe', 'net.pt', '--ref', 'ref.npz', '--outdir', 'out', option, value])
    assert words in usage_error(result, option)
    assert list(tmp_path.iterdir()) == []

def test_the_library_checks_the_same_step_bound():
    assert select_sampler(num_steps=MAX_STEPS)[1]['num_steps'] == MAX_STEPS
    with pytest.raises(OptionError, match=f'num_steps: {HUGE} is not in the range 1<=x<={MAX_STEPS}'):
        select_sampler(num_steps=HUGE)

#----------------------------------------------------------------------------
# --device: one line naming it, before the network is read or the folder made.

# A device of a kind this machine has none of (CUDA without a GPU), or one index past its GPUs.
def missing_device():
    return f'cuda:{torch.cuda.device_count()}' if torch.cuda.is_available() else 'cuda'

def test_generate_refuses_a_device_this_machine_lacks(tmp_path, make_tiny_net):
    save_snapshot(tmp_path / 'net.pt', make_tiny_net(label_dim=0))
    result = CliRunner().invoke(generate.main, ['--network', str(tmp_path / 'net.pt'), '--outdir', str(tmp_path / 'out'),
        '--seeds', '0', '--steps', '2', '--device', missing_device()])
    line = one_line_error(result)
    assert line.startswith(f'Error: --device {missing_device()}: this machine has') and 'Loading' not in result.output, result.output
    assert not (tmp_path / 'out').exists()

@pytest.mark.parametrize('spec, words', [('nonsense', "--device 'nonsense' is not a device; use cpu, cuda or cuda:N"),
    ('cuda:-1', "--device 'cuda:-1' is not a device"), ('meta', '--device meta: this machine has no meta device'),
    (missing_device(), f'--device {missing_device()}: this machine has')])
def test_the_device_reader_refuses_in_one_line(spec, words):
    with pytest.raises(OptionError) as info:
        distributed.device(spec)
    assert str(info.value).startswith(words) and '\n' not in str(info.value), str(info.value)

def test_the_device_reader_takes_what_exists():
    assert distributed.device('cpu') == torch.device('cpu')
    assert distributed.device() == (torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu'))
    if torch.cuda.is_available():
        assert distributed.device('cuda:0') == torch.device('cuda', 0)

#----------------------------------------------------------------------------
# train.py: a --cbase whose U-Net cannot run (EDM's GroupNorm splits 130 channels into 32 groups;
# ADM's attention 224 channels into 3 heads) is refused before the run folder, as a file stating it is.

@pytest.mark.parametrize('arch, cbase, fragment', [
    ('ddpmpp', 130, 'normalises 130 channels in 32 groups, which do not divide them'),
    ('adm', 224, 'splits 224 channels into 3 attention heads'),
])
def test_a_cbase_whose_network_cannot_run_is_refused(tmp_path, tiny_zip, arch, cbase, fragment):
    from conftest import run_train_cli
    line = one_line_error(run_train_cli('--outdir', str(tmp_path / 'runs'), '--data', tiny_zip, f'--arch={arch}',
        f'--cbase={cbase}', '--cres=1,1', '--batch=8', '--duration=0.00002', '--workers=0', '--dry-run'))
    assert f'--arch={arch} with --cbase={cbase} gives a U-Net that cannot run' in line and fragment in line, line
    assert 'multiple of 64' in line and not (tmp_path / 'runs').exists()
