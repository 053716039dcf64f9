"""Chapter 06's reserved-memory figure, sharding table and reserved demonstration, read back and checked."""

from __future__ import annotations

import csv

import matplotlib
import pytest

matplotlib.use("Agg")

from survey_utils.experiments import ch06_quantized as ch06  # noqa: E402
from survey_utils.memory.reserved_figure import PUBLISHED_CSV, RESERVED_CSV, reserved_validation_figure  # noqa: E402

MIB = 2**20


def _csv(path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_figure_plots_the_committed_rows_and_the_published_figures() -> None:
    import matplotlib.pyplot as plt

    fig, lines = reserved_validation_figure()
    left, right = fig.axes[:2]
    rows = _csv(RESERVED_CSV)
    plotted = sorted(tuple(p) for c in left.collections for p in c.get_offsets())
    expected = []
    for r in rows:  # recomputed here from the CSV's columns
        x = int(r["simulated_allocated"]) / 2**30
        for column in ("replayed_reserved", "closed_form_reserved"):
            expected.append((x, 100 * (int(r[column]) - int(r["simulated_allocated"])) / int(r["simulated_allocated"])))
    expected.sort()
    assert len(plotted) == len(expected)
    assert [v for point in plotted for v in point] == pytest.approx([v for point in expected for v in point])
    published = _csv(PUBLISHED_CSV)
    grey = sorted(b.get_width() for b in right.patches if b.get_facecolor()[:3] == pytest.approx((0.6, 0.6, 0.6)))
    assert grey == pytest.approx(sorted(float(r["published_gib"]) for r in published))
    assert lines[0].startswith(f"replay grid ({len(rows)} simulated steps)")
    assert all(line.split(":")[0].startswith("published,") for line in lines[1:])
    plt.close(fig)


def test_sharding_table_divides_what_each_strategy_shards() -> None:
    rows = {r["sharding"]: r for r in ch06.sharding_table("llama-3-70b", "full", gpus=8)}
    ddp, zero1, zero3 = rows["ddp x8"], rows["zero1 x8"], rows["zero3 x8"]
    assert zero1["optimizer states"] == pytest.approx(ddp["optimizer states"] / 8, abs=8)
    assert zero1["weights"] == ddp["weights"] and zero1["gradients"] == ddp["gradients"]
    assert zero3["weights"] == pytest.approx(ddp["weights"] / 8, abs=8)
    assert rows["zero3 x8 + offload optimizer"]["optimizer states"] == 0
    assert all(r["reserved"] >= r["allocated"] and r["device total"] > r["reserved"] for r in rows.values())
    text = ch06.format_sharding(list(rows.values()), capacity=80 * 10**9)
    assert text.splitlines()[1].startswith("ddp x8") and text.splitlines()[1].endswith("no")


def test_reserved_demo_orders_allocated_and_reserved() -> None:
    result = ch06.reserved_demo("tiny-llama", "lora", seq_len=32)
    assert result["simulation: allocated"] <= result["replay: allocated (512 B blocks)"] <= result["replay: reserved"]
    assert result["replay: reserved"] % (2 * MIB) == 0  # segments are 2 MiB, 20 MiB or a multiple of 2 MiB
    assert abs(result["estimate: allocated"] - result["simulation: allocated"]) / result["simulation: allocated"] < 0.05
