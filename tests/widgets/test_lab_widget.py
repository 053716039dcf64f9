"""Chapter 09's widgets: the explorer shows the CSV's grid rows for its state; the live run trains and plots."""

from __future__ import annotations

from dataclasses import replace

import pytest

from survey_utils.experiments import ch09_lab as lab
from survey_utils.lab import grid
from survey_utils.lab.models import PRETRAINING
from survey_utils.widgets.lab import LabExplorer, LiveRun
from tests.widgets.plot_truth import check_frame, check_lab

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.xdist_group("lab")]


def test_every_control_moves_what_the_labels_say() -> None:
    explorer = LabExplorer(lab.load())
    check_lab(explorer)
    for task in ("agreement", "lookup"):
        explorer.controls["task"].value = task
        check_lab(explorer)
    explorer.controls["size"].value = explorer.results.sizes[0]
    assert check_frame(explorer), "a move of the size slider reuses the frame"
    explorer.controls["methods"].value = explorer.controls["methods"].options[:2]
    check_lab(explorer)
    before = sorted(tuple(p) for c in explorer.ax_tradeoff.collections for p in c.get_offsets())
    explorer.controls["methods"].value = ()
    check_lab(explorer)
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
