"""Post-hoc EMA (training/phema.py; its command line is training/tools/phema.py): the std <-> exponent
map, the least-squares weights against a hand computation, and a reconstruction against an EMA
tracked directly."""

import os

import pytest
import torch

from training.phema import PowerEMAs, combine, gamma_from_std, power_beta, solve_weights, std_from_gamma

def test_std_and_gamma_are_inverse_and_match_the_paper():
    # EDM2's two default profiles: sigma_rel 0.05 and 0.10 are gamma ~16.97 and ~6.94.
    assert gamma_from_std(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_from_std(0.10) == pytest.approx(6.94, abs=0.01)
    for gamma in (0.0, 0.5, 3.0, 40.0):
        assert gamma_from_std(std_from_gamma(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)
    for bad in (0.0, -0.1, 0.3, float('nan')):
        with pytest.raises(ValueError):
            gamma_from_std(bad)

def test_weights_match_a_hand_computation():
    # p_0 = 1 and p_1 = 2 tau on [0, 1]; target 1.5 tau^0.5. By hand: A = [[1, 1], [1, 4/3]],
    # b = [1, 1.2], so x = [0.4, 0.6].
    x = solve_weights([(0.0, 1.0), (1.0, 1.0)], (0.5, 1.0))
    assert x == pytest.approx([0.4, 0.6], abs=1e-12)
    # Times are only relative: the same at t = 1e6 images.
    assert solve_weights([(0.0, 1e6), (1.0, 1e6)], (0.5, 1e6)) == pytest.approx([0.4, 0.6], abs=1e-9)
    # A target that is one of the stored profiles is that profile alone.
    x = solve_weights([(2.0, 0.5), (7.0, 1.0), (16.0, 1.0)], (7.0, 1.0))
    assert x == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)

def test_first_step_copies_the_weights():
    assert power_beta(6.94, cur_nimg=512, batch_size=512) == 0.0

class Weights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
        self.register_buffer('count', torch.zeros([], dtype=torch.int64))

def test_reconstruction_equals_a_directly_tracked_ema():
    # A noisy, drifting weight trajectory; EMAs of std 0.05 and 0.10 stored every 200 steps; the
    # std 0.07 EMA rebuilt from them at the end against the one tracked all along.
    torch.manual_seed(0)
    net = Weights()
    stored, target = PowerEMAs(net, [0.05, 0.10]), PowerEMAs(net, [0.07])
    batch, steps, snapshots = 4, 4000, []
    for step in range(1, steps + 1):
        t = step * batch
        with torch.no_grad():
            net.w.copy_(torch.sin(torch.arange(64) * 0.1 + step / 700) + 0.3 * torch.randn(64, dtype=torch.float64) + step / steps)
            net.count.fill_(step)
        stored.update(t, batch)
        target.update(t, batch)
        if step % 200 == 0:
            snapshots += [((gamma, t), {k: v.clone() for k, v in ema.items()}) for gamma, ema in zip(stored.gammas, stored.emas)]
    weights = solve_weights([profile for profile, _ in snapshots], (target.gammas[0], steps * batch))
    rebuilt = combine(zip([sd for _, sd in snapshots], weights))
    error = (rebuilt['w'] - target.emas[0]['w']).abs().max().item()
    between = (target.emas[0]['w'] - stored.emas[1]['w']).abs().max().item()
    # Measured: error 1.4e-4 against 0.21 between the 0.07 and 0.10 EMAs (the continuous profile
    # approximates the discrete EMA); the bound leaves 10x headroom.
    assert error < 2e-3 and between > 0.1, (error, between)
    assert abs(weights.sum() - 1) < 1e-3  # an average of averages
    assert rebuilt['count'].item() == steps  # integer buffers are the current value

def test_state_round_trip_and_mismatch():
    net = Weights()
    emas = PowerEMAs(net, [0.05, 0.10])
    with torch.no_grad():
        net.w.fill_(1.0)
    emas.update(8, 4)
    again = PowerEMAs(Weights(), [0.05, 0.10])
    again.load_state_dict(emas.state_dict())
    assert all(torch.equal(a[k], b[k]) for a, b in zip(again.emas, emas.emas) for k in a)
    with pytest.raises(ValueError, match='stds'):
        PowerEMAs(Weights(), [0.07]).load_state_dict(emas.state_dict())
    # A stored tensor of another shape is refused (copy_ would broadcast it), and nothing is copied.
    damaged = emas.state_dict()
    damaged['emas'][1]['w'] = damaged['emas'][1]['w'].flatten()[:1]
    fresh = PowerEMAs(Weights(), [0.05, 0.10])
    before = [{k: v.clone() for k, v in ema.items()} for ema in fresh.emas]
    with pytest.raises(ValueError, match=r'no tensor w of shape'):
        fresh.load_state_dict(damaged)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(fresh.emas, before) for k in a)
    with pytest.raises(ValueError, match='2 profiles'):
        fresh.load_state_dict(dict(damaged, emas=damaged['emas'][:1]))

