"""Figures: every registered figure is written as PNG and SVG, byte-identical when regenerated, and sourced."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from survey_utils.catalogue import load_catalogue
from survey_utils.cli import main
from survey_utils.errors import SurveyError
from survey_utils.figures import FIGURES, FigureUnavailable, cli_figures, gallery_markdown, measured, run_all
from survey_utils.figures.catalogue_figures import VENN_SHAPES, venn_anchor, venn_region
from survey_utils.methods import list_methods

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"timeline", "taxonomy_xu", "taxonomy_wang", "lialin_venn", "lialin_comparison", "trainable_vs_size",
            "memory_breakdown", "memory_validation"}


# The tests that compute Lialin et al.'s comparison rows for roberta-base (changed_params of every registered method
# on a meta build, the tiny-bert FLOPs): under --dist loadgroup one worker runs them all (with the comparison
# explorer's fuzz), so its caches answer the later ones instead of each worker measuring the same values again
# (about 25 s of CPU each). Each test still computes what it checks; a cached value is the value computed first.
SHARES_COMPARISON_ROWS = pytest.mark.xdist_group("comparison_rows")


@pytest.mark.slow
@SHARES_COMPARISON_ROWS
def test_regenerating_gives_the_committed_bytes(tmp_path: Path) -> None:
    """Run every figure and compare its PNG and SVG with the committed files, byte for byte.

    ``make figures`` wrote the committed bytes in a fresh process; this run follows whatever tests its worker ran
    before, in another process (and in CI on another machine): equal bytes show that regenerating gives identical
    bytes and that no figure depends on state left by earlier code (``run_figure`` resets rcParams before each
    one), and a figure whose code or inputs changed without ``make figures`` fails as stale. (A second run in the
    same process, compared with the first, cost 36 s of the suite on a quiet machine and 60-90 s under load, and
    checked less than this does.) Every figure must be made: one skipped (its input missing, which the CLI reports
    with exit 1) fails here, naming the input.
    """
    made, skipped = run_all(tmp_path)
    assert not skipped, f"figures not made: {skipped}"
    assert set(made) == set(FIGURES) and len(made) >= 7
    for name, paths in made.items():
        assert sorted(p.name for p in paths) == [f"{FIGURES[name].file_stem}.png", f"{FIGURES[name].file_stem}.svg"]
        for path in paths:
            committed = ROOT / "figures" / path.name
            assert committed.is_file() and committed.read_bytes() == path.read_bytes(), \
                f"figures/{path.name} is stale: regenerate it with `make figures`"
            if path.suffix == ".png":
                assert path.stat().st_size < 300_000, f"{path.name} is {path.stat().st_size} bytes"
            else:
                text = path.read_text(encoding="utf-8")
                assert "<dc:date>" not in text and "Matplotlib v" not in text


def test_the_registry_has_every_figure_with_its_source() -> None:
    assert EXPECTED <= set(FIGURES)
    for spec in FIGURES.values():
        assert spec.source and spec.shows and spec.survey_counterpart, spec.name


def test_gallery_lists_every_figure() -> None:
    gallery = (ROOT / "figures" / "README.md").read_text(encoding="utf-8")
    assert gallery == gallery_markdown(), "figures/README.md is stale: run python -m survey_utils figures"
    for spec in FIGURES.values():
        assert f"{spec.file_stem}.png" in gallery and f"{spec.file_stem}.svg" in gallery, spec.name


def test_cli_list_unknown_and_unavailable(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["figures", "--list"]) == 0
    assert "lialin_venn" in capsys.readouterr().out
    assert main(["figures", "--out", str(tmp_path), "--only", "timelin"]) == 2
    assert "unknown figure 'timelin'" in capsys.readouterr().err

    def unavailable(out_dir: Path) -> list[Path]:
        raise FigureUnavailable("input missing")

    monkeypatch.setitem(FIGURES, "timeline", FIGURES["timeline"].__class__(
        "timeline", unavailable, "t", "s", "src", "none"))
    args = argparse.Namespace(list=False, out=str(tmp_path), only=["timeline"])
    assert cli_figures(args) == 1
    assert "skipped timeline: input missing" in capsys.readouterr().err


def test_only_writes_the_named_figure(tmp_path: Path) -> None:
    written, skipped = run_all(tmp_path, ["lialin_venn"])
    assert list(written) == ["lialin_venn"] and not skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lialin_venn.png", "lialin_venn.svg"]


def test_every_catalogued_lialin_region_has_a_place_in_the_venn() -> None:
    for entry in load_catalogue():
        if entry.lialin_region:
            x, y = venn_anchor(venn_region(entry))
            inside = {n for n, (cx, cy, w, h) in VENN_SHAPES.items()
                      if ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1}
            assert inside == set(venn_region(entry)), entry.key
    with pytest.raises(SurveyError, match="does not exist in the Venn drawing"):
        venn_anchor(frozenset({"soft prompts", "S"}))


@pytest.mark.parametrize("method", ["lora", "ia3", "houlsby", "prompt_tuning", "full"])
def test_structural_changed_count_equals_a_real_merge(method: str) -> None:
    """% changed (meta, from write counters) == elements that really differ after training and merging."""
    if method not in {m.name for m in list_methods()}:
        pytest.skip(f"{method} is not registered")
    assert measured.changed_params_real("tiny-llama", method) == measured.changed_params("tiny-llama", method)


@SHARES_COMPARISON_ROWS
def test_comparison_rows_cover_every_method_and_match_the_closed_form() -> None:
    rows = measured.comparison_rows(measured.Setting(model="roberta-base"), flops="csv")
    assert [r.method for r in rows] == [m.name for m in list_methods()]
    lora = next(r for r in rows if r.method == "lora")
    assert lora.type == "R" and lora.backprop_through_backbone is True
    assert lora.extra_flops_pct == 0  # merged LoRA costs what the base model costs
    # roberta-base, r=8 on query and value of 12 layers: 12 * 2 * 8 * (768 + 768) = 294,912 parameters
    assert lora.storage_bytes == 294_912 * 2
    full = next(r for r in rows if r.method == "full")
    assert full.trainable_pct == pytest.approx(100) and full.changed_pct == pytest.approx(100)
    with pytest.raises(SurveyError, match="dtype 'int4'"):
        measured.comparison_rows(measured.Setting(dtype="int4"))


@SHARES_COMPARISON_ROWS
def test_comparison_explorer_redraws_when_a_control_changes() -> None:
    from survey_utils.figures.explorer import ComparisonExplorer

    explorer = ComparisonExplorer(model="roberta-base")
    before = {r.method: r for r in explorer.view}
    updates = explorer.updates
    explorer.controls["model"].value = "llama-2-7b"
    after = {r.method: r for r in explorer.view}
    assert explorer.updates == updates + 1 and explorer.error is None
    assert after["lora"].trainable_pct < before["lora"].trainable_pct
    lora_bar = explorer.pct_bars[explorer.methods.index("lora")]
    assert lora_bar.get_width() == pytest.approx(after["lora"].trainable_pct)
    assert "<table" in explorer.table.value and "lora" in explorer.table.value


def test_a_quantized_base_is_not_latency_noise() -> None:
    """The noise floor is read from merged models that run the base graph on the base weights: a quantized base
    (no extra FLOPs counted, but dequantized at every forward) has a real overhead and stays out of it."""
    plain = measured.ComparisonRow("a", "R", extra_flops_pct=0.0, extra_latency_pct=2.0)
    quantized = measured.ComparisonRow("b", "-", extra_flops_pct=0.0, extra_latency_pct=85.0, base_quantized=True)
    adapter = measured.ComparisonRow("c", "A", extra_flops_pct=1.0, extra_latency_pct=12.0)
    assert measured.latency_noise([plain, quantized, adapter]) == (2.0, 2.0)
    assert measured.latency_trustworthy([plain, quantized, adapter])
    unflagged = measured.ComparisonRow("b", "-", extra_flops_pct=0.0, extra_latency_pct=85.0)
    assert not measured.latency_trustworthy([plain, unflagged])
    missing = measured.ComparisonRow("d", "A", extra_flops_pct=1.0)  # no line in the CSV: its cell says why
    assert measured.latency_unmeasured([plain, missing]) == ["d"]
    assert any(note.startswith("extra latency 'not measured' (d)") for note in measured.table_notes([plain, missing]))
    rows = measured.comparison_rows(measured.Setting(model="roberta-base"), flops="csv")
    assert {r.method for r in rows if r.base_quantized} == {m.name for m in list_methods()
                                                            if m.base_quantization is not None}
