"""The tables' own files read back (training/evaluation/tables.py): a damaged cache record is
computed again and never reaches a table; a damaged stats.jsonl or training_options.json is one
line naming the file (and the line); a FIFO under any of these names is refused, not waited on."""

import json
import os

import pytest
from click.testing import CliRunner

from conftest import one_line_error, write_image_zip
from fdm.io.network_files import save_snapshot
from training.data.dataset import ImageFolderDataset
from training.evaluation import feature_stats
from training.evaluation import tables
from training.evaluation.inception import load_detector
from training.tools import tables as tables_cli
from helpers import within

def invoke(*args):
    return CliRunner().invoke(tables_cli.main, [str(a) for a in args])

#----------------------------------------------------------------------------
# The result cache: what is stored for a key comes back only whole and plausible.

KEY = dict(kind='fid', snapshot_sha256='ab' * 32, seeds='0-5')
GOOD = dict(result=dict(fid=12.5), date='2024-01-01T00:00:00+00:00', seconds=1.5, world_size=1)

# Record files as a damaged disk or a hand edit leaves them, each with the right name.
DAMAGED = {
    'negative-fid': lambda key: json.dumps(dict(GOOD, result=dict(fid=-5.0), key=key)),
    'nan-fid': lambda key: json.dumps(dict(GOOD, result=dict(fid=float('nan')), key=key)),  # Python writes NaN
    'fid-as-string': lambda key: json.dumps(dict(GOOD, result=dict(fid='12.5'), key=key)),
    'no-result': lambda key: json.dumps(dict(GOOD, result=None, key=key)),
    'no-fid': lambda key: json.dumps(dict(GOOD, result=dict(accuracy=0.5), key=key)),
    'huge-integer': lambda key: json.dumps(dict(GOOD, key=key))[:-1] + ', "seconds": 1' + '0' * 400 + '}',
    'deep-nesting': lambda key: '[' * 100000 + ']' * 100000,
    'a-list': lambda key: '[1, 2]',
    'other-key': lambda key: json.dumps(dict(GOOD, key=dict(key, seeds='0-9'))),
}

@pytest.mark.parametrize('case', sorted(DAMAGED))
def test_a_damaged_record_is_computed_again(tmp_path, case, capsys):
    cache = tables.ResultCache(str(tmp_path))
    cache.put(KEY, GOOD)
    assert cache.get(KEY)['result'] == dict(fid=12.5)  # the intact record is taken as it is
    with open(cache.path(KEY), 'w') as f:
        f.write(DAMAGED[case](tables.canonical(KEY)))
    calls = []
    def compute(job, advance):
        calls.append(job)
        return dict(fid=7.25)
    [record] = tables.run_jobs([dict(key=KEY, images=6, metrics=('fid',))], compute, cache, progress=False)
    assert len(calls) == 1 and record['result'] == dict(fid=7.25)
    assert f'Warning: {cache.path(KEY)}' in capsys.readouterr().out  # said in one line
    assert json.loads(open(cache.path(KEY)).read())['result'] == dict(fid=7.25)  # and stored again

def test_a_fifo_in_the_cache_is_computed_again_and_replaced(tmp_path):
    cache = tables.ResultCache(str(tmp_path))
    os.mkfifo(cache.path(KEY))
    with within(10):
        [record] = tables.run_jobs([dict(key=KEY, images=6)], lambda job, advance: dict(fid=3.0), cache, progress=False)
    assert record['result'] == dict(fid=3.0) and os.path.isfile(cache.path(KEY))

def test_a_computed_value_is_checked_before_it_is_stored(tmp_path):
    cache = tables.ResultCache(str(tmp_path))
    with pytest.raises(tables.EvaluationError, match=r'gave fid = -1.0, not a finite number >= 0'):
        tables.run_jobs([dict(key=KEY, images=6)], lambda job, advance: dict(fid=-1.0), cache, progress=False)
    assert not os.path.exists(cache.path(KEY))

