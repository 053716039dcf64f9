"""The memory view (chapter 00, reused by every method chapter): where a training step's memory goes.

Controls: model, method, rank (enabled for methods with a hyper-parameter ``r``), batch size, sequence
length, dtype, optimizer, the device whose kernels are counted (CUDA, or CPU as the simulation runs),
gradient checkpointing, and "simulate" (runs the fake-tensor step on CPU kernels; seconds for 7B models, so
on demand, in a background thread: the message line shows progress and the other controls stay live).

Left: a stacked bar of the estimate's terms at the peak (:meth:`MemoryEstimate.terms`), with the simulated
peak's categories beside it when asked. Right: against sequence length, each line exactly what its label
says, from the estimate at that length:

- weights + optimizer states: ``weights + optimizer_states + master_weights`` (do not grow with s);
- activations + logits and loss: ``activations + loss_transient`` (the backward phase, grows with s);
- gradients + optimizer step: ``gradients + optimizer_transient`` (the optimizer phase);
- peak: ``total`` = the first + the batch + the larger phase (with checkpointing the loss transients and the
  recomputed block do not coexist, so the backward phase is smaller than the activations + logits line);

with the current length (dotted) and the length where activations + logits overtake the weights and
optimizer states (dashed) marked.
"""

from __future__ import annotations

import functools
import html
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import MemoryEstimate, estimate
from survey_utils.methods.registry import get_method, list_methods
from survey_utils.palette import HIGHLIGHT, MEMORY_TERMS, TERM_COLOURS
from survey_utils.plotting import nice_ceiling
from survey_utils.units import DTYPES, OPTIMIZERS, format_bytes
from survey_utils.widgets.base import TITLE_Y, WORKER_THREAD, Explorer
from survey_utils.zoo import list_models

TERMS = MEMORY_TERMS
SIM_TERMS = {"Parameter": "weights", "Buffer": "weights", "Optstate": "optimizer states", "Gradient": "gradients",
             "Activation": "activations", "Temp": "logits and loss", "Other": "batch"}
GIB = 2**30
LINES = {
    "fixed": ("weights + optimizer states (do not grow with s)", TERM_COLOURS["weights"], "-"),
    "growing": ("activations + logits and loss at the backward peak (grow with s)", TERM_COLOURS["activations"], "-"),
    "step": ("gradients + optimizer step (optimizer phase)", TERM_COLOURS["gradients"], "-"),
    "totals": ("peak = first line + batch + larger phase", HIGHLIGHT, "-"),
}
RANK_TOOLTIP = "{method} has no rank hyper-parameter r: the slider does not apply"
_STYLE = {"description_width": "initial"}


@dataclass
class MemoryView:
    """What the panels show; tests read it. Byte lists are per entry of ``seq_lens``."""

    estimate: MemoryEstimate
    terms: dict[str, int]
    simulated: dict[str, int] | None
    seq_len: int = 0
    seq_lens: list[int] = field(default_factory=list)
    fixed: list[int] = field(default_factory=list)
    growing: list[int] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    totals: list[int] = field(default_factory=list)
    crossover: int | None = None
    simulate: bool = False
    sim_pending: bool = False
    sim_key: tuple | None = None
    notes: list[str] = field(default_factory=list)


