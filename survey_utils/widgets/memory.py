"""The memory view (chapter 00, reused by every method chapter): where a training step's memory goes.

Controls: model, method, rank (methods with ``r``), batch size, sequence length, dtype, optimizer, the
device whose kernels are counted (CUDA, or CPU as the simulation runs), gradient checkpointing, and
"simulate" (runs the fake-tensor step on CPU kernels; seconds for 7B models, so on demand).
Left: a stacked bar of the estimate's terms at the peak, with the simulated peak beside it when asked.
Right: estimated peak against sequence length, split into what does not depend on it (weights, optimizer
states) and what grows with it (activations, logits), with the length where activations overtake marked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from survey_utils.errors import SurveyError
from survey_utils.memory.estimate import MemoryEstimate, estimate
from survey_utils.methods.registry import get_method, list_methods
from survey_utils.units import DTYPES, OPTIMIZERS, format_bytes
from survey_utils.widgets.base import Explorer
from survey_utils.zoo import list_models

TERMS = ("weights", "optimizer states", "gradients", "optimizer step", "activations", "logits and loss", "batch")
SIM_TERMS = {"Parameter": "weights", "Buffer": "weights", "Optstate": "optimizer states", "Gradient": "gradients",
             "Activation": "activations", "Temp": "logits and loss", "Other": "batch"}
_STYLE = {"description_width": "initial"}


@dataclass
class MemoryView:
    """What the panels show; tests read it."""

    estimate: MemoryEstimate
    terms: dict[str, int]
    simulated: dict[str, int] | None
    seq_lens: list[int] = field(default_factory=list)
    fixed: list[int] = field(default_factory=list)
    growing: list[int] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    crossover: int | None = None


class MemoryExplorer(Explorer):
    """Estimate (and on demand simulate) one training step's peak memory, term by term."""

    def __init__(self, models: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                 model: str = "llama-2-7b", method: str | None = None) -> None:
        models = list(models or list_models())
        methods = list(methods or [m.name for m in list_methods()])
        self._sim_cache: dict[tuple, dict[str, int]] = {}
        controls = {
            "model": W.Dropdown(options=models, value=model if model in models else models[0],
                                description="model", style=_STYLE),
            "method": W.Dropdown(options=methods, value=method if method in methods else methods[0],
                                 description="method", style=_STYLE),
            "rank": W.IntSlider(value=8, min=1, max=256, description="rank r", continuous_update=False,
                                style=_STYLE),
            "batch_size": W.IntSlider(value=1, min=1, max=64, description="batch", continuous_update=False,
                                      style=_STYLE),
            "seq_len": W.IntSlider(value=512, min=16, max=8192, step=16, description="seq len",
                                   continuous_update=False, style=_STYLE),
            "dtype": W.Dropdown(options=list(DTYPES), value="bf16", description="dtype", style=_STYLE),
            "optimizer": W.Dropdown(options=list(OPTIMIZERS), value="adamw", description="optimizer",
                                    style=_STYLE),
            "device": W.Dropdown(options=["cuda", "cpu"], value="cuda", description="kernels of",
                                 style=_STYLE),
            "gradient_checkpointing": W.Checkbox(value=False, description="gradient checkpointing", indent=False),
            "simulate": W.Checkbox(value=False, description="simulate beside the estimate (fake tensors)",
                                   indent=False),
        }
        super().__init__(controls, figsize=(10.5, 4.0), title="Memory of one training step")

    def setup(self, fig: Figure) -> None:
        self.ax_bar, self.ax_seq = fig.subplots(1, 2, width_ratios=(1, 1.6))
        colors = dict(zip(TERMS, ("#4c72b0", "#dd8452", "#c44e52", "#8172b3", "#55a868", "#937860", "#da8bc3"),
                          strict=True))
        self.bars = {term: self.ax_bar.bar([0, 1], [0, 0], width=0.6, color=colors[term], label=term)
                     for term in TERMS}
        self.ax_bar.set_xticks([0, 1], ["estimate", "simulation"])
        self.ax_bar.set_ylabel("GiB")
        self.ax_bar.legend(fontsize=7, loc="upper left")
        self.bar_text = self.ax_bar.text(0.5, 0.98, "", transform=self.ax_bar.transAxes, ha="center", va="top",
                                         fontsize=8)
        (self.line_fixed,) = self.ax_seq.plot([], [], color=colors["weights"],
                                              label="weights + optimizer states + gradients")
        (self.line_growing,) = self.ax_seq.plot([], [], color=colors["activations"],
                                                label="activations + logits (grow with s)")
        (self.line_total,) = self.ax_seq.plot([], [], color="black", lw=1.5, label="peak (estimate)")
        self.cross_line = self.ax_seq.axvline(1, color="grey", ls="--", lw=0.8)
        self.current = self.ax_seq.axvline(1, color="black", ls=":", lw=0.8)
        self.ax_seq.set_xscale("log", base=2)
        self.ax_seq.set_yscale("log")
        self.ax_seq.set_xlabel("sequence length")
        self.ax_seq.set_ylabel("GiB")
        self.ax_seq.legend(fontsize=7, loc="upper left")

    def settings(self, **state: Any) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
        method = get_method(state["method"])
        hp = {"r": state["rank"]} if any(h.name == "r" for h in method.hyperparams) else {}
        kwargs = {k: state[k] for k in ("batch_size", "seq_len", "dtype", "optimizer", "gradient_checkpointing",
                                        "device")}
        return state["model"], state["method"], hp, kwargs

    def compute(self, **state: Any) -> MemoryView:
        model, method, hp, kwargs = self.settings(**state)
        result = estimate(model, method, hp, **kwargs)
        terms = dict.fromkeys(TERMS, 0)
        terms.update(result.terms())
        simulated = self._simulate(model, method, hp, kwargs) if state["simulate"] else None
        limit = result.activations_by_term and _context(model)
        top = max(min(limit or 32768, 32768), 256)
        seq_lens = sorted({int(v) for v in np.geomspace(64, top, 18)})
        fixed, growing, totals = [], [], []
        for s in seq_lens:
            point = estimate(model, method, hp, **dict(kwargs, seq_len=s))
            constant = point.weights + point.optimizer_states + point.master_weights
            fixed.append(constant + (point.gradients if point.peak_phase != "backward" else 0))
            growing.append(point.total - fixed[-1])
            totals.append(point.total)
        crossover = next((s for s, f, g in zip(seq_lens, fixed, growing, strict=True) if g > f), None)
        return MemoryView(result, terms, simulated, seq_lens, fixed, growing, totals, crossover)

    def _simulate(self, model: str, method: str, hp: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, int]:
        from survey_utils.memory.simulate import simulate

        kwargs = {k: v for k, v in kwargs.items() if k != "device"}  # the simulation runs CPU kernels
        key = (model, method, tuple(sorted(hp.items())), tuple(sorted(kwargs.items())))
        if key not in self._sim_cache:
            sim = simulate(model, method, hp, **kwargs)
            terms = dict.fromkeys(TERMS, 0)
            for category, value in sim.by_category.items():
                terms[SIM_TERMS.get(category, "batch")] += value
            terms["_peak"] = sim.peak
            self._sim_cache[key] = terms
        return self._sim_cache[key]

    def draw(self, view: MemoryView) -> None:
        gib = 2**30
        bottoms = [0.0, 0.0]
        for term in TERMS:
            heights = [view.terms[term] / gib, (view.simulated or {}).get(term, 0) / gib]
            for patch, bottom, height in zip(self.bars[term].patches, bottoms, heights, strict=True):
                patch.set_y(bottom)
                patch.set_height(height)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        top = max(bottoms) * 1.25 or 1
        self.ax_bar.set_ylim(0, top)
        est = view.estimate.total
        text = f"estimate {format_bytes(est)}"
        if view.simulated:
            sim = view.simulated["_peak"]
            text += f"  simulation (CPU) {format_bytes(sim)} ({100 * (est - sim) / sim:+.1f}%)"
        self.bar_text.set_text(text)
        self.line_fixed.set_data(view.seq_lens, [v / gib for v in view.fixed])
        self.line_growing.set_data(view.seq_lens, [v / gib for v in view.growing])
        self.line_total.set_data(view.seq_lens, [v / gib for v in view.totals])
        self.cross_line.set_xdata([view.crossover or view.seq_lens[-1]] * 2)
        self.cross_line.set_visible(view.crossover is not None)
        self.current.set_xdata([self.state["seq_len"]] * 2)
        self.ax_seq.set_xlim(view.seq_lens[0], view.seq_lens[-1])
        values = [v / gib for v in view.fixed + view.growing if v > 0]
        self.ax_seq.set_ylim(min(values) * 0.7, max(values) * 1.5)
        self.ax_seq.set_title(f"activations overtake at s = {view.crossover}" if view.crossover
                              else "activations stay below the fixed terms", fontsize=9)


def _context(model: str) -> int | None:
    from survey_utils.architecture import layout
    from survey_utils.zoo import load_config

    try:
        return layout(load_config(model)).max_positions
    except SurveyError:
        return None
