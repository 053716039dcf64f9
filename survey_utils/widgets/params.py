"""The trainable-parameter explorer used by every method chapter (chapter 04 introduces it).

Controls are generated from the chosen method's :class:`HyperParam` specs: integers that size the
trainable count become sliders, other integers (seeds, step counts) integer boxes, booleans checkboxes,
choices dropdowns, ``target_modules`` one checkbox per linear module of the chosen
model, ``layers_to_transform`` a block-range slider. Two live panels, computed by the closed form:

- left: trainable parameters (absolute, and % of the model on the right axis) as one integer
  hyper-parameter sweeps its range (the explorer's ``sweep`` where the method has it, else the first integer
  that sizes the count: rank, prompt length, reduction factor), the current value marked; a value of 0 that
  means "derived from the model" (``bottleneck_size``) is marked where its count sits on the curve;
- right: trainable % of every method of the explorer on the same model, with the settings they share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullLocator

from survey_utils.architecture import layout
from survey_utils.counting import closed_form
from survey_utils.errors import SurveyError
from survey_utils.methods.registry import HyperParam, Method, get_method
from survey_utils.palette import HIGHLIGHT, NOT_APPLICABLE
from survey_utils.plotting import human, method_colour, nice_log_bounds
from survey_utils.targeting import num_blocks
from survey_utils.widgets.base import TITLE_Y, Explorer
from survey_utils.zoo import list_models, load_config

_STYLE = {"description_width": "initial"}


@dataclass
class ParamsView:
    """What the panels show; tests read it to check that a control change changed the plot."""

    model: str
    method: str
    trainable: int
    total: int
    sweep_name: str | None
    sweep_x: list[int] = field(default_factory=list)
    sweep_y: list[float] = field(default_factory=list)
    current_x: float | None = None
    derived: bool = False
    comparison: list[tuple[str, float]] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total


def slider_range(hp: HyperParam) -> tuple[float, float]:
    """The range a slider offers: the spec's bounds, else up to 128 or 8x the default."""
    low = hp.minimum if hp.minimum is not None else 0
    default = hp.default if isinstance(hp.default, int | float) else 1
    high = hp.maximum if hp.maximum is not None else max(128, 8 * default)
    return low, high


def sweep_values(hp: HyperParam) -> list[int]:
    low, high = slider_range(hp)
    low = max(1, int(low))
    return sorted({int(round(v)) for v in np.geomspace(low, int(high), 14)})


class _TargetBoxes(W.VBox):
    """One checkbox per linear module name; ``value`` is the list of checked names."""

    value = W.widgets.trait_types.traitlets.List().tag(sync=False)

    def __init__(self, names: Sequence[str], checked: Sequence[str]) -> None:
        self.boxes = [W.Checkbox(value=name in checked, description=name, indent=False,
                                 layout=W.Layout(width="auto")) for name in names]
        super().__init__([W.HTML("target_modules"), W.HBox(self.boxes, layout=W.Layout(flex_flow="row wrap"))])
        self.value = [b.description for b in self.boxes if b.value]
        for box in self.boxes:
            box.observe(self._sync, names="value")

    def _sync(self, _change: Any) -> None:
        self.value = [b.description for b in self.boxes if b.value]


