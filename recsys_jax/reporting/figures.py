"""The report's plots, as PNG bytes (matplotlib, no pyplot state).

Three kinds cover every figure: panels of lines (training curves,
validation vs test over steps), panels of grouped bars (metrics by
frequency bucket, coverage, critique lift) and overlaid histograms
(popularity of what is recommended). Every panel has a title and labelled
axes; one legend above the panels is drawn whenever there is more than one
labelled series.
"""

import dataclasses
import io
import math
from typing import List, Optional, Sequence

import matplotlib
from matplotlib.figure import Figure
import numpy as np

# Readable at the page's width (figures are ~1100 px wide at 100 dpi).
_RC = {
    "font.size": 12, "axes.titlesize": 13, "axes.labelsize": 12,
    "xtick.labelsize": 11, "ytick.labelsize": 11, "legend.fontsize": 11,
    "figure.titlesize": 15, "axes.grid": True, "grid.alpha": 0.3,
    "axes.spines.top": False, "axes.spines.right": False,
}
WIDTH_IN = 11.0
DPI = 100
_LEGEND_MAX_COLS = 4
_LABEL_IN = 0.5  # width a bar's value label needs
# Runs get strong colours; baselines muted ones (and hatched bars).
_RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
               "#e377c2", "#17becf", "#393b79", "#ad494a", "#637939")
_BASELINE_COLORS = ("#7f7f7f", "#bcbd22", "#8c564b", "#525252", "#c7c7c7",
                    "#9c9ede")


def run_color(i: int) -> str:
  return _RUN_COLORS[i % len(_RUN_COLORS)]


def baseline_color(i: int) -> str:
  return _BASELINE_COLORS[i % len(_BASELINE_COLORS)]


@dataclasses.dataclass
class Line:
  label: str
  xs: Sequence[float]
  ys: Sequence[float]
  color: str
  linestyle: str = "-"
  marker: Optional[str] = None


@dataclasses.dataclass
class HLine:
  """A constant reference (e.g. a baseline) across a line panel."""
  label: str
  y: float
  color: str
  linestyle: str = ":"


@dataclasses.dataclass
class LinePanel:
  title: str
  ylabel: str
  lines: List[Line]
  hlines: List[HLine] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Bars:
  label: str
  values: Sequence[Optional[float]]  # one per category; None: no bar
  color: str
  hatch: Optional[str] = None


@dataclasses.dataclass
class BarPanel:
  title: str
  ylabel: str
  categories: Sequence[str]
  bars: List[Bars]
  xlabel: str = ""
  reference: Optional[float] = None  # a dashed horizontal line (e.g. lift 1)
  reference_label: str = ""  # its legend entry (none if empty)


def _png(fig: Figure) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=DPI)
  return buf.getvalue()


_TITLE_IN = 0.5  # room for the figure title
_LEGEND_ROW_IN = 0.32  # room for one row of the legend


def _grid(n: int, ncols: int, panel_height: float, title: str,
          legend_rows: int):
  """A figure of n panels with room on top for its title and legend (the
  constrained layout keeps the panels below `rect`'s top)."""
  ncols = max(1, min(ncols, n))
  nrows = math.ceil(n / ncols)
  top = _TITLE_IN + _LEGEND_ROW_IN * legend_rows
  height = panel_height * nrows + top
  fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
  fig.get_layout_engine().set(rect=(0, 0, 1, 1 - top / height))
  fig.suptitle(title, y=1 - 0.08 / height, va="top")
  axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
  for ax in axes[n:]:
    ax.remove()
  return fig, axes[:n]


def _legend(fig: Figure, handles_labels):
  """One legend under the figure title, when there is more than one series."""
  seen = {}
  for handle, label in handles_labels:
    if label and not label.startswith("_"):
      seen.setdefault(label, handle)
  if len(seen) < 2:
    return
  height = fig.get_figheight()
  fig.legend(list(seen.values()), list(seen), loc="upper center",
             bbox_to_anchor=(0.5, 1 - (_TITLE_IN - 0.05) / height),
             ncols=_legend_cols(len(seen)), frameon=False)


def _legend_cols(n: int) -> int:
  """Columns of a legend of n entries: at most 4, rows filled evenly (the
  legend fills column by column, so a run's series stay together)."""
  return math.ceil(n / math.ceil(n / _LEGEND_MAX_COLS))


def _legend_rows(labels: Sequence[str]) -> int:
  n = len(set(labels))
  return 0 if n < 2 else math.ceil(n / _LEGEND_MAX_COLS)


