"""The one rule for numeric options (torch_utils/cli/options.py): every numeric option of every
script refuses NaN, refuses infinity unless its help says what infinity means, and states its
range; the library functions the scripts call refuse the same values when called directly."""

import inspect
import math

import click
import pytest
from click.testing import CliRunner

import dataset_tool
import fid
import generate
import train
from training.tools import benchmark
from training.tools import demo
from training.tools import mini_repro
from training.tools import phema
from training.tools import tables
from torch_utils.cli.options import Float, Int, OptionError, Range
from training.config import setup_training_config

#----------------------------------------------------------------------------
# The command line: (script, the arguments before the bad option, option, bad value).

TRAIN = ('train', train.main, ['--outdir=out', '--data=missing.zip', '-n'])
GENERATE = ('generate', generate.main, ['--network=missing.pt', '--outdir=out'])
FID_GEN = ('fid-gen', fid.main, ['gen', '--network=missing.pt', '--ref=missing.npz'])
FID_CALC = ('fid-calc', fid.main, ['calc', '--images=missing', '--ref=missing.npz'])
DATASET_TOOL = ('dataset_tool', dataset_tool.main, ['--source=missing', '--dest=out.zip'])
DEMO = ('demo', demo.main, ['--outdir=out'])
MINI = ('mini_repro', mini_repro.main, ['--outdir=out'])
PHEMA = ('phema', phema.main, ['--run=missing', '--out=out.pt', '--std=0.05'])
TABLES_KIMG = ('tables-kimg', tables.main, ['kimg', 'missing-run'])
BENCHMARK = ('benchmark', benchmark.main, ['--small'])

BAD_VALUES = [
    (TRAIN, '--lr', 'inf'), (TRAIN, '--lr', 'nan'), (TRAIN, '--lr', '5'),
    (TRAIN, '--fdm_multiplier', 'nan'), (TRAIN, '--fdm_multiplier', '-1'), (TRAIN, '--augment', 'nan'),
    (TRAIN, '--duration', 'inf'), (TRAIN, '--duration', 'nan'), (TRAIN, '--ema', 'nan'), (TRAIN, '--ema', 'inf'),
    (TRAIN, '--dropout', 'nan'), (TRAIN, '--cbase', '0'), (TRAIN, '--cbase', '-3'), (TRAIN, '--ls', 'inf'),
    (TRAIN, '--tick', 'nan'), (TRAIN, '--lr_rampup', 'nan'), (TRAIN, '--warmup_ite', 'nan'),
    (TRAIN, '--warmup_ite', 'inf'), (TRAIN, '--warmup_ite', '1e9'), (TRAIN, '--batch', '0'),
    (GENERATE, '--rho', 'nan'), (GENERATE, '--rho', 'inf'), (GENERATE, '--S_noise', 'nan'), (GENERATE, '--S_noise', '-1'),
    (GENERATE, '--S_max', 'nan'), (GENERATE, '--S_min', 'nan'), (GENERATE, '--S_churn', 'inf'),
    (GENERATE, '--sigma_max', '1e30'), (GENERATE, '--sigma_max', 'nan'), (GENERATE, '--sigma_max', 'inf'),
    (GENERATE, '--sigma_min', 'nan'), (GENERATE, '--sigma_min', '0'), (GENERATE, '--steps', '0'),
    (FID_GEN, '--steps', '0'), (FID_GEN, '--batch', '0'), (FID_CALC, '--num', '1'), (FID_CALC, '--seed', '-1'),
    (DATASET_TOOL, '--max-images', '0'),
    (DEMO, '--kimg', 'nan'), (DEMO, '--kimg', 'inf'), (DEMO, '--kimg', '0'), (MINI, '--kimg', 'nan'), (MINI, '--seed', '-1'),
    (PHEMA, '--std', 'nan'), (PHEMA, '--kimg', 'nan'), (TABLES_KIMG, '--tolerance', 'nan'), (BENCHMARK, '--augment', 'nan'),
]

