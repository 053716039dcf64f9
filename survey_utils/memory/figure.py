"""The validation figure: estimated vs simulated peak over the benchmark grid (chapter 00)."""

from __future__ import annotations

import csv
from pathlib import Path

from survey_utils.zoo import DATA_DIR

VALIDATION_CSV = DATA_DIR / "memory_validation.csv"
FIGURE_NAME = "memory_estimate_vs_simulation"


def read_validation(csv_path: str | Path | None = None) -> list[dict[str, str]]:
    from survey_utils.errors import SurveyError

    path = Path(csv_path) if csv_path else VALIDATION_CSV
    if not path.is_file():
        raise SurveyError(f"'{path}' does not exist: run `python benchmarks/memory_grid.py` first")
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def draw_validation(out_dir: Path, csv_path: str | Path | None = None) -> list[Path]:
    """Write ``memory_estimate_vs_simulation.png`` and ``.svg`` (no dates, fixed svg hash salt)."""
    import matplotlib.pyplot as plt

    from survey_utils.plotting import apply_style, method_style, save_figure

    rows = [r for r in read_validation(csv_path) if r["simulated_bytes"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    apply_style()
    with plt.rc_context({"svg.fonttype": "path"}):
        fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.6))
        methods = sorted({r["method"] for r in rows})
        for method in methods:
            chosen = [r for r in rows if r["method"] == method]
            sim = [int(r["simulated_bytes"]) / 2**30 for r in chosen]
            est = [int(r["estimate_bytes"]) / 2**30 for r in chosen]
            err = [100 * float(r["relative_error"]) for r in chosen]
            colour, marker = method_style(method)  # the palette: one style per method, in every figure
            left.scatter(sim, est, marker=marker, color=colour, label=method, alpha=0.8)
            right.scatter(sim, err, marker=marker, color=colour, label=method, alpha=0.8)
        values = [int(r["simulated_bytes"]) / 2**30 for r in rows]
        low, high = min(values) * 0.8, max(values) * 1.25
        left.plot([low, high], [low, high], color="black", lw=0.8)
        left.fill_between([low, high], [low * 0.95, high * 0.95], [low * 1.05, high * 1.05], color="grey",
                          alpha=0.2, label="±5%")
        for ax in (left, right):
            ax.set_xscale("log")
            ax.set_xlabel("simulated peak (GiB, fake tensors + MemTracker)")
        left.set_yscale("log")
        left.set_ylabel("estimated peak (GiB, closed form)")
        left.set_title("estimate vs simulation, one training step")
        right.axhspan(-5, 5, color="grey", alpha=0.2, label="±5% (both panels)")
        right.axhline(0, color="black", lw=0.8)
        right.set_ylabel("estimate error (%)")
        right.set_title(f"{len(rows)} settings: model x method x batch x seq x checkpointing")
        right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, frameon=False,
                     title="method", title_fontsize=8)
        fig.tight_layout()
        paths = save_figure(fig, out_dir, FIGURE_NAME, dpi=110)
        plt.close(fig)
    return paths