class MemoryExplorer(Explorer):
    """Estimate (and on demand simulate) one training step's peak memory, term by term.

    ``background=False`` runs the simulation in the callback (scripts and tests); the default runs it in a
    thread with progress in the message line, so a 7B simulation never blocks the other controls.
    """

    def __init__(self, models: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                 model: str = "llama-2-7b", method: str | None = None, background: bool = True) -> None:
        models = list(models or list_models())
        methods = list(methods or [m.name for m in list_methods()])
        self.background = background
        self._sim_cache: dict[tuple, dict[str, int]] = {}
        self._sim_errors: dict[tuple, str] = {}
        self._sim_thread: threading.Thread | None = None
        self._sim_running: tuple | None = None
        self._progress = ""
        self.sim_seconds: float | None = None
        controls = {
            "model": W.Dropdown(options=models, value=model if model in models else models[0],
                                description="model", style=_STYLE),
            "method": W.Dropdown(options=methods, value=method if method in methods else methods[0],
                                 description="method", style=_STYLE),
            "rank": W.IntSlider(value=8, min=1, max=256, description="rank r", continuous_update=False,
                                style=_STYLE),
            "batch_size": W.IntSlider(value=1, min=1, max=64, description="batch", continuous_update=False,
                                      style=_STYLE),
            "seq_len": W.IntSlider(value=512, min=16, max=8192, step=16, description="seq len (tokens)",
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
        super().__init__(controls, figsize=(11, 4.3), title="Memory of one training step")

    # --- controls that do not apply ---------------------------------------------------------------------
    def _sync_controls(self) -> None:
        """Disable the rank slider (with a tooltip saying why) for a method without ``r``."""
        method = get_method(self.controls["method"].value)
        has_rank = any(h.name == "r" for h in method.hyperparams)
        rank = self.controls["rank"]
        rank.disabled = not has_rank
        rank.tooltip = None if has_rank else RANK_TOOLTIP.format(method=method.name)

    def update(self) -> None:
        self._sync_controls()
        super().update()
        view = self.view
        if view is not None and view.sim_pending and self.error is None:
            self._start_simulation(view)

    # --- panels -----------------------------------------------------------------------------------------
    def setup(self, fig: Figure) -> None:
        self.ax_bar, self.ax_seq = fig.subplots(1, 2, width_ratios=(1, 1.7))
        self.bars = {term: self.ax_bar.bar([0, 1], [0, 0], width=0.6, color=TERM_COLOURS[term], label=term)
                     for term in TERMS}
        self.ax_bar.set_ylabel("GiB at the peak")
        self.ax_bar.legend(handles=[self.bars[t] for t in reversed(TERMS)], fontsize=7, loc="upper left",
                           bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False, title="term",
                           title_fontsize=7)
        self.bar_values = [self.ax_bar.text(x, 0, "", ha="center", va="bottom", fontsize=7) for x in (0, 1)]
        self.lines = {}
        for key, (label, colour, style) in LINES.items():
            (self.lines[key],) = self.ax_seq.plot([], [], color=colour, ls=style, lw=2.0 if key == "totals" else 1.5,
                                                  label=label)
        self.cross_line = self.ax_seq.axvline(1, color="grey", ls="--", lw=0.8)
        self.current = self.ax_seq.axvline(1, color=HIGHLIGHT, ls=":", lw=1.0)
        self.ax_seq.set_xscale("log", base=2)
        self.ax_seq.set_yscale("log")
        plain_log_axes(self.ax_seq)
        self.ax_seq.set_xlabel("sequence length s (tokens)")
        self.ax_seq.set_ylabel("GiB")
        handles = [*self.lines.values(),
                   Line2D([], [], color=HIGHLIGHT, ls=":", lw=1.0, label="current s"),
                   Line2D([], [], color="grey", ls="--", lw=0.8, label="activations + logits overtake the first line")]
        self.ax_seq.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                           borderaxespad=0, frameon=False)

    def dynamic_artists(self) -> list[Any]:
        return [*(p for bars in self.bars.values() for p in bars.patches), *self.bar_values, *self.lines.values(),
                self.cross_line, self.current, self.ax_bar.title, self.ax_seq.title]

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
        view = MemoryView(result, terms, None, seq_len=kwargs["seq_len"], simulate=bool(state["simulate"]))
        if state["simulate"]:
            key = _sim_key(model, method, hp, kwargs)
            view.sim_key = key
            if key in self._sim_errors:
                view.notes.append(f"simulation failed: {self._sim_errors[key]}")
            elif key in self._sim_cache or not self.background:
                view.simulated = self._simulate(key)
            else:
                view.sim_pending = True
        limit = _context(model)
        top = max(min(limit or 32768, 32768), 256)
        others = tuple(sorted((k, type(v).__name__, v) for k, v in kwargs.items() if k != "seq_len"))
        for s, fixed, growing, step, total in _seq_sweep(model, method, tuple(sorted(hp.items())), others, top):
            view.seq_lens.append(s)
            view.fixed.append(fixed)
            view.growing.append(growing)
            view.step.append(step)
            view.totals.append(total)
        if not view.seq_lens:
            raise SurveyError(f"{method} on {model}: no sequence length from 64 to {top} fits")
        view.crossover = next((s for s, f, g in zip(view.seq_lens, view.fixed, view.growing, strict=True)
                               if g > f), None)
        if not any(view.step):
            view.notes.append("no gradients or optimizer step: nothing is trained through backprop")
        return view

    # --- the simulation: cached, in a thread by default ---------------------------------------------------
    def _simulate(self, key: tuple) -> dict[str, int]:
        if key not in self._sim_cache:
            self._sim_cache[key] = _run_simulation(key)
        return self._sim_cache[key]

    def _start_simulation(self, view: MemoryView) -> None:
        key = view.sim_key
        if self._sim_running is not None:
            return  # one at a time; when it ends, update() starts the one the controls ask for now
        self._sim_running = key
        started = time.perf_counter()
        self._progress = (f"&#8987; simulating {html.escape(key[0])} / {html.escape(key[1])} on fake tensors "
                          "(CPU kernels; several seconds for 7B models): the other controls stay live")
        self.message.value = self._progress

        def work() -> None:
            try:
                self._sim_cache[key] = _run_simulation(key)
            except SurveyError as error:
                self._sim_errors[key] = str(error)
            except Exception as error:  # a thread has nowhere to raise to: show one line
                self._sim_errors[key] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            finally:
                self._sim_running = None
                self.sim_seconds = time.perf_counter() - started
            self.update()

        self._sim_thread = threading.Thread(target=work, name=f"{WORKER_THREAD}-memory-simulation", daemon=True)
        self._sim_thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a running simulation (scripts and tests)."""
        while self._sim_thread is not None and self._sim_thread.is_alive():
            self._sim_thread.join(timeout)
            if timeout is not None:
                break

    def draw(self, view: MemoryView) -> None:
        show_sim = view.simulate
        columns = [view.terms, view.simulated or {}]
        bottoms = [0.0, 0.0]
        for term in TERMS:
            heights = [columns[0].get(term, 0) / GIB, columns[1].get(term, 0) / GIB if show_sim else 0.0]
            for patch, bottom, height in zip(self.bars[term].patches, bottoms, heights, strict=True):
                patch.set_y(bottom)
                patch.set_height(height)
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        est = view.estimate.total
        self.bar_values[0].set_position((0, bottoms[0]))
        self.bar_values[0].set_text(format_bytes(est))
        if view.simulated:
            sim = view.simulated["_peak"]
            self.bar_values[1].set_position((1, bottoms[1]))
            self.bar_values[1].set_text(f"{format_bytes(sim)}\n({100 * (est - sim) / sim:+.1f}% est.)")
        else:
            self.bar_values[1].set_text("")
        if show_sim:
            label = "simulation\n(CPU)" if view.simulated else ("simulation\n(running...)" if view.sim_pending
                                                                else "simulation\n(failed)")
            self.ax_bar.set_xticks([0, 1], ["estimate", label])
            self.ax_bar.set_xlim(-0.6, 1.6)
        else:
            self.ax_bar.set_xticks([0], ["estimate"])
            self.ax_bar.set_xlim(-0.6, 0.6)
        self.ax_bar.set_ylim(0, nice_ceiling(max(bottoms) * 1.2))  # room for the value labels; a step, not a jitter
        self.ax_bar.set_title(f"peak {format_bytes(est)} ({view.estimate.peak_phase})", fontsize=9, y=TITLE_Y)

        for key, line in self.lines.items():
            line.set_data(view.seq_lens, [v / GIB for v in getattr(view, key)])
        self.cross_line.set_xdata([view.crossover or view.seq_lens[-1]] * 2)
        self.cross_line.set_visible(view.crossover is not None)
        self.current.set_xdata([view.seq_len] * 2)
        self.ax_seq.set_xlim(min(view.seq_lens[0], view.seq_len) / 1.1, max(view.seq_lens[-1], view.seq_len) * 1.1)
        low, high = plotted_range(view)
        self.ax_seq.set_ylim(low / 1.5, high * 1.5)
        title = (f"activations + logits overtake at s = {view.crossover}" if view.crossover
                 else "activations + logits stay below the weights + optimizer states")
        self.ax_seq.set_title(title, fontsize=9, y=TITLE_Y)
        if self._sim_running is not None:
            self.message.value = self._progress
        elif view.notes:
            self.message.value = html.escape("; ".join(view.notes))


@functools.lru_cache(maxsize=128)
def _seq_sweep(model: str, method: str, hp: tuple, others: tuple, top: int) -> tuple[tuple[int, ...], ...]:
    """``(s, fixed, growing, step, total)`` bytes at each swept length; the same for every current ``s``, so
    cached: moving the sequence-length slider costs one estimate, not nineteen."""
    kwargs = {k: v for k, _type, v in others}
    points = []
    for s in sorted({int(v) for v in np.geomspace(64, top, 18)}):
        try:
            point = estimate(model, method, dict(hp), **kwargs, seq_len=s)
        except SurveyError:
            continue  # a length the method cannot take (a prompt past the context): no point there
        points.append((s, point.weights + point.optimizer_states + point.master_weights, point.backward_peak,
                       point.gradients + point.optimizer_transient, point.total))
    return tuple(points)


def plain_log_axes(ax: Any) -> None:
    """Log axes labelled 1, 2, 5, 10, ... in plain numbers; minor ticks unlabelled (fewer texts to render)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(NullFormatter())


def plotted_range(view: MemoryView) -> tuple[float, float]:
    """The smallest and largest positive value (GiB) the right panel plots (zeros cannot sit on a log axis)."""
    values = [v / GIB for key in LINES for v in getattr(view, key) if v > 0]
    return (min(values), max(values)) if values else (1e-3, 1.0)


def _sim_key(model: str, method: str, hp: dict[str, Any], kwargs: dict[str, Any]) -> tuple:
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}  # the simulation runs CPU kernels
    return (model, method, tuple(sorted(hp.items())), tuple(sorted(kwargs.items())))


def _run_simulation(key: tuple) -> dict[str, int]:
    from survey_utils.memory.simulation import simulate

    model, method, hp, kwargs = key
    sim = simulate(model, method, dict(hp), **dict(kwargs))
    terms = dict.fromkeys(TERMS, 0)
    for category, value in sim.by_category.items():
        terms[SIM_TERMS.get(category, "batch")] += value
    terms["_peak"] = sim.peak
    return terms


def _context(model: str) -> int | None:
    from survey_utils.architecture import layout
    from survey_utils.zoo import load_config

    try:
        return layout(load_config(model)).max_positions
    except SurveyError:
        return None
