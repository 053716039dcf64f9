"""The equal-budget explorer of chapter 01: a method beside a reference method with the same trainable count.

On top, the :class:`MethodExplorer` panels; below, the chosen method next to the reference (chapter 01
passes LoRA) at the rank whose count is closest to the method's, compared in trainable parameters and in the memory of one training step
(chapter 00's memory model). Equal parameters rarely mean equal memory: that is the point of the panel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from survey_utils.experiments.ch01_adapters import rank_for_budget
from survey_utils.memory.estimate import MemoryEstimate, estimate
from survey_utils.methods import get_method
from survey_utils.widgets.params import MethodExplorer, ParamsView
from survey_utils.zoo import load_config

MEMORY_TERMS = ("weights", "optimizer states", "activations", "logits and loss", "gradients", "optimizer step",
                "batch")


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
        self.ax_budget.clear()
        self.ax_budget.barh(labels, [view.trainable, view.reference_trainable], color=["#1b9e77", "#e7298a"])
        self.ax_budget.set(xlabel="trainable parameters", title=f"equal budget on {view.model}")
        self.ax_memory.clear()
        for row, (_, mem) in enumerate(view.memory):
            left = 0.0
            for term in MEMORY_TERMS:
                gib = mem.terms().get(term, 0) / 2**30
                self.ax_memory.barh(row, gib, left=left, label=term if row == 0 else None)
                left += gib
            own = sum(v for k, v in mem.activations_by_term.items() if k.startswith("method:")) / 2**30
            self.ax_memory.text(left, row, f" {left:.1f} GiB (method's own: {own:.2f})", va="center", fontsize=8)
        self.ax_memory.set_yticks([0, 1], labels)
        self.ax_memory.set(xlabel="GiB at the peak",
                           title=f"one training step, batch {self.batch_size} x {self.seq_len}")
        self.ax_memory.legend(fontsize=7, loc="lower right")
