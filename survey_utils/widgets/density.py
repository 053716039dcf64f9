"""The density explorer of chapter 03: a selective method beside a reference (LoRA) at the same trainable budget.

Controls: model, selective method, ``top_k`` blocks and components (partial tuning), which biases (BitFit), the
density of a sparse mask (FISH mask, LT-SFT, diff pruning; Child-tuning's ``reserve_p``).
Two live panels, every number from the closed forms and the memory estimate:

- left: % of the model *trained* and *changed* after merging, for the method and for the reference (a mergeable
  method with a rank ``r``; LoRA by default, :data:`DEFAULT_REFERENCE`) on its default targets (the query and value
  projections) at the rank whose trainable count comes closest to the method's;
- right: bytes to *store* the task (the smallest of :func:`~survey_utils.experiments.ch03_selective.
  storage_formats`) and the *peak memory* of a training step (:data:`MEMORY_SETTING`, CUDA kernels).

A selective method changes exactly what it trains; LoRA trains little but, merged, changes whole matrices; diff
pruning trains twice the weights it targets and changes only the pruned delta (*changed* is measured on the model
built on ``meta``: :func:`survey_utils.counting.changed_params`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
from matplotlib.figure import Figure

from survey_utils.architecture import layout
from survey_utils.counting import changed_params, closed_form
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch03_selective import storage_formats, touched_params
from survey_utils.memory import estimate
from survey_utils.methods.registry import Method, get_method, list_methods
from survey_utils.plotting import nice_log_bounds
from survey_utils.units import format_bytes
from survey_utils.widgets.base import TITLE_Y, Explorer
from survey_utils.zoo import list_models, load_config

_STYLE = {"description_width": "initial"}
BIASES = ("every bias", "query and value only")
DENSITY_HPS = ("density", "reserve_p")  # the hyper-parameter a sparse method's density slider sets
MEMORY_SETTING = {"batch_size": 1, "seq_len": 512, "dtype": "bf16", "optimizer": "adamw"}
"""The training step whose peak memory the right panel shows (its title is written from these values)."""
DEFAULT_REFERENCE = "lora"
"""The method the selective one is set beside, unless the explorer is given another (chapter 03 compares with LoRA)."""


@dataclass
class DensityView:
    """What the panels show (tests read the bars back against these numbers)."""

    model: str
    method: str
    total: int
    reference_rank: int
    reference_targets: str = ""  # the reference's target modules' names, as the title shows them
    reference_note: str = ""  # a second title line when the matched rank exceeds the adapted layers' width
    trained: dict[str, int] = field(default_factory=dict)  # "method" or the reference's label -> parameters trained
    changed: dict[str, int] = field(default_factory=dict)
    stored: dict[str, tuple[str, int]] = field(default_factory=dict)  # -> (format, bytes)
    peak: dict[str, int] = field(default_factory=dict)

    def percent(self, count: int) -> float:
        return 100.0 * count / self.total


def reference_method(name: str | Method = DEFAULT_REFERENCE) -> Method:
    """The registered method ``name``, checked to be one the explorer can set beside a selective method: it has a
    rank ``r`` (the budget is matched by rank) and merges into its target weights (*changed* = those weights)."""
    method = get_method(name) if isinstance(name, str) else name
    if not method.mergeable or not any(hp.name == "r" and hp.type == "int" for hp in method.hyperparams):
        raise SurveyError(f"reference '{method.name}' must be a mergeable method with an integer rank r "
                          "(the explorer matches the budget by rank and counts the merged target weights)")
    return method


def reference_label(method: Method) -> str:
    """The reference's short name on the bars and in the title (its title without a parenthesised gloss)."""
    return method.title.split(" (")[0]


def reference_specs(config: Any, reference: Method, targets: Sequence[str] | None = None,
                    r: int | None = None) -> list[Any]:
    """The layout modules the reference adapts (its default targets unless ``targets``), at rank ``r``."""
    settings: dict[str, Any] = {} if r is None else {"r": r}
    if targets:
        settings["target_modules"] = list(targets)
    specs = reference.sites(config, **reference.resolve(config, **settings))
    if not isinstance(specs, list):  # "input" or None: it adds positions, no weight to merge into
        raise SurveyError(f"reference '{reference.name}' adapts no target modules on "
                          f"{getattr(config, 'name_or_path', '') or config.model_type}")
    return specs