@pytest.mark.parametrize('script, option, value', BAD_VALUES, ids=[f'{s[0]}{o}={v}' for s, o, v in BAD_VALUES])
def test_bad_number_is_a_usage_error_naming_the_option(script, option, value):
    _, command, args = script
    result = CliRunner().invoke(command, args + [f'{option}={value}'])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(lines) == 1 and option in lines[0] and 'Traceback' not in result.output, result.output

# What stays valid: infinity where the help says what it means, and the documented defaults.
def test_s_max_inf_and_defaults_still_parse():
    context = generate.main.make_context('generate', ['--network=n', '--outdir=o', '--S_max=inf'])
    assert context.params['S_max'] == math.inf and context.params['rho'] == 7 and context.params['S_noise'] == 1
    context = train.main.make_context('train', ['--outdir=o', '--data=d', '--warmup_ite=200', '--lr=2e-4'])
    assert context.params['warmup_ite'] == 200 and context.params['lr'] == 2e-4 and context.params['duration'] is None
    # An option left out takes setup_training_config's default, its one home, which --help shows.
    assert inspect.signature(setup_training_config).parameters['duration'].default == 200
    assert 'Training duration [default: 200]' in ' '.join(CliRunner().invoke(train.main, ['--help']).output.split())

def _commands():
    yield 'train.py', train.main
    yield 'generate.py', generate.main
    yield 'dataset_tool.py', dataset_tool.main
    for name, command in fid.main.commands.items():
        yield f'fid.py {name}', command
    # The tools' commands (python -m training.tools.X) follow the same rule.
    for module in (benchmark, demo, mini_repro, phema):
        yield f'python -m {module.__name__}', module.main
    for name, command in tables.main.commands.items():
        yield f'python -m training.tools.tables {name}', command

# Every numeric option goes through the rule: no plain click FLOAT/INT/FloatRange/IntRange left.
def test_every_numeric_option_uses_the_rule():
    numeric = []
    for where, command in _commands():
        for param in command.params:
            if isinstance(param, click.Option) and isinstance(param.type, click.types._NumberParamTypeBase):
                numeric.append(param.name)
                assert isinstance(param.type, (Float, Int)), f'{where} {param.opts[0]} has type {param.type!r}'
    assert len(numeric) >= 40

def test_help_shows_the_range():
    output = CliRunner().invoke(train.main, ['--help']).output
    assert '0<x<=1' in ' '.join(output.split())

#----------------------------------------------------------------------------
# The rule itself, and the library calls that use it.

def test_range_refuses_nan_and_infinity_unless_allowed():
    positive = Range(min=0, min_open=True)
    assert positive.check('x', 1.5) == 1.5 and positive.check('x', None) is None
    for value in (math.nan, math.inf, 0.0, -1.0, 'a', True):
        with pytest.raises(OptionError, match='x: '):
            positive.check('x', value)
    assert Range(min=0, allow_inf=True).check('x', math.inf) == math.inf
    with pytest.raises(OptionError):
        Range(min=0, allow_inf=True).check('x', math.nan)
    with pytest.raises(OptionError, match='not an integer'):
        Range(min=1, integer=True).check('n', 2.5)

@pytest.mark.parametrize('option, value', [('sigma_max', 1e30), ('sigma_max', math.nan), ('rho', math.nan),
    ('S_noise', math.nan), ('S_max', math.nan), ('num_steps', 0)])
def test_select_sampler_refuses_what_the_command_line_refuses(option, value):
    from training.evaluation.generation import select_sampler
    with pytest.raises(OptionError, match=option):
        select_sampler(solver='dpm' if option.startswith('sigma') else None, **{option: value})

@pytest.mark.parametrize('option, value', [('lr', math.inf), ('warmup_ite', math.nan), ('fdm_multiplier', math.nan),
    ('duration', math.inf), ('cbase', 0), ('dropout', math.nan)])
def test_training_config_refuses_what_the_command_line_refuses(tmp_path, option, value):
    # Checked before the dataset is opened: the missing path is never reached.
    with pytest.raises(OptionError, match=option):
        setup_training_config(data=str(tmp_path / 'missing.zip'), **{option: value})

#----------------------------------------------------------------------------
