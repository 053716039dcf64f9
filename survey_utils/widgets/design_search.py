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
from matplotlib.figure import Figure

from survey_utils.architecture import total_params
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch05_hybrid import Candidate, DesignSpace, SearchResult, pareto_front, search
from survey_utils.plotting import human, nice_log_bounds
from survey_utils.units import format_bytes
from survey_utils.widgets.base import TITLE_Y, Explorer

GIB = 2**30


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
        self.all_points = self.ax.scatter([], [], s=6, color="0.8", label="feasible")
        self.front_points = self.ax.scatter([], [], s=18, c=[], cmap="viridis", label="Pareto front")
        self.named_points = self.ax.scatter([], [], s=70, marker="*", color="#d62728", label="named (defaults)")
        self.chosen_point = self.ax.scatter([], [], s=140, facecolors="none", edgecolors="black", label="chosen")
        self.named_labels: list[Any] = []
        self.ax.set_xscale("log")
        self.ax.set_xlabel("trainable parameters")
        self.ax.set_ylabel("peak memory of one training step (GiB)")
        self.legend = self.ax.legend(fontsize=7, loc="lower right")
        self.ax_parts.set_xlabel("trainable parameters of the chosen point, by part")
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
        self.ax_parts.set_xlabel("trainable parameters of the chosen point, by part")
        self.ax_parts.set_title(f"{view.chosen.label}\n{format_bytes(view.chosen.peak)} peak, "
                                f"+{view.chosen.overhead:.2f}% inference FLOPs", fontsize=8)
        self._parts_key = self.frame_key()

    def dynamic_artists(self) -> list[Any]:
        # the legend sits over the data area: drawn after the points, as a full render does
        return [self.all_points, self.front_points, self.named_points, self.chosen_point, *self.named_labels,
                self.ax.title, self.legend]

    def frame_key(self) -> tuple:
        # the right panel (the chosen point's parts) is in the frame: its bars' widths are not in frame_state
        if self.view is None:
            return ()
        chosen = self.view.chosen
        return (tuple(self.view.by_part), chosen.label, chosen.peak, chosen.overhead)
