"""Plot style and deterministic figure files.

Every figure of the project goes through :func:`save_figure`, which writes PNG and SVG with no timestamp,
no software tag and a fixed SVG id salt, so regenerating a figure gives byte-identical files.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure

from survey_utils import palette

# The palette lives in survey_utils.palette (the lowest layer); re-exported for the figure modules.
FAMILY_COLOURS = palette.FAMILY_COLOURS
TERM_COLOURS = palette.TERM_COLOURS


def method_style(name: str) -> tuple[str, str]:
    """``(colour, marker)`` of a registered method, the same in every figure and widget (registry order)."""
    from survey_utils.methods import list_methods

    return palette.method_style(name, [m.name for m in list_methods()])


def method_colour(name: str) -> str:
    """The colour of a registered method in every figure and widget."""
    return method_style(name)[0]


_METADATA = {
    "png": {"Software": None},
    "svg": {"Date": None, "Creator": None},
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
}


def apply_style() -> None:
    """The project's plot style: seaborn's whitegrid, a fixed font and a fixed SVG hash salt."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    mpl.rcParams["svg.hashsalt"] = "peft-survey-companion"
    mpl.rcParams["svg.fonttype"] = "path"
    mpl.rcParams["font.family"] = "DejaVu Sans"
    mpl.rcParams["figure.dpi"] = 100


def save_figure(fig: Figure, out_dir: str | Path, name: str, formats: tuple[str, ...] = ("png", "svg"),
                dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``out_dir/name.<format>`` for each format, deterministically; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context({"svg.hashsalt": "peft-survey-companion"}):
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            fig.savefig(path, format=fmt, dpi=dpi, metadata=_METADATA.get(fmt, {}), bbox_inches="tight")
            paths.append(path)
    return paths


def human(n: float) -> str:
    """``6742609920 -> '6.74B'``: counts and bytes for axis labels."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


# Renard's R10 series: ten steps a decade, each ~25% above the one before.
_R10 = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0, 10.0)


def nice_ceiling(value: float) -> float:
    """The smallest number of the R10 series (1, 1.25, 1.6, 2, 2.5, ... times a power of ten) at or above
    ``value``; 1 for a value that is not positive and finite.

    An axis limit from it contains the data and stays put while the data moves by less than a step, so a
    slider's redraw keeps its frame (axes, ticks) and draws only what moved (``widgets/base.py``).
    """
    if not (value > 0 and math.isfinite(value)):
        return 1.0
    power = 10.0 ** math.floor(math.log10(value))
    return next(step * power for step in _R10 if step * power >= value * (1 - 1e-12))


def nice_log_bounds(low: float, high: float, per_decade: int = 4) -> tuple[float, float]:
    """``(low, high)`` widened to the nearest ``10**(k / per_decade)`` below and above, for a log axis;
    positive finite inputs only (the caller's data), else ``(low, high)`` unchanged."""
    if not (0 < low <= high and math.isfinite(high)):
        return low, high
    return (10.0 ** (math.floor(math.log10(low) * per_decade + 1e-9) / per_decade),
            10.0 ** (math.ceil(math.log10(high) * per_decade - 1e-9) / per_decade))
