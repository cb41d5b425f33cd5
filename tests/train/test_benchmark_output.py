"""The benchmark's hold on native output (training/tools/benchmark.py): the profiler's lines are
held back, and shown after all when the block fails."""

import os

import pytest

from training.tools.benchmark import quiet_native_output

def test_native_output_is_held_back_and_shown_on_failure(capfd):
    with quiet_native_output():
        os.write(1, b'profiler_start\n')  # as Kineto writes: to the file descriptor, past sys.stdout
        os.write(2, b'profiler_stop\n')
    os.write(1, b'table\n')
    assert capfd.readouterr() == ('table\n', '')
    with pytest.raises(RuntimeError, match='boom'):
        with quiet_native_output():
            os.write(2, b'why it failed\n')
            raise RuntimeError('boom')
    assert capfd.readouterr().err == 'why it failed\n'
