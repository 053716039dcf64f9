"""One palette for every figure and widget: a memory term, a family and a method keep one colour everywhere.

Torch-free and matplotlib-free (the lowest layer, next to :mod:`survey_utils.units`). Chapter 00 explains
the memory terms; chapters 01-04 and 07 draw methods with :func:`method_style`.
"""

from __future__ import annotations

from collections.abc import Sequence

TERM_COLOURS = {
    "weights": "#4d4d4d",
    "optimizer states": "#7570b3",
    "gradients": "#e7298a",
    "optimizer step": "#e6ab02",
    "activations": "#1b9e77",
    "logits and loss": "#66a61e",
    "batch": "#a6761d",
}
"""The memory terms of one training step (chapter 00), in stacking order."""

MEMORY_TERMS = tuple(TERM_COLOURS)

FAMILY_COLOURS = {
    "baseline": "#4d4d4d",
    "adapters": "#1b9e77",
    "soft_prompts": "#d95f02",
    "selective": "#7570b3",
    "reparameterized": "#e7298a",
    "hybrid": "#66a61e",
    "quantized": "#e6ab02",
    "multi_task": "#1f78b4",
}
"""One colour per method family (the registry's ``Method.family``)."""

# Twenty distinguishable colours (matplotlib's tab20, dark shades first); markers tell apart the methods
# past the twentieth.
METHOD_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
                  "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
METHOD_MARKERS = ("o", "s", "^", "D", "v", "P")

HIGHLIGHT = "#000000"
"""The current setting (a marker, a line) in every explorer."""
NOT_APPLICABLE = "#b00020"
"""Text of an n/a or an error."""


def method_style(name: str, order: Sequence[str]) -> tuple[str, str]:
    """``(colour, marker)`` of method ``name``, by its place in ``order`` (the registry's order of all methods).

    Callers pass the *whole* registry's names, so a method has the same style in every figure and widget.
    """
    index = list(order).index(name) if name in order else len(order)
    return (METHOD_COLOURS[index % len(METHOD_COLOURS)],
            METHOD_MARKERS[(index // len(METHOD_COLOURS)) % len(METHOD_MARKERS)])