def merged_changed(config: Any, reference: Method, targets: Sequence[str] | None = None, r: int | None = None) -> int:
    """Parameters the merged reference changes: every element of each target weight (``d_in x d_out``)."""
    return sum(s.in_features * s.out_features for s in reference_specs(config, reference, targets, r))


def reference_rank_for(config: Any, reference: Method, budget: int) -> int:
    """The reference's rank (default targets) whose trainable count is closest to ``budget``, at least 1: its count
    at r=1 is the count per rank (a LoRA-style count grows in proportion to r)."""
    per_rank = closed_form(config, reference, r=1).trainable
    return max(1, round(budget / per_rank))


class DensityExplorer(Explorer):
    """Model, selective method, k, components, density -> trained / changed / stored / peak memory, beside the
    ``reference`` method (LoRA unless told; :func:`reference_method` says which methods can be one).

    >>> explorer = DensityExplorer(model="roberta-base")   # doctest: +SKIP
    >>> explorer.controls["top_k"].value = 6                 # the bars redraw
    """

    def __init__(self, models: Sequence[str] | None = None, model: str = "roberta-base", method: str = "partial",
                 top_k: int = 3, density: float = 0.005, title: str = "",
                 figsize: tuple[float, float] = (10, 3.6), reference: str | Method = DEFAULT_REFERENCE) -> None:
        models = list(models or list_models())
        if model not in models:
            raise SurveyError(f"model '{model}' is not among the explorer's models")
        self.reference = reference_method(reference)
        self.reference_label = reference_label(self.reference)
        selective = list_methods(family="selective")
        # the components control is the hyper-parameter of the selective method that has one (partial tuning)
        components = next(hp for m in selective for hp in m.hyperparams if hp.name == "components")
        controls = {
            "model": W.Dropdown(options=models, value=model, description="model", style=_STYLE),
            "method": W.Dropdown(options=[m.name for m in selective], value=method,
                                 description="method", style=_STYLE),
            "top_k": W.IntSlider(value=top_k, min=1, max=96, description="top_k (partial)",
                                 continuous_update=False, style=_STYLE),
            "components": W.Dropdown(options=list(components.choices), value=components.default,
                                     description="components (partial)", style=_STYLE),
            "biases": W.Dropdown(options=list(BIASES), value=BIASES[0], description="biases (BitFit)", style=_STYLE),
            "density": W.FloatLogSlider(value=density, base=10, min=-4, max=0, step=0.25, readout_format=".2g",
                                        description="density (sparse)", continuous_update=False, style=_STYLE),
        }
        super().__init__(controls, figsize, title)

    def setup(self, fig: Figure) -> None:
        self.ax_params, self.ax_bytes = fig.subplots(1, 2)
        labels = ["trained", "changed"]
        whos = (("method", "#7570b3"), (self.reference_label, "#e7298a"))
        self.param_bars = {who: self.ax_params.barh([f"{who}: {k}" for k in labels], [1e-6, 1e-6], color=colour)
                           for who, colour in whos}
        self.ax_params.set_xscale("log")
        self.ax_params.set_xlabel("% of the model's parameters")
        self.ax_params.invert_yaxis()
        self.byte_bars = {who: self.ax_bytes.barh([f"{who}: {k}" for k in ("stored", "peak memory")], [1, 1],
                                                  color=colour)
                          for who, colour in whos}
        self.ax_bytes.set_xscale("log")
        self.ax_bytes.set_xlabel("bytes")
        self.ax_bytes.invert_yaxis()
        # Two lines: on one, the setting ran past the figure's right edge (the panel is half the figure wide)
        setting = MEMORY_SETTING
        self.ax_bytes.set_title(f"stored (smallest format); training peak\n(batch {setting['batch_size']} x "
                                f"{setting['seq_len']} tokens, {setting['dtype']}, {setting['optimizer']})",
                                fontsize=9)
        self.labels = [ax.text(0, 0, "", fontsize=8, va="center") for ax in (self.ax_params, self.ax_bytes)
                       for _ in range(4)]

    def hyperparameters(self, config: Any, method: str, top_k: int, components: str, biases: str,
                        density: float) -> dict[str, Any]:
        """The chosen method's settings from the controls it has (the others' controls are ignored)."""
        names = {hp.name for hp in get_method(method).hyperparams}
        hp: dict[str, Any] = {}
        if "top_k" in names:
            hp.update(top_k=top_k, components=components)
        if "bias_modules" in names and biases == BIASES[1]:
            hp["bias_modules"] = list(layout(config).default_lora_targets)
        hp.update({name: density for name in DENSITY_HPS if name in names})
        return hp

    def compute(self, model: str, method: str, top_k: int, components: str, biases: str,
                density: float) -> DensityView:
        config = load_config(model)
        chosen = get_method(method)
        hp = self.hyperparameters(config, method, top_k, components, biases, density)
        count = closed_form(config, chosen, **hp)
        reference, ref = self.reference, self.reference_label
        rank = reference_rank_for(config, reference, count.trainable)
        specs = reference_specs(config, reference, r=rank)
        targets = ", ".join(dict.fromkeys(s.name.rsplit(".", 1)[-1] for s in specs))
        width = min(min(s.in_features, s.out_features) for s in specs)
        view = DensityView(model, method, count.total, rank, targets)
        if rank > width:  # B A is then a full-rank matrix: a bigger rank buys nothing a merge could show
            view.reference_note = f"r = {rank} is above the layers' width {width}: the update is full rank"
        view.trained = {"method": count.trainable, ref: closed_form(config, reference, r=rank).trainable}
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in hp.items()))
        changed = changed_params(model, method, key)[0]
        view.changed = {"method": changed, ref: merged_changed(config, reference, r=rank)}
        touched = {"method": touched_params(config, chosen, changed, **hp), ref: view.changed[ref]}
        for who, name, settings, adds in (("method", method, hp, chosen.adds_parameters),
                                          (ref, reference.name, {"r": rank}, reference.adds_parameters)):
            formats = storage_formats(view.trained[who], view.changed[who], count.total, adds, touched=touched[who])
            view.stored[who] = min(formats.items(), key=lambda kv: kv[1])
            view.peak[who] = estimate(config, name, settings, **MEMORY_SETTING).total
        return view

    def draw(self, view: DensityView) -> None:
        texts = iter(self.labels)
        for who, bars in self.param_bars.items():
            for bar, value in zip(bars, (view.trained[who], view.changed[who]), strict=True):
                bar.set_width(view.percent(value))
                label = next(texts)
                label.set_position((view.percent(value), bar.get_y() + bar.get_height() / 2))
                label.set_text(f" {view.percent(value):.3g}% ({value:,})")
        widths = [view.percent(v) for d in (view.trained, view.changed) for v in d.values()]
        # Half-decade steps, not a jitter, and room for the labels of bars up to 100% of the model: the frame
        # (axes, ticks) stays while top_k or the density moves the bars (widgets/base.py)
        self.ax_params.set_xlim(*nice_log_bounds(min(widths) / 3, max(100.0, *widths) * 30, per_decade=2))
        for who, bars in self.byte_bars.items():
            fmt, size = view.stored[who]
            for bar, value, note in zip(bars, (size, view.peak[who]), (f" as {fmt}", ""), strict=True):
                bar.set_width(value)
                label = next(texts)
                label.set_position((value, bar.get_y() + bar.get_height() / 2))
                label.set_text(f" {format_bytes(value)}{note}")
        sizes = [v for d in (view.peak,) for v in d.values()] + [s for _, s in view.stored.values()]
        self.ax_bytes.set_xlim(*nice_log_bounds(min(sizes) / 3, max(sizes) * 60, per_decade=1))
        self.ax_params.set_title(f"{view.method} on {view.model} vs {self.reference_label} r={view.reference_rank} "
                                 f"({view.reference_targets})" + (f"\n{view.reference_note}" if view.reference_note
                                                                  else ""), fontsize=10, y=TITLE_Y)

    def dynamic_artists(self) -> list[Any]:
        bars = [b for group in (self.param_bars, self.byte_bars) for bars in group.values() for b in bars]
        return [*bars, *self.labels, self.ax_params.title]
