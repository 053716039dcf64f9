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
from survey_utils.figures.measured import ComparisonRow, Setting, comparison_rows, table_cells, table_notes
from survey_utils.methods import list_methods
from survey_utils.palette import NOT_APPLICABLE
from survey_utils.plotting import method_colour, nice_ceiling
from survey_utils.units import DTYPES, OPTIMIZERS, format_bytes
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
        self._rows: dict[Setting, list[ComparisonRow]] = {}
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
        colours = [method_colour(m) for m in self.methods]
        self.pct_bars = self.ax_pct.barh(y, np.ones(len(y)), color=colours)
        self.mem_bars = self.ax_mem.barh(y, np.zeros(len(y)), color=colours)
        self.pct_labels = [self.ax_pct.text(0, i, "", va="center", fontsize=7) for i in y]
        self.mem_labels = [self.ax_mem.text(0, i, "", va="center", fontsize=7) for i in y]
        self.mem_note = self.ax_mem.text(0.5, 0.5, "", transform=self.ax_mem.transAxes, ha="center", va="center",
                                         fontsize=9, color=NOT_APPLICABLE, wrap=True)
        self.ax_pct.set_yticks(y, self.methods, fontsize=8)
        self.ax_pct.invert_yaxis()
        self.ax_pct.set_xscale("log")
        self.ax_pct.set_xlabel("% trainable (of the base model's parameters)")
        self.ax_mem.set_xlabel("peak memory of a training step (GiB, memory model)")

    def compute(self, model: str, batch_size: int, seq_len: int, dtype: str, optimizer: str
                ) -> list[ComparisonRow]:
        setting = Setting(model, batch_size, seq_len, dtype, optimizer)
        if setting not in self._rows:  # every method's closed forms and estimate: a setting visited again is free
            if len(self._rows) >= 256:
                self._rows.pop(next(iter(self._rows)))
            self._rows[setting] = comparison_rows(setting, flops=self.flops)
        return self._rows[setting]

    def dynamic_artists(self) -> list:
        # the memory panel; the % trainable panel depends on the model alone and stays in the frame (frame_key)
        return [*self.mem_bars, *self.mem_labels, self.mem_note]

    def frame_key(self) -> tuple:
        return tuple((bar.get_width(), bar.get_alpha(), label.get_text(), label.get_position(), label.get_color())
                     for bar, label in zip(self.pct_bars, self.pct_labels, strict=True))

    def draw(self, view: list[ComparisonRow]) -> None:
        by_name = {r.method: r for r in view}
        pcts = [by_name[n].trainable_pct if n in by_name else None for n in self.methods]
        mems = [by_name[n].memory_bytes / 2**30 if n in by_name and by_name[n].memory_bytes else None
                for n in self.methods]
        shown_pct = [p for p in pcts if p] or [1.0]
        shown_mem = [m for m in mems if m] or [1.0]
        low_pct = min(shown_pct) / 4
        for i, name in enumerate(self.methods):
            row = by_name.get(name)
            reason = (row.error if row and row.error else "not computed") if not pcts[i] else ""
            self.pct_bars[i].set_width(pcts[i] or low_pct)
            self.pct_bars[i].set_alpha(1.0 if pcts[i] else 0.0)
            self.pct_labels[i].set_position((pcts[i] or low_pct, i))
            self.pct_labels[i].set_text(f" {pcts[i]:.3g}%" if pcts[i] else f" n/a: {reason[:60]}")
            self.pct_labels[i].set_color("#222222" if pcts[i] else NOT_APPLICABLE)
            self.mem_bars[i].set_width(mems[i] or 0.0)
            self.mem_labels[i].set_position((mems[i] or 0.0, i))
            if mems[i]:
                self.mem_labels[i].set_text(f" {format_bytes(row.memory_bytes)}")
            elif any(mems):
                why = row.error or row.memory_error if row else "not computed"
                self.mem_labels[i].set_text(f" n/a: {(why or 'no estimate')[:60]}")
            else:
                self.mem_labels[i].set_text("")
            self.mem_labels[i].set_color("#222222" if mems[i] else NOT_APPLICABLE)
        errors = {r.memory_error for r in view if not r.error and r.memory_error}
        first = next((r.memory_error for r in view if not r.error and r.memory_error), "no estimate")
        self.mem_note.set_text("" if any(mems) else "no method has a memory estimate here:\n" + first[:70]
                               + ("\n(and similar reasons; notes below the table)" if len(errors) > 1 else ""))
        self.ax_pct.set_xlim(low_pct / 2, max(shown_pct) * 6)
        # a step of the R10 series, not a jitter: the frame (axes, ticks) stays while the batch moves the bars
        self.ax_mem.set_xlim(0, nice_ceiling(max(shown_mem) * 1.45))

    def after_frame(self, view: list[ComparisonRow]) -> None:
        # ~40 rows and their notes: laid out by the browser after the panels' new pixels (base.py)
        self.table.value = _html_table(*table_cells(view), table_notes(view))


def _html_table(header: list[str], cells: list[list[str]], notes: list[str] = ()) -> str:
    head = "".join(f"<th style='padding:2px 6px'>{html.escape(h).replace(chr(10), '<br>')}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='padding:1px 6px'>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in cells)
    listed = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    foot = f"<div style='font-size:12px'><b>Notes</b> (why a cell is n/a or noisy)<ul>{listed}</ul></div>" if notes else ""
    return f"<table style='font-size:12px;border-collapse:collapse'><tr>{head}</tr>{body}</table>{foot}"


FIGURES_DIR = Path(__file__).resolve().parents[2] / "figures"


def figure_file(name: str, figures_dir: Path = FIGURES_DIR) -> Path:
    """The figure's PNG: from ``figures/`` when it was generated, else made now in a temporary folder."""
    path = figures_dir / f"{FIGURES[name].file_stem}.png"
    if path.is_file():
        return path
    out = Path(tempfile.mkdtemp(prefix="survey-figures-"))
    return next(p for p in run_figure(name, out) if p.suffix == ".png")


def side_by_side(name: str, width: str = "100%") -> W.VBox:
    """Our figure at full width, and below it the survey figure it corresponds to and what ours shows.

    (The name stays for the chapters that call it; the figure used to sit beside a text column, too narrow
    to read its labels.)
    """
    spec = FIGURES[name]
    text = (f"<b>{html.escape(spec.title)}</b><br><b>Survey counterpart:</b> "
            f"{html.escape(spec.survey_counterpart)}<br><b>Ours shows:</b> {html.escape(spec.shows)}<br>"
            f"<b>Data:</b> {html.escape(spec.source)}. Files: <code>figures/{spec.file_stem}.png</code>, "
            f"<code>.svg</code> (open the SVG to zoom)")
    try:
        figure_widget: W.Widget = W.Image(value=figure_file(name).read_bytes(), format="png",
                                          layout=W.Layout(width=width, max_width="100%", height="auto"))
    except FigureUnavailable as error:
        figure_widget = W.HTML(f'<span style="color:#b00020">&#9888; figure not made: {html.escape(str(error))}</span>')
    return W.VBox([figure_widget, W.HTML(text, layout=W.Layout(width="100%", padding="4px 0 12px 0"))])
