"""--tensorboard: every tick's statistics, read back from the event files with TensorBoard's own reader."""

import json
import os

import pytest

from helpers import loop_config
from helpers import run_loop

pytestmark = pytest.mark.usefixtures('one_thread')

def test_event_files_hold_the_tick_statistics(tmp_path, tiny_zip):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / 'run'
    os.makedirs(run_dir)
    run_loop(run_dir=str(run_dir), **loop_config(tiny_zip, total_kimg=0.032, state_dump_ticks=None,
        snapshot_ticks=None), tensorboard=True)
    ticks = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    events = EventAccumulator(str(run_dir / 'runs'))
    events.Reload()
    loss = events.Scalars('Loss/loss')
    # One point per tick at the images seen, with the tick's mean loss (stored as float32).
    assert [e.step for e in loss] == [round(t['Progress/kimg']['mean'] * 1000) for t in ticks]
    assert [e.value for e in loss] == pytest.approx([t['Loss/loss']['mean'] for t in ticks], rel=1e-6)
    assert {'Loss/loss', 'Progress/lr', 'Timing/img_per_sec', 'Train/nonfinite_grads'} <= set(events.Tags()['scalars'])

def test_missing_tensorboard_is_one_line(monkeypatch, tmp_path):
    import builtins
    from torch_utils.errors import UserError
    from torch_utils.tensorboard import open_writer
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith('torch.utils.tensorboard') or name.startswith('tensorboard'):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_tensorboard)
    with pytest.raises(UserError, match='pip install tensorboard'):
        open_writer(str(tmp_path / 'runs'))
    assert not os.path.exists(tmp_path / 'runs')
