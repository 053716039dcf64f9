"""Reserved memory against the replayed allocator and against published peaks: data and figure (chapter 06).

``benchmarks/reserved_validation.py`` writes ``data/reserved_validation.csv`` (simulated steps replayed through
:mod:`survey_utils.memory.allocator`) and draws :func:`draw_reserved` into ``figures/``; chapter 06 draws the same
figure from the committed CSV. :func:`published_rows` puts each transcribed published peak
(``data/published_peaks.csv``, with its source) beside our prediction of the same kind (allocated, reserved, or
reserved + CUDA context for what ``nvidia-smi`` shows): published numbers validate, they never calibrate.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

from survey_utils.errors import SurveyError
from survey_utils.zoo import DATA_DIR

RESERVED_CSV = DATA_DIR / "reserved_validation.csv"
PUBLISHED_CSV = DATA_DIR / "published_peaks.csv"
FIGURE = "reserved_validation"


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise SurveyError(f"'{path}' does not exist: run `python benchmarks/reserved_validation.py` first")
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def published_rows(path: Path = PUBLISHED_CSV) -> list[dict[str, Any]]:
    """Each published figure beside the estimate and the closed-form reserved on its GPUs and sharding, with
    ``predicted`` of the published kind (``unstated`` is compared with reserved, what most logs show) and
    ``error`` = (predicted - published) / published."""
    from survey_utils.advisor import point
    from survey_utils.memory.allocator import CUDA_CONTEXT_BYTES
    from survey_utils.memory.closed_form import estimate
    from survey_utils.memory.sharding import Sharding
    from survey_utils.methods import get_method
    from survey_utils.zoo import load_config

    if not path.is_file():
        return []
    out = []
    for row in read_rows(path):
        hp = dict(item.split("=", 1) for item in row["hp"].split()) if row["hp"] else {}
        m = get_method(row["method"])
        hp = m.parse_settings([f"{k}={v}" for k, v in hp.items()])
        ckpt = row["gradient_checkpointing"] == "yes"
        est = estimate(row["model"], m, hp, batch_size=int(row["batch_size"]), seq_len=int(row["seq_len"]),
                       dtype=row["dtype"], optimizer=row["optimizer"], gradient_checkpointing=ckpt,
                       quantization=m.base_quantization)
        gpu = point(load_config(row["model"]), m, est, Sharding(row["sharding"], int(row["gpus"]), row["offload"]),
                    ckpt)
        kind = row["kind"]
        predicted = gpu.allocated if kind == "allocated" else gpu.reserved + (CUDA_CONTEXT_BYTES if kind == "device"
                                                                             else 0)
        published = float(row["published_gib"]) * 2**30
        out.append(dict(row, estimate=gpu.allocated, closed_form_reserved=gpu.reserved, predicted=predicted,
                        error=(predicted - published) / published))
    return out


def reserved_above_allocated(row: dict[str, Any]) -> tuple[float, float]:
    """Percent above the simulated allocated peak: the replayed reserved, and the closed form's."""
    allocated = int(row["simulated_allocated"])
    return (100 * (int(row["replayed_reserved"]) - allocated) / allocated,
            100 * (int(row["closed_form_reserved"]) - allocated) / allocated)


def summary(rows: list[dict[str, Any]], published: list[dict[str, Any]]) -> list[str]:
    """The numbers the chapter's closing note quotes: replay overhead, closed form vs replay, published by source."""
    above = [reserved_above_allocated(r)[0] for r in rows]
    errors = [abs(float(r["closed_form_error"])) for r in rows]
    lines = [f"replay grid ({len(rows)} simulated steps): reserved above allocated median {statistics.median(above):.2f}%,"
             f" worst {max(above):.2f}%; closed-form reserved vs replay median {100 * statistics.median(errors):.2f}%,"
             f" worst {100 * max(errors):.2f}%"]
    for source in sorted({r["source_short"] for r in published}):
        chosen = [r for r in published if r["source_short"] == source]
        errs = [abs(r["error"]) for r in chosen]
        complete = sum(r["settings_complete"] == "yes" for r in chosen)
        lines.append(f"published, {source}: {len(chosen)} rows, |error| median {100 * statistics.median(errs):.1f}%, "
                     f"worst {100 * max(errs):.1f}% (every setting stated in {complete})")
    return lines


def draw_reserved(rows: list[dict[str, Any]], published: list[dict[str, Any]]) -> Any:
    """Left: reserved above allocated per simulated step, replayed (filled) and closed form (hollow). Right:
    published peaks (grey) beside ours of the same kind (blue). Returns the figure (not saved)."""
    import matplotlib.pyplot as plt

    from survey_utils.plotting import apply_style, method_style

    apply_style()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.6))
    for method in sorted({r["method"] for r in rows}):
        chosen = [r for r in rows if r["method"] == method]
        colour, marker = method_style(method)
        x = [int(r["simulated_allocated"]) / 2**30 for r in chosen]
        above = [reserved_above_allocated(r) for r in chosen]
        left.scatter(x, [a for a, _ in above], marker=marker, color=colour, label=f"{method}: replayed reserved")
        left.scatter(x, [c for _, c in above], marker=marker, facecolors="none", edgecolors=colour,
                     label=f"{method}: closed form")
    left.set_xscale("log")
    left.set_xlabel("allocated peak of the simulated step (GiB)")
    left.set_ylabel("reserved above allocated (%)")
    left.set_title(f"caching allocator: replay vs closed form ({len(rows)} settings)")
    left.legend(fontsize=7, frameon=False)
    if published:
        labels = [f"{r['model']} {r['method']}, {r['gpu']}" for r in published]
        y = range(len(published))
        right.barh([i + 0.2 for i in y], [float(r["published_gib"]) for r in published], height=0.4,
                   color="#999999", label="published")
        right.barh([i - 0.2 for i in y], [r["predicted"] / 2**30 for r in published], height=0.4,
                   color="#1f77b4", label="ours (same kind: allocated / reserved / device)")
        right.set_yticks(list(y), labels, fontsize=7)
        right.set_xlabel("GiB")
        right.legend(fontsize=7, frameon=False, loc="lower right")
        complete = sum(r["settings_complete"] == "yes" for r in published)
        right.set_title(f"published peaks ({complete} of {len(published)} with every setting stated;\n"
                        "the others are our reading of their settings: indicative only)", fontsize=9)
    else:
        right.text(0.5, 0.5, "no published rows", ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    fig.tight_layout()
    return fig


def reserved_validation_figure(csv_path: Path = RESERVED_CSV, published_path: Path = PUBLISHED_CSV
                               ) -> tuple[Any, list[str]]:
    """The figure and the summary lines from the committed CSVs (no simulation): chapter 06, section
    "Reserved, not allocated"."""
    rows = read_rows(csv_path)
    published = published_rows(published_path)
    return draw_reserved(rows, published), summary(rows, published)
