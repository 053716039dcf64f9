"""Chapter 07's widget: choose the reference model and setting of Lialin et al.'s measured comparison.

Controls: model, batch size, sequence length, dtype, optimizer. Two live panels (% trainable and peak
training memory of every registered method, bars updated in place) and the full measured table below them.
Extra FLOPs come from ``data/inference_overhead.csv`` where the benchmark measured them (fast), measured
live otherwise; see :func:`survey_utils.figures.measured.comparison_rows`.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from survey_utils.errors import SurveyError
from survey_utils.figures.base import FIGURES, FigureUnavailable, run_figure
from survey_utils.figures.measured import ComparisonRow, Setting, comparison_rows, table_cells
from survey_utils.methods import list_methods
from survey_utils.plotting import FAMILY_COLOURS
from survey_utils.units import DTYPES, OPTIMIZERS
from survey_utils.widgets.base import Explorer
from survey_utils.zoo import list_models

_STYLE = {"description_width": "initial"}


class ComparisonExplorer(Explorer):
    """Reference model and setting -> measured comparison panels and table.

    >>> explorer = ComparisonExplorer()              # doctest: +SKIP
    >>> explorer.controls["model"].value = "llama-2-7b"   # panels and table redraw
    """

    def __init__(self, model: str = "roberta-base", batch_size: int = 8, seq_len: int = 128,
                 dtype: str = "bf16", optimizer: str = "adamw", flops: str = "csv") -> None:
        self.methods = [m.name for m in list_methods()]
        self.flops = flops
        self.table = W.HTML()
        models = [m for m in list_models() if not m.startswith("tiny")]
        if model not in models:
            raise SurveyError(f"model '{model}' is not one of {', '.join(models)}")
        controls = {
            "model": W.Dropdown(options=models, value=model, description="reference model", style=_STYLE),
            "batch_size": W.IntSlider(value=batch_size, min=1, max=64, description="batch",
                                      continuous_update=False, style=_STYLE),
            "seq_len": W.Dropdown(options=[128, 256, 512, 1024, 2048, 4096], value=seq_len,
                                  description="sequence length", style=_STYLE),
            "dtype": W.Dropdown(options=list(DTYPES), value=dtype, description="dtype", style=_STYLE),
            "optimizer": W.Dropdown(options=list(OPTIMIZERS), value=optimizer,
                                    description="optimizer", style=_STYLE),
        }
        super().__init__(controls, figsize=(10, 0.22 * len(self.methods) + 1.4),
                         title="Lialin et al.'s comparison, measured: choose the reference setting")
        self.widget.children = (*self.widget.children, self.table)

    def setup(self, fig: Figure) -> None:
        self.ax_pct, self.ax_mem = fig.subplots(1, 2, sharey=True)
        y = np.arange(len(self.methods))
        from survey_utils.methods import get_method

        colours = [FAMILY_COLOURS.get(get_method(m).family, "#333333") for m in self.methods]
        self.pct_bars = self.ax_pct.barh(y, np.ones(len(y)), color=colours)
        self.mem_bars = self.ax_mem.barh(y, np.zeros(len(y)), color=colours)
        self.ax_pct.set_yticks(y, self.methods, fontsize=8)
        self.ax_pct.invert_yaxis()
        self.ax_pct.set_xscale("log")
        self.ax_pct.set_xlabel("% trainable (of the base model)")
        self.ax_mem.set_xlabel("peak memory of a training step (GiB, memory model)")

    def compute(self, model: str, batch_size: int, seq_len: int, dtype: str, optimizer: str
                ) -> list[ComparisonRow]:
        return comparison_rows(Setting(model, batch_size, seq_len, dtype, optimizer), flops=self.flops)

    def draw(self, view: list[ComparisonRow]) -> None:
        by_name = {r.method: r for r in view}
        pcts, mems = [], []
        for bar_p, bar_m, name in zip(self.pct_bars, self.mem_bars, self.methods, strict=True):
            row = by_name.get(name)
            pct = row.trainable_pct if row and row.trainable_pct else None
            mem = row.memory_bytes / 2**30 if row and row.memory_bytes else 0.0
            bar_p.set_width(pct or 1e-9)
            bar_m.set_width(mem)
            pcts.append(pct)
            mems.append(mem)
        shown = [p for p in pcts if p]
        if shown:
            self.ax_pct.set_xlim(min(shown) / 2, max(shown) * 2)
        self.ax_mem.set_xlim(0, max(mems + [1e-3]) * 1.1)
        self.table.value = _html_table(*table_cells(view))


def _html_table(header: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th style='padding:2px 6px'>{html.escape(h).replace(chr(10), '<br>')}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:1px 6px'>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in cells)
    return f"<table style='font-size:12px;border-collapse:collapse'><tr>{head}</tr>{body}</table>"


FIGURES_DIR = Path(__file__).resolve().parents[2] / "figures"


def figure_file(name: str, figures_dir: Path = FIGURES_DIR) -> Path:
    """The figure's PNG: from ``figures/`` when it was generated, else made now in a temporary folder."""
    path = figures_dir / f"{FIGURES[name].file_stem}.png"
    if path.is_file():
        return path
    out = Path(tempfile.mkdtemp(prefix="survey-figures-"))
    return next(p for p in run_figure(name, out) if p.suffix == ".png")


def side_by_side(name: str, width: str = "72%") -> W.HBox:
    """The survey figure it corresponds to and what ours shows (left), our figure (right)."""
    spec = FIGURES[name]
    text = (f"<b>{html.escape(spec.title)}</b><br><br><b>Survey counterpart:</b> "
            f"{html.escape(spec.survey_counterpart)}<br><br><b>Ours shows:</b> {html.escape(spec.shows)}<br><br>"
            f"<b>Data:</b> {html.escape(spec.source)}<br><br><code>figures/{spec.file_stem}.png</code>, "
            f"<code>.svg</code>")
    left = W.HTML(text, layout=W.Layout(width="26%", padding="0 12px 0 0"))
    try:
        right: W.Widget = W.Image(value=figure_file(name).read_bytes(), format="png", layout=W.Layout(width=width))
    except FigureUnavailable as error:
        right = W.HTML(f'<span style="color:#b00020">&#9888; figure not made: {html.escape(str(error))}</span>')
    return W.HBox([left, right], layout=W.Layout(align_items="flex-start"))
