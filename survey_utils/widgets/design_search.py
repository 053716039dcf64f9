"""The design-search explorer of chapter 05 ("A budgeted design search"): model and two budgets -> the front.

Left: every feasible candidate of :mod:`survey_utils.experiments.ch05_hybrid` (grey), its Pareto front
(coloured by inference overhead) and the named configurations (LoRA, MAM, UniPELT, Compacter++, scaled
parallel, S4) at their defaults, in trainable parameters against the peak memory of one training step. Right:
the chosen front point's trainable parameters by part. The budgets are a % of the model's parameters and a
multiple of the smallest candidate's peak, so the same sliders fit every model; a budget below every
candidate is a one-line message and the plot keeps its last front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import ipywidgets as W
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from survey_utils.architecture import total_params
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch05_hybrid import Candidate, DesignSpace, SearchResult, pareto_front, search
from survey_utils.plotting import human, nice_log_bounds
from survey_utils.units import format_bytes
from survey_utils.widgets.base import TITLE_Y, Explorer

GIB = 2**30
FRONT_CMAP = "viridis"
"""The Pareto front's colours: its points' inference overhead."""
POINTS: dict[str, dict[str, Any]] = {
    "feasible": {"s": 6, "marker": "o", "facecolors": "0.8", "edgecolors": "0.8"},
    "Pareto front": {"s": 18, "marker": "o"},  # coloured by FRONT_CMAP
    "named (defaults)": {"s": 70, "marker": "*", "facecolors": "#d62728", "edgecolors": "#d62728"},
    "chosen": {"s": 140, "marker": "o", "facecolors": "none", "edgecolors": "black"},
}
"""Each kind of point's size (points^2), marker and colours: the scatter and its legend handle read the same."""
PARTS_XLABEL = "trainable parameters of the\nchosen point, by part"
"""On two lines: on one it ran past the figure's right edge (the panel is a third of the figure wide)."""


@dataclass
class SearchView:
    result: SearchResult
    chosen: Candidate
    by_part: list[tuple[str, int]]
    trainable_budget: int
    memory_budget: int
    smallest_peak: int  # of the whole design space


