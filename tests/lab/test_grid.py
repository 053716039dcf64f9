"""The lab's pipeline on the smoke plan (seconds): rows, determinism, the reproduction check, refusals, CLI."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import pytest

from survey_utils.errors import SurveyError
from survey_utils.lab import grid
from survey_utils.lab.__main__ import main
from survey_utils.lab.loop import Budget
from survey_utils.methods import get_method

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.xdist_group("lab")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("lab-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURVEY_LAB_CACHE", str(cache))
        files = grid.run_grid(grid.smoke_plan(), workers=1)
    grid.write(files, tmp_path_factory.getbasetemp() / "smoke")
    return files


def rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_smoke_rows(smoke: dict[str, str]) -> None:
    runs = rows(smoke["runs.csv"])
    by_method = {r["method"]: r for r in runs}
    lora = by_method["lora"]
    assert lora["status"] == "ok" and lora["phase"] == "grid"
    config = grid.lab_config("lab-s")
    assert int(lora["trainable"]) == get_method("lora").count(config)  # the closed form, independently
    assert float(lora["trainable_pct"]) == pytest.approx(100 * int(lora["trainable"]) / int(lora["parameters"]),
                                                         abs=1e-4)
    # llama has no bias: BitFit says why, once per task, not once per rate
    assert by_method["bitfit"]["status"].startswith("does not apply:") and "bias" in by_method["bitfit"]["status"]
    curves = rows(smoke["curves.csv"])
    assert [int(r["step"]) for r in curves if r["method"] == "lora"] == [1, 2, 3]
    assert curves[-1]["train_loss"] == lora["final_train_loss"]
    memory = rows(smoke["memory.csv"])
    assert memory[0]["method"] == "lora" and int(memory[0]["measured_bytes"]) > 0
    measured, estimated = int(memory[0]["measured_bytes"]), int(memory[0]["estimated_bytes"])
    assert float(memory[0]["error_pct"]) == pytest.approx(100 * (estimated - measured) / measured, abs=0.01)
    assert all(r["command"] == "python -m survey_utils.lab smoke" for r in runs + memory)


def test_a_cell_reproduces_bit_for_bit(smoke: dict[str, str], tmp_path_factory: pytest.TempPathFactory,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    plan = grid.smoke_plan()
    # a new cache and no model in memory: the check pretrains again, so pretraining is checked too
    monkeypatch.setenv("SURVEY_LAB_CACHE", str(tmp_path_factory.getbasetemp() / "lab-cache-again"))
    monkeypatch.setattr(grid, "_BASES", {})

    def run(cell: grid.Cell) -> grid.CellResult:
        return grid.run_cell(cell, plan.budget, plan.pretraining)

    committed, new = grid.reproduce_row(tmp_path_factory.getbasetemp() / "smoke", run=run)
    new["command"] = committed["command"]
    assert new == committed


def test_best_rate_is_the_best_mean_validation_accuracy() -> None:
    def result(method: str, lr: float, accuracy: float) -> grid.CellResult:
        return grid.CellResult(grid.Cell("lab-s", method, "sentiment", lr),
                               {"status": "ok", "validation_accuracy": f"{accuracy}"})

    results = [result("a", 1e-3, 0.5), result("a", 1e-3, 0.9), result("a", 1e-2, 0.8), result("a", 1e-2, 0.8),
               result("b", 1e-3, 0.6), result("b", 1e-2, 0.6)]
    assert grid.best_rates(results) == {"a": 1e-2, "b": 1e-3}  # a: 0.7 vs 0.8; b: a tie goes to the smaller rate


@pytest.mark.parametrize(("change", "message"), [
    ({"tasks": ("sst2",)}, "'sst2'"),
    ({"sizes": ("lab-xxl",)}, "lab-xxl"),
    ({"budget": None}, "steps=0"),
])
def test_bad_plans_are_one_line(change: dict, message: str) -> None:
    with pytest.raises(SurveyError, match=message):
        if change.get("budget", 1) is None:
            Budget(steps=0)
        grid.run_grid(replace(grid.smoke_plan(), **change), workers=1)


def test_cli_check_without_results_is_exit_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs.csv does not exist" in err and "make lab-results" in err
    assert main(["smoke", "--workers", "0"]) == 2
