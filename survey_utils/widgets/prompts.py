"""Soft prompts cost positions, not only parameters: the prompt-length explorer of chapter 02.

Controls: model, prompt length ``n`` (``num_virtual_tokens``), input length ``L``, batch size, and whether
prefix tuning trains through its reparameterisation MLP. Three live panels against ``n``, one line per
method: trainable parameters, the peak memory of one training step (chapter 00's memory model), and the
key/value cache. The title states the effective sequence lengths at the chosen ``n``: prompt methods push
``n + L`` positions through every block; prefix methods keep ``L`` queries attending over ``n + L`` keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from survey_utils.architecture import layout
from survey_utils.errors import SurveyError
from survey_utils.experiments.ch02_soft_prompts import sequence_costs
from survey_utils.memory import estimate
from survey_utils.methods import get_method
from survey_utils.methods.soft_prompts import check_context
from survey_utils.plotting import human
from survey_utils.widgets.base import TITLE_Y, Explorer
from survey_utils.zoo import list_models, load_config

PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning", "p_tuning_v2")
_STYLE = {"description_width": "initial"}


@dataclass
class PromptView:
    """Per method: the swept lengths and, at each, trainable parameters, peak bytes and KV-cache bytes."""

    model: str
    n: int
    seq_len: int
    lengths: list[int]
    trainable: dict[str, list[float]] = field(default_factory=dict)
    peak: dict[str, list[float]] = field(default_factory=dict)
    kv_cache: dict[str, list[float]] = field(default_factory=dict)


def prompt_hp(method: str, n: int, prefix_projection: bool) -> dict[str, Any]:
    hp: dict[str, Any] = {"num_virtual_tokens": n}
    if method == "prefix_tuning":
        hp["prefix_projection"] = prefix_projection
    return hp


class PromptLengthExplorer(Explorer):
    """Trainable parameters, peak memory and KV cache of the soft-prompt methods against prompt length."""

    def __init__(self, model: str = "llama-2-7b", methods: tuple[str, ...] = PROMPT_METHODS,
                 max_tokens: int = 400, title: str = "Soft prompts: the cost of a prompt") -> None:
        self.methods = [get_method(m).name for m in methods]
        self.max_tokens = max_tokens
        limit = layout(load_config(model)).max_positions
        start_len = 512 if limit is None else max(16, min(512, (limit - 20) // 16 * 16))
        controls = {
            "model": W.Dropdown(options=list_models(), value=model, description="model", style=_STYLE),
            "num_virtual_tokens": W.IntSlider(value=20, min=1, max=max_tokens, description="virtual tokens n",
                                              continuous_update=False, style=_STYLE),
            "seq_len": W.IntSlider(value=start_len, min=16, max=4096, step=16, description="input tokens L",
                                   continuous_update=False, style=_STYLE),
            "batch_size": W.IntSlider(value=1, min=1, max=64, description="batch", continuous_update=False,
                                      style=_STYLE),
            "prefix_projection": W.Checkbox(value=True, description="prefix tuning trains through its MLP",
                                            indent=False),
        }
        super().__init__(controls, figsize=(11, 3.6), title=title)

    def setup(self, fig: Figure) -> None:
        self.axes = fig.subplots(1, 3)
        self.lines: dict[str, list[Any]] = {}
        self.markers: dict[str, list[Any]] = {}
        for method in self.methods:
            self.lines[method] = [ax.plot([], [], "-", lw=1.5, label=method)[0] for ax in self.axes]
            self.markers[method] = [ax.plot([], [], "o", color=line.get_color(), ms=6)[0]
                                    for ax, line in zip(self.axes, self.lines[method], strict=True)]
        labels = ("trainable parameters", "peak memory of a training step (GiB)", "key/value cache (MiB)")
        for ax, label in zip(self.axes, labels, strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("virtual tokens n")
            ax.set_ylabel(label)
        self.axes[0].set_yscale("log")
        self.axes[0].legend(fontsize=7, loc="upper left")
        self.suptitle = fig.suptitle("", fontsize=9)

    def compute(self, model: str, num_virtual_tokens: int, seq_len: int, batch_size: int,
                prefix_projection: bool) -> PromptView:
        for name, value in (("num_virtual_tokens", num_virtual_tokens), ("seq_len", seq_len),
                            ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SurveyError(f"{name}={value!r} must be a positive integer")
        config = load_config(model)
        check_context(config, num_virtual_tokens, seq_len)
        grid = sorted({int(round(v)) for v in np.geomspace(1, self.max_tokens, 12)} | {num_virtual_tokens})
        view = PromptView(model, num_virtual_tokens, seq_len, grid)
        for method in self.methods:
            counts, peaks, caches = [], [], []
            for n in grid:
                hp = prompt_hp(method, n, prefix_projection)
                try:  # all three or none: a method a setting does not fit is a gap in every panel
                    point = (float(get_method(method).count(config, **hp)),
                             estimate(config, method, hp, batch_size=batch_size, seq_len=seq_len).total / 2**30,
                             sequence_costs(config, method, n, seq_len, batch_size)["kv cache bytes"] / 2**20)
                except SurveyError:
                    point = (math.nan, math.nan, math.nan)
                counts.append(point[0])
                peaks.append(point[1])
                caches.append(point[2])
            view.trainable[method], view.peak[method], view.kv_cache[method] = counts, peaks, caches
        return view

    def draw(self, view: PromptView) -> None:
        at = view.lengths.index(view.n)
        for method in self.methods:
            series = (view.trainable[method], view.peak[method], view.kv_cache[method])
            for line, marker, values in zip(self.lines[method], self.markers[method], series, strict=True):
                line.set_data(view.lengths, values)
                marker.set_data([view.n], [values[at]])
        for ax in self.axes:
            ax.relim()
            ax.autoscale_view()
        self.axes[0].set_title(f"{view.model}: at n={view.n}", fontsize=9, y=TITLE_Y)
        self.axes[1].set_title(f"prompts: {view.n + view.seq_len} positions in every block", fontsize=9, y=TITLE_Y)
        self.axes[2].set_title(f"prefixes: {view.seq_len} queries over {view.n + view.seq_len} keys", fontsize=9, y=TITLE_Y)
        finite = [v for m in self.methods for v in view.trainable[m] if math.isfinite(v)]
        if finite:
            self.axes[0].set_ylim(min(finite) / 2, max(finite) * 2)
        self.suptitle.set_text(
            f"trainable at n={view.n}: " + ", ".join(
                f"{m} {human(view.trainable[m][at])}" for m in self.methods if math.isfinite(view.trainable[m][at])))

    def dynamic_artists(self) -> list[Any]:
        return [*(a for m in self.methods for a in (*self.lines[m], *self.markers[m])),
                *(ax.title for ax in self.axes), self.suptitle]
