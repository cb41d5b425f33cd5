"""Post-hoc EMA (training/phema.py; its command line is training/tools/phema.py): the std <-> exponent
map, the least-squares weights against a hand computation, and a reconstruction against an EMA
tracked directly. The profile files and their checks: test_phema_files.py."""

import os

import numpy as np
import pytest
import torch

from training.phema import PowerEMAs, combine, gamma_from_std, power_beta, solve_weights, std_from_gamma

def test_std_and_gamma_are_inverse_and_match_the_paper():
    # EDM2's two default profiles: sigma_rel 0.05 and 0.10 are gamma ~16.97 and ~6.94.
    assert gamma_from_std(0.05) == pytest.approx(16.97, abs=0.01)
    assert gamma_from_std(0.10) == pytest.approx(6.94, abs=0.01)
    for gamma in (0.02, 0.5, 3.0, 40.0, 900.0):
        assert gamma_from_std(std_from_gamma(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-9)
    # The range ends (STD_RANGE, shared by train.py --phema-std and the reconstruction's --std):
    # a finite exponent >= 0 at both, and every std outside refused rather than overflowing.
    assert gamma_from_std(0.001) == pytest.approx(997.0, abs=0.01) and 0 < gamma_from_std(0.288) < 0.02
    for bad in (0.0, -0.1, 0.3, 0.0009, 1e-300, 1e300, float('nan'), float('inf'), '0.05'):
        with pytest.raises(ValueError, match='post-hoc EMA std'):
            gamma_from_std(bad)

def test_weights_match_a_hand_computation():
    # p_0 = 1 and p_1 = 2 tau on [0, 1]; target 1.5 tau^0.5. By hand: A = [[1, 1], [1, 4/3]],
    # b = [1, 1.2], so x = [0.4, 0.6].
    x = solve_weights([(0.0, 1.0), (1.0, 1.0)], (0.5, 1.0))
    assert x == pytest.approx([0.4, 0.6], abs=1e-12)
    # Times are only relative: the same at t = 1e6 images.
    assert solve_weights([(0.0, 1e6), (1.0, 1e6)], (0.5, 1e6)) == pytest.approx([0.4, 0.6], abs=1e-9)
    # p_0 = 2 tau and p_1 = 3 tau^2 on [0, 1]; target 1 (the plain average). By hand: A = [[4/3, 3/2],
    # [3/2, 9/5]], b = [1, 1], so x = [2, -10/9], which sums to 8/9; normalised to sum 1 (the
    # result is an average): [9/4, -5/4].
    assert solve_weights([(1.0, 1.0), (2.0, 1.0)], (0.0, 1.0)) == pytest.approx([2.25, -1.25], abs=1e-12)
    # A target that is one of the stored profiles is that profile alone.
    x = solve_weights([(2.0, 0.5), (7.0, 1.0), (16.0, 1.0)], (7.0, 1.0))
    assert x == pytest.approx([0.0, 1.0, 0.0], abs=1e-6)

# <p_a, p_b> as EDM2 states it (Karras et al. 2024, Appendix C.1): (g_a+1)(g_b+1) r / ((g_a+g_b+1) max(t_a, t_b)),
# r = (t_a/t_b)^g_b if t_a < t_b, else (t_a/t_b)^-g_a; written here apart from training/phema.py.
def edm2_inner(a, b):
    (g_a, t_a), (g_b, t_b) = a, b
    r = (t_a / t_b) ** g_b if t_a < t_b else (t_a / t_b) ** -g_a
    return (g_a + 1) * (g_b + 1) * r / ((g_a + g_b + 1) * max(t_a, t_b))

def test_weights_solve_the_normal_equations_normalised():
    # A 3x3 system at times in images, the target off the stored stds; its raw solution does not sum
    # to 1 (checked, so the normalisation is what is tested).
    stored, target = [(16.97, 4e5), (6.94, 7e5), (16.97, 1e6)], (3.0, 1e6)
    A = np.array([[edm2_inner(a, b) for b in stored] for a in stored])
    raw = np.linalg.solve(A, np.array([edm2_inner(a, target) for a in stored]))
    assert abs(raw.sum() - 1) > 0.05, raw.sum()
    assert solve_weights(stored, target) == pytest.approx(raw / raw.sum(), rel=1e-7, abs=1e-9)

def test_a_constant_weight_comes_back_as_itself():
    # Every stored profile holds the same tensor: any combination whose weights sum to 1 gives it back,
    # whatever the target std and the stored set (before the normalisation it came back scaled by 0.5-1.04).
    theta = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for stds, times in [((0.05, 0.10), (8e6,)), ((0.05, 0.10), (8e6, 16e6, 24e6)),
            ((0.05, 0.10), [8e6 * i for i in range(1, 13)]), ((0.01, 0.05, 0.2), (1e4, 5e4)), ((0.288,), (3e3, 4e3))]:
        stored = [(gamma_from_std(std), t) for t in times for std in stds]
        for target_std in (0.001, 0.02, 0.07, 0.15, 0.288):
            weights = solve_weights(stored, (gamma_from_std(target_std), times[-1]))
            rebuilt = combine((dict(w=theta), x) for x in weights)['w']
            worst = max(worst, (rebuilt - theta).abs().max().item())
    assert worst < 1e-6, worst  # float32 tensors summed in float64 (measured: exactly 0)

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
    rebuilt = combine((dict(w=sd['w']), x) for (_, sd), x in zip(snapshots, weights))
    error = (rebuilt['w'] - target.emas[0]['w']).abs().max().item()
    between = (target.emas[0]['w'] - stored.emas[1]['w']).abs().max().item()
    # Measured: error 1.1e-4 against 0.21 between the 0.07 and 0.10 EMAs (the continuous profile
    # approximates the discrete EMA); the bound leaves 10x headroom.
    assert error < 2e-3 and between > 0.1, (error, between)
    assert abs(weights.sum() - 1) < 1e-12  # an average of averages

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
