"""The feasibility map: categories from the advisor's closed form, the breakdown of a picked cell, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from survey_utils.advisor import point
from survey_utils.memory.sharding import Sharding
from survey_utils.methods import get_method
from survey_utils.widgets.advisor import CATEGORIES, CUSTOM, FeasibilityExplorer, FeasibilityTable
from survey_utils.zoo import load_config


@pytest.fixture(scope="module")
def table() -> FeasibilityTable:
    return FeasibilityTable(models=("gpt2", "llama-2-7b", "llama-65b"), methods=["full", "lora", "qlora", "bitfit"],
                            seq_len=512, precompute_gpus=(8,))


def test_categories_are_what_the_closed_form_says(table: FeasibilityTable) -> None:
    cat = table.categories(48 * 10**9, 1)
    names = {(m, k): CATEGORIES[cat[i, j]] for i, m in enumerate(table.models) for j, k in enumerate(table.methods)}
    assert names[("llama-65b", "qlora")].startswith("fits") and names[("llama-65b", "full")] == "does not fit"
    assert names[("gpt2", "lora")] == "fits" and names[("llama-2-7b", "bitfit")] == "n/a"
    config, method = load_config("llama-2-7b"), get_method("full")
    single = point(config, method, table.cells[1][0].plain, Sharding(), False).device_total
    assert (cat[1, 0] == 4) == (single <= 48 * 10**9)
    assert names[("llama-65b", "full")] != CATEGORIES[2]
    sharded = table.categories(80 * 2**30, 8)
    assert CATEGORIES[sharded[2, 0]] == "fits sharded"  # 65B full fine-tuning over 8 x 80 GiB
    assert np.all(sharded >= cat)  # more GPUs never make a cell worse


def test_widget_shows_a_cells_breakdown_and_one_line_errors(table: FeasibilityTable) -> None:
    w = FeasibilityExplorer(table, gpu="a100-80gb", gpus=8)
    w.controls["cell"].value = (2, 0)
    assert "llama-65b / full" in w.view.label and "fits sharded" in w.view.label and w.view.terms["CUDA context"] > 0
    assert int(w.view.categories[2, 0]) == 2
    w.controls["gpus"].value = 0
    assert w.error and "gpus=0" in w.error
    w.controls["gpus"].value = 1
    w.controls["gpu"].value = CUSTOM
    w.controls["memory"].value = "48"
    assert "no unit" in w.error
    w.controls["memory"].value = "48GiB"
    assert w.error is None and w.view.capacity == 48 * 2**30