def hyperparam_widget(hp: HyperParam, model: str, current: Any = None,
                      method: Method | None = None, sizes_count: bool = True) -> W.Widget | None:
    """A control for one hyper-parameter on ``model``, keeping ``current`` when it is still valid.

    An integer that does not size the trainable count (``sizes_count=False``: a seed, a step count) gets an
    integer box, not a slider. A ``targets`` control starts from the method's per-architecture defaults when it declares them
    (``Method.default_targets(config) -> {hp name: [module names]}``, as peft's (IA)^3 mapping), else
    from the architecture's query and value projections.
    """
    config = load_config(model)
    shape = layout(config)
    if hp.type == "targets":
        names = shape.linear_names()
        defaults = list(shape.default_lora_targets)
        declared = method.default_targets if method is not None else None
        if declared is not None:
            try:
                defaults = list(declared(config).get(hp.name, defaults))
            except SurveyError:
                pass
        chosen = current if isinstance(current, list) else (hp.default or defaults)
        return _TargetBoxes(names, [c for c in chosen if c in names] or defaults)
    if hp.type == "int_list":
        blocks = num_blocks(shape)
        low, high = (min(current), max(current)) if current else (0, blocks - 1)
        return W.IntRangeSlider(value=(min(low, blocks - 1), min(high, blocks - 1)), min=0, max=blocks - 1,
                                description=hp.name, continuous_update=False, style=_STYLE)
    if hp.choices is not None:
        return W.Dropdown(options=list(hp.choices), value=current if current in hp.choices else hp.default,
                          description=hp.name, style=_STYLE)
    value = hp.default if current is None else current
    if value is None:
        return None  # an unset optional number (peft's "derive it from the model") has no slider
    if hp.type == "int" and not sizes_count:
        return W.BoundedIntText(value=int(value), min=int(hp.minimum if hp.minimum is not None else -2**31),
                                max=int(hp.maximum if hp.maximum is not None else 2**31 - 1), description=hp.name,
                                tooltip=f"{hp.name}: {hp.help} (does not change the trainable count)",
                                style=_STYLE, layout=W.Layout(width="220px"))
    if hp.type == "int":
        low, high = slider_range(hp)
        return W.IntSlider(value=int(value), min=int(low), max=int(high), description=hp.name,
                           continuous_update=False, style=_STYLE)
    if hp.type == "float":
        low, high = slider_range(hp)
        step = 0.01 if high <= 1 else 0.5
        return W.FloatSlider(value=float(value), min=float(low), max=float(high), step=step,
                             description=hp.name, continuous_update=False, style=_STYLE)
    if hp.type == "bool":
        return W.Checkbox(value=bool(value), description=hp.name, indent=False)
    return None  # free-text settings (layers_pattern) keep their default in the widget


def sizes_count(config: Any, method: Method, hp: HyperParam) -> bool:
    """Whether integer ``hp`` changes the method's trainable count on ``config`` (a size, not a seed)."""
    if hp.type != "int" or not isinstance(hp.default, int):
        return hp.type == "int"
    counts = set()
    for value in {hp.default, max(hp.default, 1) * 2, max(hp.default, 1) * 2 + 2}:
        try:
            counts.add(method.count(config, **{hp.name: value}))
        except SurveyError:
            return True  # a value the method rejects: it matters, keep the slider and its bounds
    return len(counts) > 1


def widget_value(hp: HyperParam, control: W.Widget, model: str) -> Any:
    """The hyper-parameter value a control stands for."""
    if hp.type == "int_list":
        low, high = control.value
        if low == 0 and high == num_blocks(layout(load_config(model))) - 1:
            return None
        return list(range(low, high + 1))
    return control.value


