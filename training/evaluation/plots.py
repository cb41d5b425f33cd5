"""Line plots for the tables and the training curves: one PNG of stacked panels, one line per run.

matplotlib is an optional extra (`pip install matplotlib`, or `pip install .[plots]`): it is
imported only when a plot is drawn, through its Agg canvas (no display, no pyplot state), and
without it a plot is a one-line PlotError that says what to install.
"""

import math

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

def line_plots(panels, path, xlabel, size=(800, 500), dashed=()):
    """Write a PNG of exactly `size` pixels (width, height) with one panel per entry of `panels`,
    stacked vertically: each panel is (ylabel, {label: [(x, y), ...]}), one line per label, in
    the order given, coloured by that order (COLOURS, repeating after ten). Labels in `dashed` are
    drawn dashed (FDM against its solid baseline). Non-finite points are left out. Returns the
    labels drawn, panel by panel."""
    Figure, FigureCanvasAgg = _matplotlib()
    width, height = size
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    drawn = []
    for ax, (ylabel, series) in zip(axes, panels):
        labels = []
        for i, (label, points) in enumerate(series.items()):
            points = sorted((x, y) for x, y in points if math.isfinite(y))
            if not points:
                continue
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker='o', markersize=4, linewidth=2, color=COLOURS[i % len(COLOURS)],
                linestyle='--' if label in dashed else '-', label=label)
            labels.append(label)
        if _wants_log([y for points in series.values() for _, y in points]):
            ax.set_yscale('log')
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if labels:
            ax.legend(fontsize='small')
        drawn.append(labels)
    axes[-1].set_xlabel(xlabel)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    return drawn

#----------------------------------------------------------------------------
