"""The catalogue: every row of data/catalogue.csv parses; every kind of bad row is an error naming file and line."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from survey_utils.catalogue import (
    CATALOGUE_PATH,
    COLUMNS,
    LIALIN_PARTS,
    WANG_FAMILIES,
    XU_FAMILIES,
    implemented_keys,
    load_catalogue,
    summary,
    uncatalogued_methods,
)
from survey_utils.errors import SurveyError
from survey_utils.methods import list_methods
from survey_utils.methods.registry import NOT_PLACED

LINES = CATALOGUE_PATH.read_text(encoding="utf-8").splitlines(keepends=True)
ROWS = list(csv.reader(LINES))


def _write(tmp_path: Path, rows: list[list[str]]) -> Path:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    path = tmp_path / "catalogue.csv"
    path.write_text(out.getvalue(), encoding="utf-8")
    return path


def _with(row_index: int, column: str, value: str) -> list[list[str]]:
    rows = [list(r) for r in ROWS]
    rows[row_index][COLUMNS.index(column)] = value
    return rows


def test_every_row_loads() -> None:
    entries = load_catalogue()
    assert len(entries) == len(ROWS) - 1 >= 60
    assert [e.line for e in entries] == list(range(2, len(ROWS) + 1))
    assert len({e.key for e in entries}) == len(entries)


@pytest.mark.parametrize("row_index", range(1, len(ROWS)))
def test_a_bad_year_in_any_row_names_its_line(tmp_path: Path, row_index: int) -> None:
    path = _write(tmp_path, _with(row_index, "year", "x"))
    with pytest.raises(SurveyError, match=rf"catalogue.csv line {row_index + 1}: year 'x' is not an integer"):
        load_catalogue(path)


BAD_ROWS = [
    ("xu_family", "selective", r"xu_family 'selective' is not one of"),
    ("wang_family", "partial", r"wang_family 'partial' is not one of"),
    ("arxiv_id", "2106.9685x", r"arxiv_id '2106.9685x' is not of the form"),
    ("arxiv_id", "1902.00751", r"year 2021 is not the year of arXiv 1902.00751"),
    ("lialin_region", "A:adapters+X", r"lialin_region part 'X' is not one of"),
    ("lialin_region", "A+A:adapters", r"mixes 'A' with an additive sub-class"),
    ("verified", "yes", r"verified 'yes' is not one of"),
    ("pct_trainable_reported", "about 1", r"pct_trainable_reported 'about 1' is not a number"),
    ("pct_trainable_reported", "3-1", r"end is below its start"),
    ("source", "", r"has no source"),
    ("key", "LoRA", r"key 'LoRA' must be lower-case"),
]


@pytest.mark.parametrize(("column", "value", "message"), BAD_ROWS, ids=[f"{c}={v}" for c, v, _ in BAD_ROWS])
def test_bad_values_are_one_line_errors(tmp_path: Path, column: str, value: str, message: str) -> None:
    lora = next(i for i, r in enumerate(ROWS) if r[0] == "lora")
    path = _write(tmp_path, _with(lora, column, value))
    with pytest.raises(SurveyError, match=rf"line {lora + 1}: .*{message}") as info:
        load_catalogue(path)
    assert "\n" not in str(info.value)


def test_pct_needs_its_source(tmp_path: Path) -> None:
    lora = next(i for i, r in enumerate(ROWS) if r[0] == "lora")
    path = _write(tmp_path, _with(lora, "pct_trainable_source", ""))
    with pytest.raises(SurveyError, match=rf"line {lora + 1}: pct_trainable_reported '0.01' has no pct_trainable_source"):
        load_catalogue(path)


def test_repeated_key_wrong_width_and_header(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS] + [list(ROWS[1])]
    with pytest.raises(SurveyError, match=rf"line {len(rows)}: key '{ROWS[1][0]}' repeats line 2"):
        load_catalogue(_write(tmp_path, rows))
    rows = [list(r) for r in ROWS]
    rows[3] = rows[3][:-1]
    with pytest.raises(SurveyError, match=r"line 4: 13 fields, expected 14"):
        load_catalogue(_write(tmp_path, rows))
    rows = [list(r) for r in ROWS]
    rows[0][2] = "yr"
    with pytest.raises(SurveyError, match=r"line 1: header .*missing \['year'\]"):
        load_catalogue(_write(tmp_path, rows))
    with pytest.raises(SurveyError, match=r"does not exist"):
        load_catalogue(tmp_path / "nope.csv")


def test_implemented_comes_from_the_registry() -> None:
    entries = load_catalogue()
    registered = {m.name for m in list_methods()}
    assert implemented_keys(entries) == registered & {e.key for e in entries}
    assert "lora" in implemented_keys(entries)
    assert "implemented" not in COLUMNS
    assert summary(entries)["implemented"] == len(implemented_keys(entries))


def test_every_registered_method_has_a_catalogue_row() -> None:
    assert uncatalogued_methods() == []


def test_registry_taxonomy_agrees_with_the_catalogue() -> None:
    """Where a registered method names a family (Xu, Wang) or a Venn region (Lialin), its row says the same."""
    rows = {e.key: e for e in load_catalogue()}
    checked = 0
    for method in list_methods():
        row = rows.get(method.name)
        if row is None:
            continue
        for survey, families in (("xu", XU_FAMILIES), ("wang", WANG_FAMILIES)):
            family, _, subgroup = (part.strip() for part in getattr(method.taxonomy, survey).partition("/"))
            if family == NOT_PLACED:
                assert not getattr(row, f"{survey}_family"), \
                    f"{method.name}: registry says not placed by {survey}, catalogue line {row.line} places it"
                checked += 1
            elif family in families:
                assert (family, subgroup) == (getattr(row, f"{survey}_family"), getattr(row, f"{survey}_subgroup")), \
                    f"{method.name}: registry says {survey} '{family} / {subgroup}', catalogue line {row.line} differs"
                checked += 1
        parts = method.taxonomy.lialin.split("+")
        if method.taxonomy.lialin == NOT_PLACED:
            assert not row.lialin_parts, f"{method.name}: catalogue line {row.line} places it in Lialin's diagram"
        elif all(p in LIALIN_PARTS for p in parts):
            assert row.lialin_parts == frozenset(parts), f"{method.name}: Lialin region differs (line {row.line})"
            checked += 1
    assert checked >= 2  # LoRA alone gives three
