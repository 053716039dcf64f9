"""The equal-budget explorer of chapter 01: a method beside a reference method with the same trainable count.

On top, the :class:`MethodExplorer` panels; below, the chosen method next to the reference (chapter 01
passes LoRA) at the rank whose count is closest to the method's, compared in trainable parameters and in the memory of one training step
(chapter 00's memory model). Equal parameters rarely mean equal memory: that is the point of the panel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import matplotlib as mpl
from matplotlib.figure import Figure

from survey_utils.experiments.ch01_adapters import rank_for_budget
from survey_utils.memory.closed_form import MemoryEstimate, estimate
from survey_utils.methods import get_method
from survey_utils.palette import MEMORY_TERMS, TERM_COLOURS
from survey_utils.plotting import human, method_colour, nice_ceiling
from survey_utils.units import format_bytes
from survey_utils.widgets.base import TITLE_Y
from survey_utils.widgets.params import MethodExplorer, ParamsView
from survey_utils.zoo import load_config


@dataclass
class BudgetView(ParamsView):
    """:class:`ParamsView` plus the equal-budget comparison."""

    reference_rank: int = 0
    reference_trainable: int = 0
    memory: list[tuple[str, MemoryEstimate]] = field(default_factory=list)


class EqualBudgetExplorer(MethodExplorer):
    """:class:`MethodExplorer` with the method and ``reference`` (a method with a rank ``r``) at an equal
    budget, in parameters and in memory."""

    def __init__(self, methods: list[str], *args: Any, reference: str, batch_size: int = 8, seq_len: int = 512,
                 **kwargs: Any) -> None:
        self.reference = get_method(reference)
        self.batch_size, self.seq_len = batch_size, seq_len
        kwargs.setdefault("figsize", (10, 7))
        super().__init__(methods, *args, **kwargs)

    def setup(self, fig: Figure) -> None:
        top, bottom = fig.subfigures(2, 1)
        super().setup(top)
        self.ax_budget, self.ax_memory = bottom.subplots(1, 2)
        self.budget_bars = self.ax_budget.barh([0, 1], [1, 1])
        self.budget_labels = [self.ax_budget.text(0, i, "", va="center", fontsize=8) for i in (0, 1)]
        # The rows' names are texts where tick labels would be: they change with the reference's rank, and a
        # text redraws alone while tick labels would redraw the whole figure (widgets/base.py).
        self.budget_names = [self.ax_budget.text(-0.02, i, "", transform=self.ax_budget.get_yaxis_transform(),
                                                 ha="right", va="center", fontsize=mpl.rcParams["ytick.labelsize"])
                             for i in (0, 1)]
        self.ax_budget.set_yticks([0, 1], ["", ""])
        self.ax_budget.invert_yaxis()
        self.ax_budget.set_xlabel("trainable parameters")
        self.memory_bars = {term: self.ax_memory.barh([0, 1], [0, 0], color=TERM_COLOURS[term], label=term)
                            for term in MEMORY_TERMS}
        self.memory_labels = [self.ax_memory.text(0, i, "", va="center", fontsize=8) for i in (0, 1)]
        self.memory_names = [self.ax_memory.text(-0.02, i, "", transform=self.ax_memory.get_yaxis_transform(),
                                                 ha="right", va="center", fontsize=mpl.rcParams["ytick.labelsize"])
                             for i in (0, 1)]
        self.ax_memory.set_yticks([0, 1], ["", ""])
        self.ax_memory.invert_yaxis()
        self.ax_memory.set_xlabel("GiB at the peak of one training step")
        self.ax_memory.set_title(f"one training step, batch {self.batch_size} x {self.seq_len} tokens", fontsize=10)
        self.ax_memory.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncols=4, frameon=False)

    def compute(self, model: str, method: str, hp: dict[str, Any]) -> BudgetView:
        base = super().compute(model, method, hp)
        config = load_config(model)
        rank = rank_for_budget(config, base.trainable, self.reference)
        setting = {"batch_size": self.batch_size, "seq_len": self.seq_len}
        memory = [(method, estimate(config, method, hp, **setting)),
                  (self._reference_label(rank), estimate(config, self.reference, {"r": rank}, **setting))]
        return BudgetView(**vars(base), reference_rank=rank,
                          reference_trainable=self.reference.count(config, r=rank), memory=memory)

    def _reference_label(self, rank: int) -> str:
        return f"{self.reference.name} r={rank}"

    def draw(self, view: BudgetView) -> None:
        super().draw(view)
        labels = [view.method, self._reference_label(view.reference_rank)]
        counts = [view.trainable, view.reference_trainable]
        for bar, text, name, count in zip(self.budget_bars, self.budget_labels, [view.method, self.reference.name],
                                          counts, strict=True):
            bar.set_width(count)
            bar.set_color(method_colour(name))
            text.set_position((count, text.get_position()[1]))
            text.set_text(f" {human(count)}")
        for text, label in zip(self.budget_names, labels, strict=True):
            text.set_text(label)
        self.ax_budget.set_xlim(0, nice_ceiling(max(counts) * 1.3))  # a step, not a jitter: the frame stays
        self.ax_budget.set_title(f"equal budget on {view.model}", fontsize=10, y=TITLE_Y)
        lefts = [0.0, 0.0]
        for term in MEMORY_TERMS:
            for row, (patch, (_, mem)) in enumerate(zip(self.memory_bars[term].patches, view.memory, strict=True)):
                gib = mem.terms().get(term, 0) / 2**30
                patch.set_x(lefts[row])
                patch.set_width(gib)
                lefts[row] += gib
        for row, (text, (_, mem)) in enumerate(zip(self.memory_labels, view.memory, strict=True)):
            own = sum(v for k, v in mem.activations_by_term.items() if k.startswith("method:"))
            text.set_position((lefts[row], row))
            text.set_text(f" {format_bytes(mem.total)}\n (method's own activations {format_bytes(own)})")
        for text, label in zip(self.memory_names, labels, strict=True):
            text.set_text(label)
        self.ax_memory.set_xlim(0, nice_ceiling(max(lefts) * 2.3))

    def dynamic_artists(self) -> list[Any]:
        return [*super().dynamic_artists(), *self.budget_bars, *self.budget_labels, *self.budget_names,
                self.ax_budget.title, *(p for bars in self.memory_bars.values() for p in bars.patches),
                *self.memory_labels, *self.memory_names]