#----------------------------------------------------------------------------
# In the training loop: stored with each snapshot, kept in the training state (a resumed run
# continues the profiles bit for bit), and rebuilt by the reconstruction command.

def test_training_resume_and_reconstruction(tmp_path, tiny_zip, one_thread):
    from fdm import load_network
    from helpers import loop_config
    from training.phema import reconstruct
    from helpers import run_loop
    from training.checkpoint.training_state import load_training_state
    stds = [0.05, 0.10]
    for name in ('a', 'b1', 'b2'):
        os.makedirs(tmp_path / name)
    run_loop(run_dir=str(tmp_path / 'a'), **loop_config(tiny_zip, total_kimg=0.048), phema_stds=stds)
    run_loop(run_dir=str(tmp_path / 'b1'), **loop_config(tiny_zip, total_kimg=0.024), phema_stds=stds)
    run_loop(run_dir=str(tmp_path / 'b2'), **loop_config(tiny_zip, total_kimg=0.048,
        resume_state=str(tmp_path / 'b1')), phema_stds=stds)
    # Ticks of 16 images, snapshots every second tick: profiles stored at 8, 40 and 48 images.
    straight = load_training_state(str(tmp_path / 'a' / 'training-state-000000_048.pt'))
    resumed = load_training_state(str(tmp_path / 'b2' / 'training-state-000000_048.pt'))
    assert straight['cur_nimg'] == resumed['cur_nimg'] == 48 and straight['phema']['stds'] == stds
    for a, b in zip(straight['phema']['emas'], resumed['phema']['emas']):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The two profiles differ from each other and from the plain EMA: the comparison means something.
    key = 'model.enc.8x8_conv.weight'
    assert not torch.equal(straight['phema']['emas'][0][key], straight['phema']['emas'][1][key])
    assert not torch.equal(straight['phema']['emas'][0][key], straight['ema'][key])

    # A stored profile is rebuilt as itself (weight 1 on it, 0 on the others: the files are taken in
    # training order, two stds per snapshot), and the result is an ordinary snapshot.
    assert sorted(n for n in os.listdir(tmp_path / 'a') if n.startswith('phema-')) == [
        f'phema-000000_{t:03d}-{std:.3f}.pt' for t in (8, 40, 48) for std in stds]
    for kimg, stored_name, weight_at in [(None, 'phema-000000_048-0.100.pt', 5), (0.040, 'phema-000000_040-0.100.pt', 3)]:
        out = tmp_path / 'phema-0.100.pt'
        weights = reconstruct(str(tmp_path / 'a'), 0.10, str(out), kimg=kimg, log=lambda *args: None)
        assert weights == pytest.approx([float(i == weight_at) for i in range(weight_at + 1)], abs=1e-6)
        rebuilt, stored = load_network(out), load_network(tmp_path / 'a' / stored_name)
        for (k, x), (_, y) in zip(rebuilt.state_dict().items(), stored.state_dict().items()):
            assert torch.allclose(x, y, rtol=0, atol=1e-6), k

def test_resume_without_stored_profiles_is_refused(tmp_path, tiny_zip, one_thread):
    from fdm.io.network_files import CheckpointError
    from helpers import loop_config
    from helpers import run_loop
    os.makedirs(tmp_path / 'a')
    run_loop(run_dir=str(tmp_path / 'a'), **loop_config(tiny_zip, total_kimg=0.016))
    with pytest.raises(CheckpointError, match='without --phema-std'):
        run_loop(run_dir=str(tmp_path / 'a'), **loop_config(tiny_zip, total_kimg=0.032,
            resume_state=str(tmp_path / 'a')), phema_stds=[0.05])

def test_reconstruction_errors_are_one_line(tmp_path):
    from click.testing import CliRunner
    from training.tools.phema import main
    result = CliRunner().invoke(main, ['--run', str(tmp_path), '--std', '0.07', '--out', str(tmp_path / 'x.pt')])
    assert result.exit_code == 1 and 'no phema-*.pt snapshots' in result.output and 'Traceback' not in result.output
    assert not os.path.exists(tmp_path / 'x.pt')
