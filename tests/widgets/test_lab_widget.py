"""Chapter 09's widgets: the explorer shows the CSV's grid rows for its state; the live run trains and plots."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from survey_utils.experiments import ch09_lab as lab
from survey_utils.lab import grid
from survey_utils.lab.models import PRETRAINING
from survey_utils.widgets.lab import LabExplorer, LiveRun
from tests.widgets.plot_truth import assert_legend_outside, assert_limits_contain, check_frame

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.xdist_group("lab")]


def check_lab_explorer(explorer: LabExplorer) -> None:
    state = explorer.state
    if not state["methods"]:
        assert explorer.error is not None and "no method selected" in explorer.error
        return
    assert explorer.error is None
    expected = sorted((float(r["trainable_pct"]), float(r["test_accuracy"])) for r in explorer.results.runs
                      if r["size"] == state["size"] and r["task"] == state["task"] and r["phase"] == "grid"
                      and r["status"] == "ok" and r["method"] in state["methods"])
    plotted = sorted(tuple(p) for c in explorer.ax_tradeoff.collections for p in c.get_offsets())
    assert np.allclose(plotted, expected)
    # each dot's name sits at its dot and names the method whose row it is; the rest of the pool is hidden
    named = sorted((float(r["trainable_pct"]), float(r["test_accuracy"]), r["method"]) for r in explorer.results.runs
                   if r["size"] == state["size"] and r["task"] == state["task"] and r["phase"] == "grid"
                   and r["status"] == "ok" and r["method"] in state["methods"])
    shown = [t for t in explorer.names if t.get_visible()]
    assert sorted((*t.get_position(), t.get_text()) for t in shown) == named
    colours = {tuple(np.round(c, 6)) for c in explorer.dots.get_facecolor()}
    assert len(colours) == len({explorer.colors[r["chapter"]] for r in explorer.results.grid(state["size"], state["task"])
                                if r["method"] in state["methods"]})
    assert_legend_outside(explorer.ax_tradeoff)
    assert_legend_outside(explorer.ax_scale)
    check_frame(explorer)
    assert_limits_contain(explorer.ax_tradeoff, [p[0] for p in plotted], [p[1] for p in plotted], "trade-off dots")
    for line in explorer.ax_scale.get_lines()[:-1]:  # the last is chance
        method = line.get_label()
        rows = [r for r in explorer.results.grid(task=state["task"]) if r["method"] == method]
        assert list(line.get_ydata()) == [float(r["test_accuracy"]) for r in rows]


def test_every_control_moves_what_the_labels_say() -> None:
    explorer = LabExplorer(lab.load())
    check_lab_explorer(explorer)
    for task in ("agreement", "lookup"):
        explorer.controls["task"].value = task
        check_lab_explorer(explorer)
    explorer.controls["size"].value = explorer.results.sizes[0]
    assert check_frame(explorer), "a move of the size slider reuses the frame"
    explorer.controls["methods"].value = explorer.controls["methods"].options[:2]
    check_lab_explorer(explorer)
    before = sorted(tuple(p) for c in explorer.ax_tradeoff.collections for p in c.get_offsets())
    explorer.controls["methods"].value = ()
    check_lab_explorer(explorer)
    assert "no method selected" in explorer.message.value
    after = sorted(tuple(p) for c in explorer.ax_tradeoff.collections for p in c.get_offsets())
    assert before == after  # the last valid state stays


def test_live_run_trains_and_plots(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURVEY_LAB_CACHE", str(tmp_path))
    monkeypatch.setattr(grid, "_BASES", {})
    live = LiveRun(["lora", "bitfit"], steps=3, pretraining=replace(PRETRAINING, steps=2, eval_documents=4))
    live.run()
    assert [c[0] for c in live.curve] == [1, 2, 3]
    assert list(live.ax.lines[0].get_ydata()) == [c[1] for c in live.curve]
    assert "test accuracy" in live.message.value
    live.method.value = "bitfit"
    live.run()
    assert "does not apply" in live.message.value and list(live.ax.lines[0].get_ydata()) == [c[1] for c in live.curve]