class DesignSearchExplorer(Explorer):
    """Controls: ``model``, ``trainable`` (% of the model's parameters), ``memory`` (x the smallest peak),
    ``point`` (which front point to break down, 0 = fewest trainable parameters)."""

    relayout_on = ("model",)

    def __init__(self, models: list[str], model: str | None = None, batch_size: int = 8, seq_len: int = 128) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len
        self._spaces: dict[str, DesignSpace] = {}
        self._everything: dict[str, SearchResult] = {}
        controls = {
            "model": W.Dropdown(options=models, value=model or models[0], description="model"),
            "trainable": W.FloatLogSlider(value=1.0, base=10, min=-3, max=1, step=0.05, continuous_update=False,
                                          description="params %", readout_format=".3g"),
            "memory": W.FloatSlider(value=1.3, min=1.0, max=2.0, step=0.02, continuous_update=False,
                                    description="memory x"),
            "point": W.IntSlider(value=0, min=0, max=200, continuous_update=False, description="front point"),
        }
        super().__init__(controls, figsize=(10, 4.2), title="Budgeted design search (closed forms only)")

    def space(self, model: str) -> DesignSpace:
        if model not in self._spaces:
            self._spaces[model] = DesignSpace(model, self.batch_size, self.seq_len)
        return self._spaces[model]

    def everything(self, model: str) -> SearchResult:
        """Every candidate of the model's design space, scored once (unbounded budgets); a budget filters it."""
        if model not in self._everything:
            space = self.space(model)
            self._everything[model] = search(space.config, 10**15, 2**62, space=space)
        return self._everything[model]

    def setup(self, fig: Figure) -> None:
        self.ax, self.ax_parts = fig.subplots(1, 2, width_ratios=(2, 1))
        self.all_points = self.ax.scatter([], [], label="feasible", **POINTS["feasible"])
        self.front_points = self.ax.scatter([], [], c=[], cmap=FRONT_CMAP, label="Pareto front",
                                            **POINTS["Pareto front"])
        self.named_points = self.ax.scatter([], [], label="named (defaults)", **POINTS["named (defaults)"])
        self.chosen_point = self.ax.scatter([], [], label="chosen", **POINTS["chosen"])
        self.named_labels: list[Any] = []
        self.ax.set_xscale("log")
        self.ax.set_xlabel("trainable parameters")
        self.ax.set_ylabel("peak memory of one training step (GiB)")
        # Below the figure, under the left panel: inside the axes (lower right) it covered candidates; "outside"
        # makes the layout keep room for it under the axis labels. Its handles are markers of their own: the
        # front's collection starts empty, and a handle taken from it had no colour (an invisible dot).
        front = colormaps[FRONT_CMAP](0.5)  # the middle of the front's overhead colours
        handles = [Line2D([], [], linestyle="", marker=style["marker"], markersize=math.sqrt(style["s"]),
                          markerfacecolor=style.get("facecolors", front),
                          markeredgecolor=style.get("edgecolors", front), label=label)
                   for label, style in POINTS.items()]
        self.legend = fig.legend(handles=handles, fontsize=7, loc="outside lower left", ncols=4, frameon=False)
        self.ax_parts.set_xlabel(PARTS_XLABEL)
        self._parts_key: tuple | None = None

    def compute(self, model: str, trainable: float, memory: float, point: int) -> SearchView:
        for name, value in (("trainable", trainable), ("memory", memory), ("point", point)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SurveyError(f"{name}={value!r} is not a finite number")
        space = self.space(model)
        everything = self.everything(model)  # scored once per model: a budget's move filters it (~10x cheaper)
        smallest_peak = min(c.peak for c in everything.feasible)
        trainable_budget = int(total_params(space.config) * trainable / 100)
        memory_budget = int(smallest_peak * memory)
        feasible = [c for c in everything.feasible if c.trainable <= trainable_budget and c.peak <= memory_budget]
        if not feasible:  # search's own one-line error for these budgets
            search(space.config, trainable_budget, memory_budget, space=space)
        result = replace(everything, feasible=feasible, front=pareto_front(feasible))
        chosen = result.front[min(max(int(point), 0), len(result.front) - 1)]
        by_part = [(p.label, space.atom(p.method, **p.settings).trainable) for p in chosen.parts]
        return SearchView(result, chosen, by_part, trainable_budget, memory_budget, smallest_peak)

    def draw(self, view: SearchView) -> None:
        result = view.result
        self.all_points.set_offsets([(c.trainable, c.peak / GIB) for c in result.feasible])
        self.front_points.set_offsets([(c.trainable, c.peak / GIB) for c in result.front])
        self.front_points.set_array([c.overhead for c in result.front])
        self.front_points.set_clim(0, max([c.overhead for c in result.front] + [1e-9]))
        shown = [c for c in result.named if c.trainable <= view.trainable_budget and c.peak <= view.memory_budget]
        self.named_points.set_offsets([(c.trainable, c.peak / GIB) for c in shown] or [(float("nan"),) * 2])
        for text in self.named_labels:
            text.remove()
        self.named_labels = [self.ax.annotate(c.label.split(" (")[0], (c.trainable, c.peak / GIB), fontsize=7,
                                              xytext=(3, 3), textcoords="offset points") for c in shown]
        self.chosen_point.set_offsets([(view.chosen.trainable, view.chosen.peak / GIB)])
        xs = [c.trainable for c in [*result.feasible, *shown]]
        # Limits in steps, not a jitter, so the frame (axes, ticks, legend) stays while a budget moves a little
        # (widgets/base.py): x in half decades; y from the smallest peak of the whole space (and of the named
        # configurations) to the memory budget: every feasible candidate and every shown star lies between them.
        self.ax.set_xlim(*nice_log_bounds(min(xs) / 1.5, max(xs) * 1.5, per_decade=2))
        low = min([view.smallest_peak, *(c.peak for c in result.named)]) / GIB
        high = view.memory_budget / GIB
        pad = (high - low) * 0.05 or 0.01
        self.ax.set_ylim(low - pad, high + pad)
        self.ax.set_title(f"{result.model}: {len(result.feasible)} of {result.evaluated} candidates fit "
                          f"{human(view.trainable_budget)} params and {format_bytes(view.memory_budget)}; "
                          f"front of {len(result.front)}", fontsize=9, y=TITLE_Y)
        if self._parts_key != self.frame_key():  # the panel is cleared and rebuilt only for a new chosen point
            self._draw_parts(view)

    def _draw_parts(self, view: SearchView) -> None:
        self.ax_parts.clear()
        labels = [label for label, _ in view.by_part]
        self.ax_parts.barh(range(len(labels)), [n for _, n in view.by_part], color="#1f77b4")
        self.ax_parts.set_yticks(range(len(labels)), labels, fontsize=8)
        self.ax_parts.set_xlabel(PARTS_XLABEL)
        self.ax_parts.set_title(f"{view.chosen.label}\n{format_bytes(view.chosen.peak)} peak, "
                                f"+{view.chosen.overhead:.2f}% inference FLOPs", fontsize=8)
        self._parts_key = self.frame_key()

    def dynamic_artists(self) -> list[Any]:
        # the legend is outside the axes, in the frame: it shows each kind of point, not the points themselves
        return [self.all_points, self.front_points, self.named_points, self.chosen_point, *self.named_labels,
                self.ax.title]

    def frame_key(self) -> tuple:
        # the right panel (the chosen point's parts) is in the frame: its bars' widths are not in frame_state
        if self.view is None:
            return ()
        chosen = self.view.chosen
        return (tuple(self.view.by_part), chosen.label, chosen.peak, chosen.overhead)
