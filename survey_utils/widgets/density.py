"""The density explorer of chapter 03: a selective method beside LoRA at the same trainable budget.

Controls: model, selective method, ``top_k`` blocks and components (partial tuning), which biases (BitFit), the
density of a sparse mask (FISH mask, LT-SFT, diff pruning; Child-tuning's ``reserve_p``).
Two live panels, every number from the closed forms and the memory estimate:

- left: % of the model *trained* and *changed* after merging, for the method and for LoRA (query and value
  projections) at the rank whose trainable count comes closest to the method's;
- right: bytes to *store* the task (the smallest of :func:`~survey_utils.experiments.ch03_selective.
  storage_formats`) and the *peak memory* of a training step (batch 1, 512 tokens, bf16, AdamW, CUDA kernels).

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
from survey_utils.methods.registry import get_method, list_methods
from survey_utils.plotting import nice_log_bounds
from survey_utils.targeting import select
from survey_utils.units import format_bytes
from survey_utils.widgets.base import TITLE_Y, Explorer
from survey_utils.zoo import list_models, load_config

_STYLE = {"description_width": "initial"}
BIASES = ("every bias", "query and value only")
DENSITY_HPS = ("density", "reserve_p")  # the hyper-parameter a sparse method's density slider sets
MEMORY_SETTING = {"batch_size": 1, "seq_len": 512, "dtype": "bf16"}


@dataclass
class DensityView:
    """What the panels show (tests read the bars back against these numbers)."""

    model: str
    method: str
    total: int
    lora_rank: int
    trained: dict[str, int] = field(default_factory=dict)  # method name -> parameters trained
    changed: dict[str, int] = field(default_factory=dict)
    stored: dict[str, tuple[str, int]] = field(default_factory=dict)  # -> (format, bytes)
    peak: dict[str, int] = field(default_factory=dict)

    def percent(self, count: int) -> float:
        return 100.0 * count / self.total


def lora_changed(config: Any, targets: Sequence[str] | None = None) -> int:
    """Parameters a merged LoRA changes: every element of each target weight (``d_in x d_out``)."""
    specs = select(layout(config), list(targets) if targets else None, model_name=str(config.name_or_path),
                   method="lora")
    return sum(s.in_features * s.out_features for s in specs)


def lora_rank_for(config: Any, budget: int) -> int:
    """The LoRA rank (query and value projections) whose trainable count is closest to ``budget``, at least 1."""
    per_rank = closed_form(config, "lora", r=1).trainable
    return max(1, round(budget / per_rank))


class DensityExplorer(Explorer):
    """Model, selective method, k, components, density -> trained / changed / stored / peak memory, beside LoRA.

    >>> explorer = DensityExplorer(model="roberta-base")   # doctest: +SKIP
    >>> explorer.controls["top_k"].value = 6                 # the bars redraw
    """

    def __init__(self, models: Sequence[str] | None = None, model: str = "roberta-base", method: str = "partial",
                 top_k: int = 3, density: float = 0.005, title: str = "",
                 figsize: tuple[float, float] = (10, 3.6)) -> None:
        models = list(models or list_models())
        if model not in models:
            raise SurveyError(f"model '{model}' is not among the explorer's models")
        controls = {
            "model": W.Dropdown(options=models, value=model, description="model", style=_STYLE),
            "method": W.Dropdown(options=[m.name for m in list_methods(family="selective")], value=method,
                                 description="method", style=_STYLE),
            "top_k": W.IntSlider(value=top_k, min=1, max=96, description="top_k (partial)",
                                 continuous_update=False, style=_STYLE),
            "components": W.Dropdown(options=list(get_method("partial").hyperparam("components").choices),
                                     value="block", description="components (partial)", style=_STYLE),
            "biases": W.Dropdown(options=list(BIASES), value=BIASES[0], description="biases (BitFit)", style=_STYLE),
            "density": W.FloatLogSlider(value=density, base=10, min=-4, max=0, step=0.25, readout_format=".2g",
                                        description="density (sparse)", continuous_update=False, style=_STYLE),
        }
        super().__init__(controls, figsize, title)

    def setup(self, fig: Figure) -> None:
        self.ax_params, self.ax_bytes = fig.subplots(1, 2)
        labels = ["trained", "changed"]
        self.param_bars = {who: self.ax_params.barh([f"{who}: {k}" for k in labels], [1e-6, 1e-6], color=colour)
                           for who, colour in (("method", "#7570b3"), ("LoRA", "#e7298a"))}
        self.ax_params.set_xscale("log")
        self.ax_params.set_xlabel("% of the model's parameters")
        self.ax_params.invert_yaxis()
        self.byte_bars = {who: self.ax_bytes.barh([f"{who}: {k}" for k in ("stored", "peak memory")], [1, 1],
                                                  color=colour)
                          for who, colour in (("method", "#7570b3"), ("LoRA", "#e7298a"))}
        self.ax_bytes.set_xscale("log")
        self.ax_bytes.set_xlabel("bytes")
        self.ax_bytes.invert_yaxis()
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
        rank = lora_rank_for(config, count.trainable)
        lora = closed_form(config, "lora", r=rank)
        view = DensityView(model, method, count.total, rank)
        view.trained = {"method": count.trainable, "LoRA": lora.trainable}
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in hp.items()))
        changed = changed_params(model, method, key)[0]
        view.changed = {"method": changed, "LoRA": lora_changed(config)}
        touched = {"method": touched_params(config, chosen, changed, **hp), "LoRA": view.changed["LoRA"]}
        for who, name, settings, adds in (("method", method, hp, chosen.adds_parameters),
                                          ("LoRA", "lora", {"r": rank}, True)):
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
        self.ax_params.set_title(f"{view.method} on {view.model} vs LoRA r={view.lora_rank} (q, v)", fontsize=10,
                                 y=TITLE_Y)
        self.ax_bytes.set_title("stored (smallest format); training peak (batch 1 x 512, bf16, AdamW)", fontsize=9)

    def dynamic_artists(self) -> list[Any]:
        bars = [b for group in (self.param_bars, self.byte_bars) for bars in group.values() for b in bars]
        return [*bars, *self.labels, self.ax_params.title]
