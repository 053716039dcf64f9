"""Chapter 09's widgets: the lab's results explorer and a live run a reader starts with a button.

- :class:`LabExplorer` (section "The trade-off"): task, model size and the methods shown; left, test accuracy
  against % trainable at that size (one dot per method, coloured by family); right, test accuracy against
  model size for the shown methods. Every value is read from ``data/lab/runs.csv`` (the grid phase).
- :class:`LiveRun` (section "Watch one method train"): a method, a task and a number of steps; the button
  fine-tunes the smallest lab model (pretrained once and cached) with the lab's loop, a progress bar showing
  the steps, then plots the training loss and prints the test accuracy. Bad settings are one line.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy

from survey_utils.errors import SurveyError
from survey_utils.experiments.ch09_lab import LabResults, chance, chapter_colors, check_choice
from survey_utils.lab.models import PRETRAINING, Pretraining
from survey_utils.lab.tasks import LABEL_TOKENS, TASKS
from survey_utils.plotting import human, nice_log_bounds
from survey_utils.widgets.base import TITLE_Y, Explorer

_STYLE = {"description_width": "initial"}


@dataclass
class LabView:
    task: str
    size: str
    methods: tuple[str, ...]
    points: list[tuple[str, str, float, float]]  # method, chapter, % trainable, accuracy
    scale: dict[str, list[tuple[int, float]]]  # method -> (parameters, accuracy) per size
    missing: list[str]  # shown methods with no run at this size, each with its reason


class LabExplorer(Explorer):
    """Accuracy against % trainable and against model size, from the lab's committed runs."""

    relayout_on = ()

    def __init__(self, results: LabResults, task: str = "sentiment", size: str | None = None,
                 methods: tuple[str, ...] | None = None, title: str = "The lab: what the parameters buy") -> None:
        self.results = results
        ran = list(dict.fromkeys(r["method"] for r in results.grid()))
        self.colors = chapter_colors(results)
        self.parameters = {r["size"]: int(r["parameters"]) for r in results.pretraining}
        controls = {
            "task": W.Dropdown(options=list(TASKS), value=task, description="task", style=_STYLE),
            "size": W.SelectionSlider(options=results.sizes, value=size or results.sizes[-1],
                                      description="model size", continuous_update=False, style=_STYLE),
            "methods": W.SelectMultiple(options=ran, value=tuple(methods or ran), rows=6,
                                        description="methods shown", style=_STYLE),
        }
        super().__init__(controls, figsize=(11, 4), title=title)

    def setup(self, fig: Figure) -> None:
        self.ax_tradeoff, self.ax_scale = fig.subplots(1, 2, width_ratios=(1.4, 1))
        ax = self.ax_tradeoff
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("trainable parameters (% of the model)")
        self.chance_line = ax.axhline(0.5, color="0.4", ls="--", lw=1)
        # One collection for every shown method's dot (coloured by its chapter) and a pool of name labels, moved in
        # place: a move of the size slider redraws them over the kept frame (base.py). The legend (the chapters
        # of the shown methods at any size, and chance) depends on the task and the methods, not on the size:
        # it sits in the frame, below the axes.
        self.dots = ax.scatter(np.empty(0), np.empty(0), s=26)
        self._name_offset = offset_copy(ax.transData, fig=ax.figure, x=3, y=2, units="points")
        self.names: list[Any] = []
        self.legend: Any = None
        self._scale_key: tuple | None = None

    def compute(self, task: str, size: str, methods: tuple[str, ...]) -> LabView:
        check_choice(task, TASKS, "task")
        check_choice(size, self.results.sizes, "size")
        if not methods:
            raise SurveyError("no method selected: pick at least one in 'methods shown'")
        task_rows = self.results.grid(task=task)  # one pass over the runs: a move answers in a few ms
        rows = {r["method"]: r for r in task_rows if r["size"] == size}
        points = [(m, rows[m]["chapter"], float(rows[m]["trainable_pct"]), float(rows[m]["test_accuracy"]))
                  for m in methods if m in rows]
        reasons = {r["method"]: r["status"] for r in self.results.runs if r["size"] == size and r["task"] == task
                   and r["status"] != "ok"}
        missing = [f"{m} ({reasons.get(m, 'not in the grid at this size')})" for m in methods if m not in rows]
        accuracy = {(r["method"], r["size"]): float(r["test_accuracy"]) for r in task_rows}
        scale = {m: [(self.parameters[s], accuracy[m, s]) for s in self.results.sizes if (m, s) in accuracy]
                 for m in methods}
        return LabView(task, size, tuple(methods), points, scale, missing)

    def draw(self, view: LabView) -> None:
        ax = self.ax_tradeoff
        self.dots.set_offsets(np.array([(p[2], p[3]) for p in view.points]).reshape(-1, 2))
        self.dots.set_facecolor([self.colors[chapter] for _, chapter, _, _ in view.points])
        while len(self.names) < len(view.points):
            self.names.append(ax.text(0, 0, "", fontsize=6, transform=self._name_offset))
        for i, text in enumerate(self.names):
            shown = i < len(view.points)
            text.set_visible(shown)
            if shown:
                method, _, pct, accuracy = view.points[i]
                text.set_text(method)
                text.set_position((pct, accuracy))
        # The x axis covers the shown methods at every size (whole half decades): moving the size slider keeps
        # the frame (axes, ticks, legend) and redraws only the dots, their names and the title (base.py).
        task_rows = [r for r in self.results.grid(task=view.task) if r["method"] in view.methods]
        every = [float(r["trainable_pct"]) for r in task_rows]
        every = [p for p in every if p > 0] or [p[2] for p in view.points if p[2] > 0] or [1.0]
        ax.set_xlim(*nice_log_bounds(min(every) / 1.5, max(every) * 3, per_decade=2))
        ax.set_ylabel(f"{view.task}: test accuracy")
        note = f"; not shown: {', '.join(view.missing)}" if view.missing else ""
        ax.set_title(f"{view.size}, {view.task} (data/lab/runs.csv){note}"[:160], fontsize=8, y=TITLE_Y)
        if self._scale_key != self.frame_key():  # the legend and the right panel do not depend on the size
            self._draw_legend(view, list(dict.fromkeys(r["chapter"] for r in task_rows)))
            self._draw_scale(view)

    def _draw_legend(self, view: LabView, chapters: list[str]) -> None:
        self.chance_line.set_ydata([chance(view.task)] * 2)
        handles = [Line2D([], [], marker="o", ls="", ms=5, color=self.colors[c]) for c in chapters]
        if self.legend is not None:
            self.legend.remove()
        self.legend = self.ax_tradeoff.legend(
            [*handles, self.chance_line], [*(c.replace("_", " ") for c in chapters),
                                           f"chance (1 in {len(LABEL_TOKENS[view.task])})"],
            fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=4, frameon=False)
        self._needs_layout = True  # the legend's rows follow the chapters shown: lay the figure out again

    def _draw_scale(self, view: LabView) -> None:
        ax = self.ax_scale
        ax.cla()
        for method, points in view.scale.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", lw=1.2, ms=3, label=method)
        ax.axhline(chance(view.task), color="0.4", ls="--", lw=1)
        ax.set_xscale("log")
        # one tick per lab size, named: the sizes span about one decade, where a log axis would label its minor
        # ticks (2x10^5, 3x10^5, ...) on top of each other
        ax.set_xticks([self.parameters[s] for s in self.results.sizes],
                      [f"{s}\n{human(self.parameters[s])}" for s in self.results.sizes])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("model parameters")
        ax.set_ylabel("test accuracy")
        ax.set_title("the shown methods across sizes", fontsize=8)
        if len(view.scale) <= 8:  # below the axes, as the left panel's: a legend never covers a line
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.33), ncols=4, frameon=False)
        self._scale_key = self.frame_key()

    def dynamic_artists(self) -> list[Any]:
        return [self.dots, *self.names, self.ax_tradeoff.title]

    def frame_key(self) -> tuple:
        # the chance line and the right panel's lines follow the task and the methods shown, not the size
        return (self.view.task, self.view.methods) if self.view is not None else ()


