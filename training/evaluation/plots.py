"""Line plots for the tables and the training curves: one PNG of stacked panels, one line per run.

matplotlib is an optional extra (`pip install matplotlib`, or `pip install .[plots]`): it is
imported only when a plot is drawn, through its Agg canvas (no display, no pyplot state), and
without it a plot is a one-line PlotError that says what to install.
"""

import math
import os

from torch_utils.errors import UserError
from torch_utils.io.files import atomic_write

class PlotError(UserError):
    """A plot that cannot be drawn; the message says what to install or change."""

# Line colours in order (matplotlib's tab10), so that a test can find each run's line by colour.
COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf']

#----------------------------------------------------------------------------

# Figure and canvas classes, imported on first use: the tables and training work without matplotlib.
def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError('drawing plots needs matplotlib, which is not installed; pip install matplotlib') from None
    return Figure, FigureCanvasAgg

# A log axis helps when the values span a decade or more (FID falls from hundreds to a few).
def _wants_log(values):
    values = [v for v in values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) >= 10 * min(values)

def legend_labels(titles, paths=None):
    """One distinct label per curve: its title (the method, e.g. EDM-FDM) alone when no other curve
    has that title, else the title and the shortest end of its path (run folder or snapshot file)
    that no other curve of that title shares, e.g. 'EDM (a/network-snapshot-200000.pt)' and
    'EDM (b/network-snapshot-200000.pt)'. Without paths, or for the same path given twice, the
    curve's position (1, 2, ...) among those of its title."""
    paths = [None] * len(titles) if paths is None else list(paths)
    parts = [os.path.normpath(p).replace(os.sep, '/').split('/') if p else [] for p in paths]
    labels = []
    for i, title in enumerate(titles):
        same = [j for j, t in enumerate(titles) if t == title]
        if len(same) == 1:
            labels.append(title)
            continue
        tails = lambda k: ['/'.join(parts[j][-k:]) for j in same]  # the last k path components of each
        k = next((k for k in range(1, max(len(parts[j]) for j in same) + 1) if len(set(tails(k))) == len(same)), None)
        tag = tails(k)[same.index(i)] if k else str(same.index(i) + 1)
        labels.append(f'{title} ({tag})')
    return labels

def figure(panels, xlabel, size=(800, 500), dashed=()):
    """The matplotlib Figure of line_plots (with its Agg canvas) and the labels drawn, panel by panel."""
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import MaxNLocator
    width, height = size
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    drawn = []
    for ax, (ylabel, series) in zip(axes, panels):
        series = list(series.items() if hasattr(series, 'items') else series)
        titles = [label for label, _points in series]
        labels = []
        for i, (label, (title, points)) in enumerate(zip(legend_labels(titles), series)):
            points = sorted((x, y) for x, y in points if math.isfinite(y))
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker='o', markersize=4, linewidth=2, color=COLOURS[i % len(COLOURS)],
                linestyle='--' if title in dashed else '-', label=label)
            labels.append(label)
        # Tick labels read as the values themselves: no '+1e6' offset or '1e-5' multiplier beside the axis.
        ax.ticklabel_format(axis='both', style='plain', useOffset=False)
        if _wants_log([y for _label, points in series for _, y in points]):
            ax.set_yscale('log')
        if 'NFE' in xlabel:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # network evaluations are whole numbers
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if labels:
            ax.legend(fontsize='small')
        drawn.append(labels)
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    return fig, drawn

def line_plots(panels, path, xlabel, size=(800, 500), dashed=()):
    """Write a PNG of exactly `size` pixels (width, height) with one panel per entry of `panels`,
    stacked vertically: each panel is (ylabel, series), series being {label: [(x, y), ...]} or a
    list of (label, [(x, y), ...]) pairs, one line per label, in the order given, coloured by that
    order (COLOURS, repeating after ten). A label given twice in a panel gets its position appended
    (legend_labels; callers that know the runs' paths pass labels made by legend_labels with them).
    Labels in `dashed` are drawn dashed (FDM against its solid baseline). Non-finite points are left
    out. An x axis labelled with NFE gets whole-number ticks. Returns the labels drawn, panel by panel."""
    fig, drawn = figure(panels, xlabel, size=size, dashed=dashed)
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    return drawn

#----------------------------------------------------------------------------