class MethodExplorer(Explorer):
    """Model, method and its hyper-parameters -> live trainable-parameter panels.

    >>> explorer = MethodExplorer(["lora"], model="llama-2-7b")   # doctest: +SKIP
    >>> explorer.hp_controls["r"].value = 16                        # the plot redraws
    """

    def __init__(self, methods: Sequence[str], models: Sequence[str] | None = None,
                 model: str = "llama-2-7b", method: str | None = None, title: str = "",
                 figsize: tuple[float, float] = (10, 3.8), sweep: str | None = None) -> None:
        self.methods: list[Method] = [get_method(m) for m in methods]
        self.sweep = sweep
        models = list(models or list_models())
        if model not in models:
            raise SurveyError(f"model '{model}' is not among the explorer's models")
        self.model_control = W.Dropdown(options=models, value=model, description="model", style=_STYLE)
        names = [m.name for m in self.methods]
        self.method_control = W.Dropdown(options=names, value=method or names[0], description="method",
                                         style=_STYLE)
        self.hp_controls: dict[str, W.Widget] = {}
        self._hp_specs: dict[str, HyperParam] = {}
        self._building = False
        self._rebuild_hp_controls()
        super().__init__({"model": self.model_control, "method": self.method_control}, figsize, title)

    # The model and method controls rebuild the hyper-parameter controls before the redraw.
    def _on_change(self, change: Any = None) -> None:
        if change is not None and change.get("owner") in (self.model_control, self.method_control):
            self._needs_layout = True
            self._rebuild_hp_controls()
            self._layout_controls()
        if not self._building:
            self.update()

    def _rebuild_hp_controls(self) -> None:
        self._building = True
        previous = {name: widget_value(self._hp_specs[name], c, self._previous_model)
                    for name, c in self.hp_controls.items()} if self.hp_controls else {}
        method = get_method(self.method_control.value)
        if getattr(self, "_previous_method", method.name) != method.name:
            # Across methods only sizes and placement carry over (compare methods at equal rank and
            # targets); flags and choices mean different things per method and restart at defaults.
            previous = {name: value for name, value in previous.items()
                        if self._hp_specs[name].type in ("int", "targets", "int_list")}
        self._previous_method = method.name
        model = self.model_control.value
        config = load_config(model)
        self.hp_controls, self._hp_specs = {}, {}
        for hp in method.hyperparams:
            current = previous.get(hp.name)
            try:
                control = hyperparam_widget(hp, model, current, method, sizes_count(config, method, hp))
            except SurveyError:
                control = None
            if control is not None:
                self.hp_controls[hp.name] = control
                self._hp_specs[hp.name] = hp
                control.observe(self._on_change, names="value")
        self._previous_model = model
        self._building = False

    def _layout_controls(self) -> None:
        rows = [W.HBox([self.model_control, self.method_control])]
        simple = [c for c in self.hp_controls.values() if not isinstance(c, _TargetBoxes)]
        rows += [W.HBox(simple[i:i + 3]) for i in range(0, len(simple), 3)]
        rows += [c for c in self.hp_controls.values() if isinstance(c, _TargetBoxes)]
        if hasattr(self, "controls_box"):
            self.controls_box.children = rows

    @property
    def state(self) -> dict[str, Any]:
        model = self.model_control.value
        return {"model": model, "method": self.method_control.value,
                "hp": {name: widget_value(self._hp_specs[name], c, model) for name, c in self.hp_controls.items()}}

    # --- the panels -------------------------------------------------------------------------------------
    def setup(self, fig: Figure) -> None:
        self.ax_sweep, self.ax_compare = fig.subplots(1, 2, width_ratios=(1.25, 1))
        (self.sweep_line,) = self.ax_sweep.plot([], [], "o-", ms=3, lw=1.5, label="closed-form count")
        (self.current_point,) = self.ax_sweep.plot([], [], "o", color=HIGHLIGHT, ms=8, zorder=3,
                                                   label="current setting")
        self.sweep_note = self.ax_sweep.text(0.5, 0.5, "", transform=self.ax_sweep.transAxes, ha="center",
                                             va="center", fontsize=9, color=NOT_APPLICABLE)
        self.ax_sweep.set_yscale("log")
        self._total = 1.0
        self.percent_axis = self.ax_sweep.secondary_yaxis("right", functions=(lambda y: 100 * y / self._total,
                                                                              lambda p: p * self._total / 100))
        self.percent_axis.set_ylabel("% of the model")
        # Redrawn with every update (see dynamic_artists): plain labels, no minor ticks (mathtext and minor
        # ticks were half the cost of a redraw, benchmarks/explorer_redraw.py).
        self.percent_axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        self.percent_axis.yaxis.set_minor_locator(NullLocator())
        self.ax_sweep.set_ylabel("trainable parameters")
        names = [m.name for m in self.methods]
        self.bars = self.ax_compare.barh(names, [1e-6] * len(names), color=[method_colour(n) for n in names])
        self.ax_compare.set_xscale("log")
        self.ax_compare.invert_yaxis()
        self.ax_compare.set_xlabel("trainable % of the model")
        self.bar_labels = [self.ax_compare.text(0, i, "", va="center", fontsize=8) for i in range(len(names))]

    def compute(self, model: str, method: str, hp: dict[str, Any]) -> ParamsView:
        config = load_config(model)
        chosen = get_method(method)
        current = closed_form(config, chosen, **hp)
        sweep = self.swept(chosen, hp)
        view = ParamsView(model, method, current.trainable, current.total, sweep.name if sweep else None)
        if sweep is not None:
            for value in sweep_values(sweep):
                try:
                    view.sweep_y.append(closed_form(config, chosen, **{**hp, sweep.name: value}).trainable)
                    view.sweep_x.append(value)
                except SurveyError:
                    continue
            view.current_x = hp[sweep.name]
            if view.current_x < 1 and view.sweep_x:  # 0 = derived from the model: sit on the curve at its count
                order = np.argsort(view.sweep_y)  # counts are affine in a size: linear interpolation is exact
                view.current_x = float(np.interp(current.trainable, np.asarray(view.sweep_y)[order],
                                                 np.asarray(view.sweep_x)[order]))
                view.derived = True
        for other in self.methods:
            shared = {k: v for k, v in hp.items() if k in {h.name for h in other.hyperparams}}
            try:
                count = closed_form(config, other, **shared)
                view.comparison.append((other.name, count.trainable_percent))
            except SurveyError as error:
                view.comparison.append((other.name, math.nan))
                view.reasons[other.name] = str(error)
        return view

    def swept(self, method: Method, hp: dict[str, Any]) -> HyperParam | None:
        """The swept hyper-parameter: ``self.sweep`` where the method has it, else its first integer control that
        sizes the count (a slider, not a seed's box)."""
        ints = [h for h in method.hyperparams if h.type == "int" and h.name in hp
                and isinstance(self.hp_controls.get(h.name), W.IntSlider)]
        return next((h for h in ints if h.name == self.sweep), ints[0] if ints else None)

    def draw(self, view: ParamsView) -> None:
        self._total = float(view.total)
        colour = method_colour(view.method)
        self.sweep_line.set_data(view.sweep_x, view.sweep_y)
        self.sweep_line.set_color(colour)
        if view.current_x is not None:
            self.current_point.set_data([view.current_x], [view.trainable])
        else:
            self.current_point.set_data([], [])
        ax = self.ax_sweep
        xs = [*view.sweep_x, *([view.current_x] if view.current_x is not None else [])]
        if xs:
            ax.set_xscale("log", base=2)
            ax.set_xlim(min(xs) / 1.3, max(xs) * 1.3)
        ys = [y for y in [*view.sweep_y, view.trainable] if y > 0] or [1]
        ax.set_ylim(min(ys) / 2, max(ys) * 2)
        derived = " (0 = derived; marked at its count)" if view.derived else ""
        ax.set_xlabel(f"{view.sweep_name}{derived}" if view.sweep_name else "")
        self.sweep_note.set_text("" if view.sweep_name else
                                 f"{view.method} has no integer size to sweep:\nits count is fixed by the model "
                                 f"({human(view.trainable)} trainable)")
        ax.set_title(f"{view.method} on {view.model}: {human(view.trainable)} trainable "
                     f"= {view.percent:.4g}% of {human(view.total)}", fontsize=10, y=TITLE_Y)
        finite = [p for _, p in view.comparison if math.isfinite(p) and p > 0] or [1.0]
        for bar, label, (name, percent) in zip(self.bars, self.bar_labels, view.comparison, strict=True):
            ok = math.isfinite(percent) and percent > 0
            bar.set_width(percent if ok else min(finite) / 10)
            bar.set_alpha(1.0 if ok else 0.15)
            bar.set_edgecolor(HIGHLIGHT if name == view.method else "none")
            bar.set_linewidth(1.5 if name == view.method else 0)
            label.set_position((percent if ok else min(finite) / 10, label.get_position()[1]))
            label.set_text(f" {percent:.3g}%" if ok else f" n/a: {view.reasons.get(name, 'not computable')[:70]}")
            label.set_color("#222222" if ok else NOT_APPLICABLE)
        # half-decade steps: the frame stays while a slider moves the bars a little (widgets/base.py)
        self.ax_compare.set_xlim(*nice_log_bounds(min(finite) / 25, max(finite) * 30, per_decade=2))

    def dynamic_artists(self) -> list[Any]:
        # the % axis follows the model's total, which grows with the added parameters: redrawn every time
        return [self.sweep_line, self.current_point, self.sweep_note, self.ax_sweep.title, self.percent_axis,
                *self.bars, *self.bar_labels]
