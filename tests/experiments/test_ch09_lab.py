"""Chapter 09's reading of the lab CSVs: each plot's data read back equals the CSV rows; bad files are one line."""

from __future__ import annotations

import numpy as np
import pytest

from survey_utils.errors import SurveyError
from survey_utils.experiments import ch09_lab as lab
from survey_utils.lab.tasks import TASKS

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def results() -> lab.LabResults:
    return lab.load()


def test_missing_and_corrupt_files_name_the_command(tmp_path) -> None:
    with pytest.raises(SurveyError, match="runs.csv is missing.*make lab-results"):
        lab.load(tmp_path)
    for name in ("runs", "curves", "memory", "pretraining", "timings"):
        (tmp_path / f"{name}.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SurveyError, match="not a readable CSV"):
        lab.load(tmp_path)


def test_tradeoff_plot_shows_the_grid_rows(results: lab.LabResults) -> None:
    size, task = results.sizes[-1], "sentiment"
    fig = lab.plot_tradeoff(results, task, size)
    plotted = sorted(tuple(p) for c in fig.axes[0].collections for p in c.get_offsets())
    expected = sorted((float(r["trainable_pct"]), float(r["test_accuracy"])) for r in results.runs
                      if r["size"] == size and r["task"] == task and r["phase"] == "grid" and r["status"] == "ok")
    assert np.allclose(plotted, expected)
    assert fig.axes[0].lines[0].get_ydata()[0] == pytest.approx(1 / 2)  # chance, two labels
    with pytest.raises(SurveyError, match="'sst2'"):
        lab.plot_tradeoff(results, "sst2", size)


def test_scale_plot_and_memory_plot(results: lab.LabResults) -> None:
    fig = lab.plot_scale(results, "lookup", methods=("lora",))
    line = fig.axes[0].lines[0]
    params = {r["size"]: int(r["parameters"]) for r in results.pretraining}
    rows = [r for r in results.runs if r["method"] == "lora" and r["task"] == "lookup" and r["phase"] == "grid"]
    assert list(line.get_xdata()) == [params[r["size"]] for r in rows]
    assert list(line.get_ydata()) == [float(r["test_accuracy"]) for r in rows]
    size = results.sizes[-1]
    fig = lab.plot_memory(results, size)
    points = fig.axes[0].collections[0].get_offsets()
    measured = [(int(r["measured_bytes"]) / 2**20, int(r["estimated_bytes"]) / 2**20) for r in results.memory
                if r["size"] == size and r["measured_bytes"]]
    assert np.allclose(points, measured)


def test_bars_are_means_over_tasks(results: lab.LabResults) -> None:
    size = results.sizes[-1]
    fig = lab.plot_bars(results, size, "forgetting")
    ax = fig.axes[0]
    heights = {t.get_text(): p.get_height() for t, p in zip(ax.get_xticklabels(), ax.patches, strict=True)}
    for method, height in heights.items():
        values = [float(r["forgetting_nats"]) for r in results.grid(size) if r["method"] == method]
        assert height == pytest.approx(sum(values) / len(values))
    with pytest.raises(SurveyError, match="'speed'"):
        lab.plot_bars(results, size, "speed")


def test_findings_are_computed_and_verdicts_are_known(results: lab.LabResults) -> None:
    rows = lab.findings(results)
    assert len(rows) >= 5
    assert {r["verdict"] for r in rows} <= {"supports", "contradicts", "cannot decide"}
    assert all(r["numbers"] and r["claim"] for r in rows)
    errors = lab.memory_errors(results)
    assert errors["pairs"] == sum(1 for r in results.memory if r["error_pct"])


def test_accuracy_table_means(results: lab.LabResults) -> None:
    for row in lab.accuracy_table(results, results.sizes[0]):
        values = [row[t] for t in TASKS if t in row]
        assert row["mean"] == pytest.approx(sum(values) / len(values))


def test_the_lab_figure_shows_the_grid_rows(results: lab.LabResults) -> None:
    from survey_utils.figures.lab import tradeoff_figure

    fig = tradeoff_figure(results)
    size = results.sizes[-1]
    for ax, task in zip(fig.axes, TASKS, strict=True):
        plotted = sorted(tuple(p) for c in ax.collections for p in c.get_offsets())
        expected = sorted((float(r["trainable_pct"]), float(r["test_accuracy"])) for r in results.grid(size, task))
        assert np.allclose(plotted, expected)
        assert ax.lines[0].get_ydata()[0] == pytest.approx(lab.chance(task))


def test_verdict_rules() -> None:
    assert lab._direction(0.2, 0.1) == "supports"
    assert lab._direction(-0.2, 0.1) == "contradicts"
    assert lab._direction(0.05, 0.1) == "cannot decide"
    assert lab._no_difference(0.2, 0.1) == "contradicts"
    assert lab._no_difference(0.01, 0.02) == "supports"
    assert lab._no_difference(0.01, 0.2) == "cannot decide"  # no difference seen, but the noise hides any


def test_noise_is_recomputed_from_the_seed_rows(results: lab.LabResults) -> None:
    by_method: dict[tuple[str, str], list[float]] = {}
    for r in results.runs:
        if r["phase"] in ("grid", "seeds") and r["size"] == "lab-m" and r["settings"] == "" and r["status"] == "ok" \
                and r["method"] in {x["method"] for x in results.runs if x["phase"] == "seeds"}:
            by_method.setdefault((r["method"], r["seed"]), []).append(float(r["test_accuracy"]))
    methods = {m for m, _ in by_method}
    spreads = [max(sum(v) / 3 for (m2, _), v in by_method.items() if m2 == m)
               - min(sum(v) / 3 for (m2, _), v in by_method.items() if m2 == m) for m in methods]
    assert lab.mean_noise_level(results) == pytest.approx(max(spreads))
