"""Post-hoc EMA profile files and the reconstruction command (training/phema.py, training/tools/phema.py):
what the rebuilt network holds, and the one-line refusal of every profile or option it cannot use."""

import os

import pytest
import torch
from click.testing import CliRunner

from conftest import one_line_error, run_train_cli, tiny_denoiser, write_image_zip
from fdm import load_network
from fdm.io.network_files import save_snapshot
from training.checkpoint.names import phema_name
from training.phema import gamma_from_std
from training.tools.phema import main

STDS = (0.05, 0.10)

def write_profile(run_dir, net, nimg, std, fields=None):
    """One stored profile, as train.py --phema-std writes it; `fields` replace those of extra.phema
    (an 'extra' field replaces extra itself)."""
    fields = dict(fields or {})
    extra = fields.pop('extra', dict(phema=dict(dict(std=std, gamma=gamma_from_std(std), cur_nimg=nimg), **fields)))
    path = os.path.join(run_dir, phema_name(nimg, std))
    save_snapshot(path, net, extra=extra)
    return path

def write_run(run_dir, times=(8, 40, 48), net=None, stds=STDS):
    """Profiles of one network at `times` for each std, the parameters the same in every file and a
    buffer set to the file's index, so each file's buffers are its own."""
    net = net or tiny_denoiser()
    buffer = next(name for name, _ in net.named_buffers())
    for i, t in enumerate(times):
        for j, std in enumerate(stds):
            net.get_buffer(buffer).fill_(len(stds) * i + j)
            write_profile(run_dir, net, t, std)
    return net, buffer

def run_tool(*args):
    return CliRunner().invoke(main, [str(a) for a in args])

#----------------------------------------------------------------------------
# What is rebuilt: a weighted average of the parameters (a constant comes back as itself), the buffers
# of the newest profile used.

def test_constant_parameters_come_back_and_buffers_are_the_newest(tmp_path):
    net, buffer = write_run(tmp_path)
    for kimg, std, newest_index in [(None, 0.001, 5), (0.040, 0.2, 3)]:
        out = tmp_path / 'out.pt'
        result = run_tool('--run', tmp_path, '--std', std, '--out', out, *(['--kimg', kimg] if kimg else []))
        assert result.exit_code == 0, result.output
        rebuilt = load_network(out)
        error = max((a - b).abs().max().item() for a, b in zip(rebuilt.parameters(), net.parameters()))
        assert error < 1e-6, (kimg, std, error)  # before the normalisation: scaled by the weights' sum
        assert torch.equal(rebuilt.get_buffer(buffer), torch.full_like(net.get_buffer(buffer), newest_index))

#----------------------------------------------------------------------------
# Profiles it cannot use, each named in one line; nothing is written.

def test_a_profile_of_another_network_is_refused(tmp_path):
    write_run(tmp_path, times=(8, 40))
    write_run(tmp_path, times=(48,), net=tiny_denoiser(model_channels=4))
    out = tmp_path / 'out.pt'
    line = one_line_error(run_tool('--run', tmp_path, '--std', 0.07, '--out', out))
    assert 'phema-000000_008-0.050.pt: its parameter' in line and 'another network' in line, line
    assert not out.exists()
    # At 40 kimg, where only the matching profiles are used, it is rebuilt.
    assert run_tool('--run', tmp_path, '--std', 0.07, '--kimg', 0.04, '--out', out).exit_code == 0

@pytest.mark.parametrize('fields, message', [
    (dict(extra=[1]), 'extra'),  # refused by the network file reader or by read_profile, either in one line
    (dict(extra=dict(cur_nimg=48)), 'no extra.phema'),
    (dict(extra=dict(phema='x')), 'no extra.phema'),
    (dict(gamma='6.9'), "gamma '6.9' is not a number"),
    (dict(gamma=[6.9]), 'gamma [6.9] is not a number'),
    (dict(gamma=None), 'gamma None is not a number'),
    (dict(gamma=True), 'gamma True is not a number'),
    (dict(gamma=float('nan')), 'gamma nan is not a number'),
    (dict(gamma=float('inf')), 'gamma inf is not a number'),
    (dict(gamma=-0.5), 'gamma -0.5 is not a number'),
    (dict(gamma=2000.0), 'gamma 2000.0 is not a number'),
    (dict(cur_nimg=0), 'cur_nimg 0 is not an integer'),
    (dict(cur_nimg=10**400), 'integer'),
    (dict(cur_nimg=48.0), 'cur_nimg 48.0 is not an integer'),
    (dict(cur_nimg='48'), "cur_nimg '48' is not an integer"),
])
def test_damaged_profile_metadata_is_one_line(tmp_path, fields, message):
    net, _ = write_run(tmp_path, times=(8,))
    write_profile(tmp_path, net, 48, 0.05, fields)
    out = tmp_path / 'out.pt'
    line = one_line_error(run_tool('--run', tmp_path, '--std', 0.07, '--out', out))
    assert 'phema-000000_048-0.050.pt' in line and message in line, line
    assert len(line) < 400 and not out.exists()

#----------------------------------------------------------------------------
# Options: the std range shared with train.py --phema-std, --kimg only at a stored time.

def test_kimg_must_be_a_stored_time(tmp_path):
    write_run(tmp_path, stds=STDS[:1])
    out = tmp_path / 'out.pt'
    for kimg, nearest in [(0.02, '0.008 or 0.04 kimg'), (0.045, '0.04 or 0.048 kimg'), (0.1, '0.048 kimg'),
            (0.001, '0.008 kimg')]:
        line = one_line_error(run_tool('--run', tmp_path, '--std', 0.07, '--kimg', kimg, '--out', out))
        assert 'no post-hoc EMA profiles were stored' in line and line.endswith(f'the nearest being {nearest}'), line
    assert not out.exists()

@pytest.mark.parametrize('option', ['--std=1e-300', '--std=0.3', '--std=nan', '--kimg=1e306', '--kimg=0', '--kimg=inf'])
def test_extreme_options_are_one_line(tmp_path, option):
    write_run(tmp_path, times=(8,))
    args = ['--run', tmp_path, '--std', 0.07, '--out', tmp_path / 'out.pt']
    line = one_line_error(run_tool(*args, option))
    assert option.split('=')[0] in line and 'range' in line, line

def test_train_phema_std_shares_the_range(tmp_path):
    data = write_image_zip(tmp_path / 'd.zip')
    for value in ('1e-300', '0.0005', '0.3', '1e999'):
        line = one_line_error(run_train_cli('--outdir', tmp_path, '--data', data, f'--phema-std={value}', '-n'))
        assert '--phema-std' in line and '0.001<=x<=0.288' in line, line
    assert run_train_cli('--outdir', tmp_path, '--data', data, '--phema-std=0.001,0.288', '-n').exit_code == 0

def test_read_profile_checks_what_the_file_reader_lets_through(monkeypatch):
    # The network file reader refuses some of these itself; read_profile does not rely on it.
    import training.phema as phema
    net = tiny_denoiser()
    for extra, message in [([1], 'no extra.phema'), (dict(phema=dict(gamma=1.0, cur_nimg=10**400)), 'cur_nimg 1000'),
            (dict(phema=dict(gamma=10**400, cur_nimg=8)), 'gamma 1000')]:
        monkeypatch.setattr(phema, 'load_network_file', lambda path: dict(ema=net, extra=extra))
        with pytest.raises(phema.CheckpointError, match=message) as info:
            phema.read_profile('p.pt')
        assert len(str(info.value)) < 300 and '\n' not in str(info.value)
