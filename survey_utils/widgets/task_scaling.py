"""What each added task costs: the task-scaling explorer of chapter 08 (section "What one more task costs").

Controls: model, a multi-task method (every registered method with a :attr:`Method.tasks_hp`), the number of
tasks :math:`T` (or fused source modules), the skills / experts per layer (methods with ``n_skills`` or
``num_experts``) and the rank (``r``, or MPT's ``num_ranks``). Three panels, each beside a *reference*: one copy of
the single-task method ``reference`` (default ``lora``) per task, at the same rank where it has one:

- parameters added for all :math:`T` tasks against :math:`T` (closed forms, :meth:`Method.added_params`: what
  trains plus what a method adds frozen, such as AdapterFusion's task adapters; the dot is your :math:`T`);
- stored bytes per task (bf16), added / :math:`T`, against :math:`T`: shared modules amortise, per-task copies
  do not;
- peak memory of one training step (chapter 00's memory model, batch 1, 256 tokens, bf16, AdamW): the method
  with all :math:`T` tasks in one model against one reference (one task at a time).

Bad settings (more skills than the slider's bound, splits that do not divide a width, a method that does not fit
the model) show one line; the plot keeps its last valid state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import estimate
from survey_utils.methods import get_method, list_methods
from survey_utils.methods.registry import Method
from survey_utils.plotting import human, nice_ceiling, nice_log_bounds
from survey_utils.units import DTYPE_BYTES
from survey_utils.widgets.base import TITLE_Y, Explorer
from survey_utils.zoo import list_models, load_config

_STYLE = {"description_width": "initial"}
RANK_HPS = ("r", "num_ranks")  # the rank slider drives whichever of these the method has
SKILL_HPS = ("n_skills", "num_experts")  # the skills / experts slider drives whichever of these the method has
STORE_DTYPE = "bf16"
MEMORY = {"batch_size": 1, "seq_len": 256}


def multi_task_methods() -> list[str]:
    return [m.name for m in list_methods() if m.tasks_hp is not None]


def has_skills(method: Method) -> bool:
    return any(h.name in SKILL_HPS for h in method.hyperparams)


def reference_settings(method: Method, rank: int) -> dict[str, Any]:
    """The reference's hyper-parameters: the rank where it has one, its defaults otherwise."""
    return {name: rank for name in RANK_HPS if name in {h.name for h in method.hyperparams}}


def skill_bound(methods: list[str]) -> int:
    """The skills / experts slider's bound: the largest any method's skill hyper-parameter allows."""
    bounds = [int(h.maximum) for m in methods for h in get_method(m).hyperparams
              if h.name in SKILL_HPS and h.maximum is not None]
    return max(bounds, default=64)


def settings_for(method: Method, tasks: int, skills: int, rank: int) -> dict[str, Any]:
    """The method's hyper-parameters for these controls (only those it has)."""
    names = {h.name for h in method.hyperparams}
    hp: dict[str, Any] = {method.tasks_hp: tasks}
    hp.update({name: skills for name in SKILL_HPS if name in names})
    hp.update({name: rank for name in RANK_HPS if name in names})
    return hp


@dataclass
class ScalingView:
    model: str
    method: str
    tasks: int
    grid: list[int]
    hp: dict[str, Any]
    method_total: list[float] = field(default_factory=list)
    reference_total: list[float] = field(default_factory=list)
    method_bytes_per_task: list[float] = field(default_factory=list)
    reference_bytes_per_task: list[float] = field(default_factory=list)
    peak_gib: dict[str, float] = field(default_factory=dict)


