"""The figure registry: ``name -> callable(out_dir)``, with what each figure shows and where its data comes from.

A figure module decorates each figure function with :func:`figure`; :func:`run_figure` resets matplotlib
to the project style before each one, so a figure's bytes do not depend on what ran before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import matplotlib.pyplot as plt

from survey_utils.errors import SurveyError
from survey_utils.plotting import apply_style


class FigureUnavailable(SurveyError):
    """A figure whose inputs do not exist yet (a module not written, a CSV not generated)."""


@dataclass(frozen=True)
class FigureSpec:
    """One figure: its function, what it shows, its data source, and the survey figure it corresponds to."""

    name: str
    function: Callable[[Path], list[Path]]
    title: str
    shows: str
    source: str
    survey_counterpart: str
    stem: str = ""  # file name without suffix, when it differs from ``name``

    @property
    def file_stem(self) -> str:
        return self.stem or self.name


FIGURES: dict[str, FigureSpec] = {}


def figure(name: str, title: str, shows: str, source: str, survey_counterpart: str, stem: str = ""
           ) -> Callable[[Callable[[Path], list[Path]]], Callable[[Path], list[Path]]]:
    """Register a figure function ``f(out_dir) -> [paths]`` under ``name`` (files ``stem or name``.png/.svg)."""

    def register(function: Callable[[Path], list[Path]]) -> Callable[[Path], list[Path]]:
        if name in FIGURES:
            raise ValueError(f"figure '{name}' is registered twice")
        FIGURES[name] = FigureSpec(name, function, title, shows, source, survey_counterpart, stem)
        return function

    return register


def run_figure(name: str, out_dir: str | Path) -> list[Path]:
    """Make one figure from a clean matplotlib state (defaults, then the project style); return its files."""
    if name not in FIGURES:
        from survey_utils.errors import closest

        raise SurveyError(f"unknown figure '{name}'; choose one of: {closest(name, list(FIGURES))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with mpl.rc_context():
        mpl.rcdefaults()
        apply_style()
        try:
            return FIGURES[name].function(out)
        finally:
            plt.close("all")


def source_note(fig: mpl.figure.Figure, text: str) -> None:
    """Write the data source at the bottom left of ``fig`` (every figure states its source on itself)."""
    fig.text(0.005, 0.002, text, ha="left", va="bottom", fontsize=7, color="#444444", wrap=True)