def line_panels(panels: Sequence[LinePanel], *, title: str, xlabel: str,
                ncols: int = 2, panel_height: float = 3.4) -> bytes:
  """Panels of lines sharing one legend; x is usually the training step."""
  labels = [ln.label for p in panels for ln in p.lines] + [
      h.label for p in panels for h in p.hlines]
  with matplotlib.rc_context(_RC):
    fig, axes = _grid(len(panels), ncols, panel_height, title,
                      _legend_rows(labels))
    handles = []
    for ax, panel in zip(axes, panels):
      # Markers where the points are few (evaluation steps), alike for every
      # line of a panel; a lone point always has one (a line would not show).
      sparse = max((len(ln.xs) for ln in panel.lines), default=0) <= 12
      for ln in panel.lines:
        marker = ln.marker or ("o" if sparse or len(ln.xs) == 1 else None)
        ax.plot(ln.xs, ln.ys, color=ln.color, linestyle=ln.linestyle,
                marker=marker, markersize=6, linewidth=1.8, label=ln.label)
      for h in panel.hlines:
        ax.axhline(h.y, color=h.color, linestyle=h.linestyle, linewidth=1.6,
                   label=h.label)
      ax.set_title(panel.title)
      ax.set_xlabel(xlabel)
      ax.set_ylabel(panel.ylabel)
      ax.ticklabel_format(axis="x", style="plain", useOffset=False)
      handles.extend(zip(*ax.get_legend_handles_labels()))
    _legend(fig, handles)
    return _png(fig)


def _bar_labels(ax, rects, values):
  for rect, v in zip(rects, values):
    if v is None:
      continue
    ax.annotate(f"{v:.3g}", (rect.get_x() + rect.get_width() / 2,
                             rect.get_height()),
                xytext=(0, 2), textcoords="offset points", ha="center",
                va="bottom", fontsize=9)


def bar_panels(panels: Sequence[BarPanel], *, title: str, ncols: int = 2,
               panel_height: float = 3.8, annotate: bool = True) -> bytes:
  """Panels of grouped bars (one group per category) sharing one legend."""
  labels = [b.label for p in panels for b in p.bars
            if any(v is not None for v in b.values)] + [
      p.reference_label for p in panels if p.reference_label]
  with matplotlib.rc_context(_RC):
    fig, axes = _grid(len(panels), ncols, panel_height, title,
                      _legend_rows(labels))
    handles = []
    for ax, panel in zip(axes, panels):
      # A series with no value in this panel takes neither room nor a
      # legend entry (e.g. a run whose evaluation lacks the metric).
      series = [b for b in panel.bars
                if any(v is not None for v in b.values)]
      n = max(1, len(series))
      width = 0.8 / n
      x = np.arange(len(panel.categories))
      # Values over the bars where they fit side by side (~0.5 in each).
      inches_per_bar = WIDTH_IN / min(ncols, len(panels)) * 0.8 / max(
          1, n * len(panel.categories))
      few = annotate and inches_per_bar >= _LABEL_IN
      for j, bars in enumerate(series):
        values = [np.nan if v is None else v for v in bars.values]
        rects = ax.bar(x - 0.4 + width * (j + 0.5), values, width,
                       color=bars.color, hatch=bars.hatch,
                       edgecolor="white" if not bars.hatch else "#333333",
                       linewidth=0.5, label=bars.label)
        if few:
          _bar_labels(ax, rects, bars.values)
      if panel.reference is not None:
        ax.axhline(panel.reference, color="#333333", linestyle="--",
                   linewidth=1.2, label=panel.reference_label or "_reference")
      ax.set_xticks(x, panel.categories)
      ax.set_title(panel.title)
      ax.set_ylabel(panel.ylabel)
      if panel.xlabel:
        ax.set_xlabel(panel.xlabel)
      ax.grid(axis="x", visible=False)
      ax.margins(y=0.12)
      handles.extend(zip(*ax.get_legend_handles_labels()))
    _legend(fig, handles)
    return _png(fig)


def popularity_histograms(series: Sequence[Line], *, title: str,
                          xlabel: str, ylabel: str) -> bytes:
  """Step histograms of popularity (log-spaced bins, each series' share of
  its values per bin); a Line's `ys` are the values, `xs` unused."""
  with matplotlib.rc_context(_RC):
    fig, axes = _grid(1, 1, 4.2, title,
                      _legend_rows([s.label for s in series]))
    ax = axes[0]
    top = max((float(np.max(s.ys)) for s in series if len(s.ys)), default=1)
    bins = np.unique(np.geomspace(1, top + 2, 40).round())
    for s in series:
      values = np.asarray(s.ys, np.float64) + 1  # 0 (never seen) -> 1
      weights = np.full(len(values), 1.0 / max(len(values), 1))
      ax.hist(values, bins=bins, weights=weights, histtype="step",
              linewidth=2, color=s.color, linestyle=s.linestyle,
              label=s.label)
    ax.set_xscale("log")
    ax.set_title("distribution over recommended slots and held-out items")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _legend(fig, zip(*ax.get_legend_handles_labels()))
    return _png(fig)