# Through the command line: a cached FID of -5.0 never reaches results.md.
def test_kimg_table_recomputes_a_damaged_cached_fid(tmp_path, make_tiny_net):
    run = tmp_path / 'run'
    run.mkdir()
    net = make_tiny_net('EDMPrecond', label_dim=0)
    save_snapshot(run / 'network-snapshot-000001.pt', net, extra=dict(cur_nimg=1000))
    data = write_image_zip(tmp_path / 'ref.zip', num_images=40, resolution=8, num_classes=0)
    mu, sigma = feature_stats.compute_stats(ImageFolderDataset(data), load_detector('digits'), workers=0, progress=False)
    feature_stats.save_stats(tmp_path / 'ref.npz', mu, sigma)
    args = ['kimg', run, '--kimg', 1, '--steps', 1, '--ref', tmp_path / 'ref.npz', '--detector', 'digits',
        '--seeds', '0-3', '--batch', 4, '--outdir', tmp_path / 'out']
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    fid = json.loads((tmp_path / 'out' / 'results.json').read_text())['cells'][0]['fid']
    [name] = os.listdir(tmp_path / 'out' / 'cache')
    path = tmp_path / 'out' / 'cache' / name
    path.write_text(json.dumps(dict(json.loads(path.read_text()), result=dict(fid=-5.0))))
    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert 'is damaged (fid = -5.0, not a finite number >= 0); it is computed again' in second.output
    assert json.loads((tmp_path / 'out' / 'results.json').read_text())['cells'][0]['fid'] == fid
    assert '-5.00' not in (tmp_path / 'out' / 'results.md').read_text()

#----------------------------------------------------------------------------
# stats.jsonl and training_options.json of a run folder, for `curves`.

def stats_line(kimg, loss):
    return json.dumps({'Loss/loss': dict(num=8, mean=loss, std=0.0), 'Progress/kimg': dict(num=1, mean=kimg, std=0.0)})

@pytest.mark.parametrize('case', ['huge-integer', 'deep-nesting'])
def test_a_damaged_stats_line_is_one_error_naming_it(tmp_path, case):
    run = tmp_path / 'run'
    run.mkdir()
    bad = {'huge-integer': stats_line(0.016, 1.0).replace('"mean": 1.0', '"mean": 1' + '0' * 400),
        'deep-nesting': '{"Loss/loss": ' + '[' * 100000 + ']' * 100000 + '}'}[case]
    (run / 'stats.jsonl').write_text(stats_line(0.008, 1.5) + '\n' + bad + '\n' + stats_line(0.024, 0.9) + '\n')
    line = one_line_error(invoke('curves', run, '--out', tmp_path / 'c.png'))
    assert f'{run / "stats.jsonl"}: line 2 is not valid JSON' in line and 'damaged' in line
    assert not (tmp_path / 'c.png').exists()

@pytest.mark.parametrize('case', ['deep-nesting', 'huge-integer', 'fifo'])
def test_a_damaged_training_options_is_one_error_naming_it(tmp_path, case):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'stats.jsonl').write_text(stats_line(0.008, 1.5) + '\n')
    options = run / 'training_options.json'
    if case == 'fifo':
        os.mkfifo(options)
    else:
        options.write_text({'deep-nesting': '{"network_kwargs": ' + '[' * 100000 + ']' * 100000 + '}',
            'huge-integer': '{"network_kwargs": {"class_name": "EDMPrecond"}, "seed": 1' + '0' * 400 + '}'}[case])
    with within(20):
        line = one_line_error(invoke('curves', run, '--out', tmp_path / 'c.png'))
    assert str(options) in line and ('not valid JSON' in line or 'not a regular file' in line)

def test_a_fifo_for_stats_is_refused(tmp_path):
    os.mkfifo(tmp_path / 'stats.jsonl')
    with within(10), pytest.raises(tables.EvaluationError, match='stats.jsonl is not a regular file'):
        tables.read_stats(str(tmp_path / 'stats.jsonl'))

#----------------------------------------------------------------------------