class TaskScalingExplorer(Explorer):
    """Trainable parameters, stored bytes per task and peak memory of a multi-task method as tasks are added."""

    def __init__(self, model: str = "llama-2-7b", method: str | None = None, max_tasks: int = 64,
                 reference: str = "lora", title: str = "Multi-task methods: the cost of one more task") -> None:
        self.methods = multi_task_methods()
        self.max_tasks = max_tasks
        self.reference = get_method(reference)
        if self.reference.tasks_hp is not None:
            raise SurveyError(f"reference={reference!r} is a multi-task method: the reference is one single-task "
                              "module per task")
        first = get_method(method or self.methods[0]).name
        controls = {
            "model": W.Dropdown(options=list_models(), value=model, description="model", style=_STYLE),
            "method": W.Dropdown(options=self.methods, value=first, description="method", style=_STYLE),
            "tasks": W.IntSlider(value=8, min=1, max=max_tasks, description="tasks T", continuous_update=False,
                                 style=_STYLE),
            "skills": W.IntSlider(value=4, min=1, max=skill_bound(self.methods),
                                  description="skills / experts", continuous_update=False, style=_STYLE),
            "rank": W.IntSlider(value=8, min=1, max=64, description="rank", continuous_update=False, style=_STYLE),
        }
        super().__init__(controls, figsize=(11, 3.6), title=title)

    def setup(self, fig: Figure) -> None:
        self.ax_total, self.ax_bytes, self.ax_peak = fig.subplots(1, 3, width_ratios=(1.2, 1.2, 0.8))
        self.lines = {
            "method total": self.ax_total.plot([], [], "-", lw=1.8, label="method")[0],
            "reference total": self.ax_total.plot([], [], "--", lw=1.5, color="0.4",
                                                  label=f"one {self.reference.name} per task")[0],
            "method bytes": self.ax_bytes.plot([], [], "-", lw=1.8, label="method")[0],
            "reference bytes": self.ax_bytes.plot([], [], "--", lw=1.5, color="0.4",
                                                  label=f"one {self.reference.name} per task")[0],
        }
        self.markers = {
            "method total": self.ax_total.plot([], [], "o", color="k", ms=5, label="your T")[0],
            "method bytes": self.ax_bytes.plot([], [], "o", color="k", ms=5)[0],
        }
        self.peak_bars = self.ax_peak.bar([0, 1], [0, 0], color=["C0", "0.6"])
        self.ax_peak.set_xticks([0, 1], ["method, T tasks", f"one {self.reference.name}"])
        for ax, label in ((self.ax_total, "added parameters, all T tasks"),
                          (self.ax_bytes, f"stored bytes per task ({STORE_DTYPE})")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tasks T")
            ax.set_ylabel(label)
        self.ax_peak.set_ylabel("peak memory of a training step (GiB)")
        self.legend = self.ax_total.legend(fontsize=7, loc="upper left")

    def compute(self, model: str, method: str, tasks: int, skills: int, rank: int) -> ScalingView:
        for name, value, top in (("tasks", tasks, self.max_tasks), ("skills", skills, self.controls["skills"].max),
                                 ("rank", rank, self.controls["rank"].max)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SurveyError(f"{name}={value!r} must be a positive integer")
            if value > top:
                raise SurveyError(f"{name}={value} is above the explorer's bound {top}")
        config = load_config(model)
        chosen, reference = get_method(method), self.reference
        hp = chosen.resolve(config, **settings_for(chosen, tasks, skills, rank))
        reference_hp = reference.resolve(config, **reference_settings(reference, rank))
        per_reference = reference.added_params(config, **reference_hp)
        grid = sorted({int(round(v)) for v in np.geomspace(1, self.max_tasks, 13)} | {tasks})
        view = ScalingView(model, chosen.name, tasks, grid, hp)
        size = DTYPE_BYTES[STORE_DTYPE]
        for t in grid:
            total = chosen.added_params(config, **chosen.resolve(config, **{**hp, chosen.tasks_hp: t}))
            view.method_total.append(float(total))
            view.reference_total.append(float(t * per_reference))
            view.method_bytes_per_task.append(size * total / t)
            view.reference_bytes_per_task.append(float(size * per_reference))
        view.peak_gib = {"method": estimate(config, chosen, hp, **MEMORY).total / 2**30,
                         "reference": estimate(config, reference, reference_hp, **MEMORY).total / 2**30}
        return view

    def draw(self, view: ScalingView) -> None:
        skills = has_skills(get_method(view.method))
        self.controls["skills"].disabled = not skills
        self.controls["skills"].tooltip = "" if skills else f"{view.method} has no skills or experts"
        at = view.grid.index(view.tasks)
        self.lines["method total"].set_data(view.grid, view.method_total)
        self.lines["reference total"].set_data(view.grid, view.reference_total)
        self.lines["method bytes"].set_data(view.grid, view.method_bytes_per_task)
        self.lines["reference bytes"].set_data(view.grid, view.reference_bytes_per_task)
        self.lines["method total"].set_label(view.method)
        self.markers["method total"].set_data([view.tasks], [view.method_total[at]])
        self.markers["method bytes"].set_data([view.tasks], [view.method_bytes_per_task[at]])
        for ax, keys in ((self.ax_total, ("method total", "reference total")),
                         (self.ax_bytes, ("method bytes", "reference bytes"))):
            values = [v for k in keys for v in self.lines[k].get_ydata() if math.isfinite(v) and v > 0]
            ax.set_xlim(0.8, self.max_tasks * 1.25)
            # half decades and R10 steps, not a jitter: the frame (axes, ticks) stays while T moves (base.py)
            ax.set_ylim(*nice_log_bounds(min(values) / 2, max(values) * 2, per_decade=2))
        for bar, key in zip(self.peak_bars, ("method", "reference"), strict=True):
            bar.set_height(view.peak_gib[key])
        self.ax_peak.set_ylim(0, nice_ceiling(max(view.peak_gib.values()) * 1.15))
        self.legend = self.ax_total.legend(fontsize=7, loc="upper left")
        per_task = view.method_total[1] - view.method_total[0] if len(view.grid) > 1 else math.nan
        step = view.grid[1] - view.grid[0] if len(view.grid) > 1 else 1
        self.ax_total.set_title(f"{view.model}: {view.method} at T={view.tasks}: {human(view.method_total[at])}",
                                fontsize=9, y=TITLE_Y)
        self.ax_bytes.set_title(f"one more task: +{human(per_task / step)} params "
                                f"({self.reference.name}: +{human(view.reference_total[0])})", fontsize=9, y=TITLE_Y)
        self.ax_peak.set_title(f"batch {MEMORY['batch_size']}, {MEMORY['seq_len']} tokens, bf16", fontsize=9)

    def dynamic_artists(self) -> list[Any]:
        # the legend sits over the data area: drawn after the lines, as a full render does
        return [*self.lines.values(), *self.markers.values(), *self.peak_bars, self.legend, self.ax_total.title,
                self.ax_bytes.title]
