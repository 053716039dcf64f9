"""Small static charts the chapters draw from data they computed (kept here so a chapter cell stays short)."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from survey_utils.palette import METHOD_COLOURS
from survey_utils.plotting import apply_style


def stacked_terms(data: dict[str, dict[str, int]], xlabel: str, unit: int = 2**20,
                  legend_title: str = "") -> Figure:
    """One horizontal bar per row of ``data`` (``row -> {term: bytes}``), stacked by term, in ``unit`` bytes;
    the legend below the bars (never over them), each bar's total at its end. Chapter 04 draws the tensors each
    LoRA-family method saves for backward with it."""
    apply_style()
    terms = sorted({k for row in data.values() for k in row})
    with plt.ioff():
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(data) + 1.8), layout="constrained")
    left = [0.0] * len(data)
    for colour, term in zip(METHOD_COLOURS, terms, strict=False):
        widths = [data[m].get(term, 0) / unit for m in data]
        ax.barh(list(data), widths, left=left, label=term, color=colour)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for row, total in enumerate(left):
        ax.text(total, row, f" {total:,.1f}", va="center", fontsize=8)
    ax.set_xlim(0, max(left) * 1.15 or 1)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncols=3, frameon=False,
              title=legend_title or None, title_fontsize=8)
    return fig
