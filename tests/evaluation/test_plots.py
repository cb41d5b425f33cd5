"""The plots (training/evaluation/plots.py): legend labels that tell runs of one method apart, tick
labels without an offset or multiplier beside the axis, whole-number ticks on an NFE axis."""

import PIL.Image
import pytest

pytest.importorskip('matplotlib')

from training.evaluation import plots

#----------------------------------------------------------------------------

def test_legend_labels_tell_runs_of_one_method_apart():
    snapshots = ['runs/a/network-snapshot-200000.pt', 'runs/c/network-snapshot-200000.pt', 'runs/b/network-snapshot-200000.pt']
    assert plots.legend_labels(['EDM', 'EDM-FDM', 'EDM'], snapshots) == [
        'EDM (a/network-snapshot-200000.pt)', 'EDM-FDM', 'EDM (b/network-snapshot-200000.pt)']
    assert plots.legend_labels(['VP', 'VP'], ['x/00000-cifar10', 'y/00001-cifar10/']) == ['VP (00000-cifar10)', 'VP (00001-cifar10)']
    # The same run given twice, or no paths at all: numbered in order.
    assert plots.legend_labels(['VP', 'VP'], ['x/run', 'x/run']) == ['VP (1)', 'VP (2)']
    assert plots.legend_labels(['VP', 'VE', 'VP']) == ['VP (1)', 'VE', 'VP (2)']

def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]

def test_two_runs_of_one_method_get_two_legend_entries_and_no_offset_text(tmp_path):
    # Values that matplotlib shows with an offset by default: '+1e6' under x, '+1' beside y.
    points = [[(1_000_000 + k, 1 + (k + i) * 1e-5) for k in range(4)] for i in range(3)]
    labels = plots.legend_labels(['EDM', 'EDM', 'EDM-FDM'], ['runs/a', 'runs/b', 'runs/c'])
    panels = [('loss', dict(zip(labels, points))),
        ('loss', [('EDM', points[0]), ('EDM', points[1])])]  # a label given twice in one panel
    fig, drawn = plots.figure(panels, 'training images (kimg)', dashed=['EDM-FDM'])
    fig.canvas.draw()
    top, bottom = fig.axes
    assert legend_texts(top) == drawn[0] == ['EDM (a)', 'EDM (b)', 'EDM-FDM']
    assert legend_texts(bottom) == drawn[1] == ['EDM (1)', 'EDM (2)']
    assert [line.get_linestyle() for line in top.get_lines()] == ['-', '-', '--']
    for ax in fig.axes:
        assert ax.xaxis.get_offset_text().get_text() == '' and ax.yaxis.get_offset_text().get_text() == ''
        assert all('e' not in t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels())
    # The same data on a bare matplotlib axis does get offset text, so the checks above mean something.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    bare = Figure()
    FigureCanvasAgg(bare)
    bare = bare.subplots()
    bare.plot(*zip(*points[0]))
    bare.figure.canvas.draw()
    assert bare.xaxis.get_offset_text().get_text() != '' and bare.yaxis.get_offset_text().get_text() != ''

def test_nfe_axis_has_whole_number_ticks(tmp_path):
    panels = [('FID', {'EDM': [(3, 40.0), (5, 20.0)], 'EDM-FDM': [(3, 30.0), (5, 15.0)]})]
    fig, _ = plots.figure(panels, 'network evaluations per image (NFE)')
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)
    fig, _ = plots.figure(panels, 'training images (kimg)')  # kimg may be fractional: 3.0, 3.5, ...
    fig.canvas.draw()
    assert not all(float(t).is_integer() for t in fig.axes[0].get_xticks())

def test_line_plots_writes_a_png_of_the_size_asked(tmp_path):
    drawn = plots.line_plots([('FID', {'EDM': [(1, 5.0), (2, float('nan')), (3, 4.0)], 'VP': [(1, float('inf'))]})],
        str(tmp_path / 'p.png'), 'NFE', size=(320, 240))
    assert drawn == [['EDM']]  # VP has no finite point: no line, no legend entry
    with PIL.Image.open(tmp_path / 'p.png') as img:
        assert img.format == 'PNG' and img.size == (320, 240)

#----------------------------------------------------------------------------