class LiveRun:
    """A button that fine-tunes one method on the smallest lab model for a few seconds, with a progress bar."""

    def __init__(self, methods: list[str], method: str = "lora", task: str = "sentiment", steps: int = 40,
                 size: str = "lab-s", pretraining: Pretraining = PRETRAINING) -> None:
        import matplotlib.pyplot as plt

        self.size = size
        self.pretraining = pretraining
        self.method = W.Dropdown(options=methods, value=method, description="method", style=_STYLE)
        self.task = W.Dropdown(options=list(TASKS), value=task, description="task", style=_STYLE)
        self.steps = W.IntSlider(value=steps, min=1, max=200, description="steps", style=_STYLE)
        self.lr = W.Dropdown(options=[3e-4, 3e-3, 3e-2], value=3e-3, description="learning rate", style=_STYLE)
        self.button = W.Button(description="train", button_style="primary", icon="play")
        self.message = W.HTML(value="")
        self.progress = W.Output()
        with plt.ioff():
            self.fig = plt.figure(figsize=(5, 2.6), layout="constrained")
        self.ax = self.fig.add_subplot()
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("training loss (nats)")
        self.plot = W.Output()
        self.curve: list[tuple[int, float]] = []
        self.result: Any = None
        self.button.on_click(lambda _: self.run())
        self.widget = W.VBox([W.HBox([self.method, self.task]), W.HBox([self.steps, self.lr, self.button]),
                              self.message, self.progress, self.plot])

    def run(self) -> None:
        """Train with the current settings; errors are one line in the message, the last plot stays."""
        from survey_utils.lab.grid import Cell, run_cell
        from survey_utils.lab.loop import Budget

        self.button.disabled = True
        self.message.value = f"training {self.method.value} on {self.task.value} ({self.size})..."
        try:
            budget = Budget(steps=int(self.steps.value), curve_every=1)
            with self.progress:
                self.progress.clear_output()
                result = run_cell(Cell(self.size, self.method.value, self.task.value, float(self.lr.value)),
                                  budget, self.pretraining, progress=True)
        except SurveyError as error:
            self.message.value = f'<span style="color:#b00020">&#9888; {html.escape(str(error))}</span>'
            return
        finally:
            self.button.disabled = False
        if result.row["status"] != "ok":
            self.message.value = html.escape(f"{self.method.value}: {result.row['status']}")
            return
        self.result = result
        self.curve = result.curve
        self.ax.cla()
        self.ax.plot([c[0] for c in self.curve], [c[1] for c in self.curve])
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("training loss (nats)")
        row = result.row
        self.ax.set_title(f"{row['method']}, {row['task']}: test accuracy {float(row['test_accuracy']):.3f} "
                          f"(chance {chance(row['task']):.2f})", fontsize=8)
        self.message.value = html.escape(
            f"{row['method']} trained {row['trainable']} parameters ({row['trainable_pct']}%) for "
            f"{self.steps.value} steps: test accuracy {row['test_accuracy']}, pretraining loss change "
            f"{row['forgetting_nats']} nats")
        from IPython.display import display

        with self.plot:
            self.plot.clear_output(wait=True)
            display(self.fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
