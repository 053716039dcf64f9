"""Figures drawn from the sourced catalogue (``data/catalogue.csv``): timeline, taxonomy trees, Venn (chapter 07).

Every method of the catalogue is placed by its row; methods registered in ``survey_utils.methods`` are
marked as implemented (derived from the registry), so a method added by a chapter shows up marked with no
change here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Ellipse, FancyBboxPatch, Patch

from survey_utils.catalogue import (
    WANG_FAMILIES,
    XU_FAMILIES,
    Entry,
    implemented_keys,
    load_catalogue,
    summary,
)
from survey_utils.errors import SurveyError
from survey_utils.figures.base import figure, source_note
from survey_utils.plotting import save_figure

# One colour per survey family; the shared families reuse plotting.FAMILY_COLOURS' hues.
SURVEY_FAMILY_COLOURS = {
    "additive": "#1b9e77",
    "partial / selective": "#7570b3",
    "reparameterized": "#e7298a",
    "hybrid": "#66a61e",
    "unified": "#a6761d",
    "quantization": "#e6ab02",
    "multi-task": "#1f78b4",
    "not placed": "#999999",
}
_FAMILY_ALIASES = {"partial": "partial / selective", "selective": "partial / selective"}


def label(entry: Entry) -> str:
    """A short display name: the catalogue name without its parenthetical, ``^3`` as a superscript."""
    name = entry.name if entry.name.startswith("(") else entry.name.split(" (")[0]
    return name.replace("^3", "\u00b3")


def timeline_family(entry: Entry) -> str:
    """Xu et al.'s family where the catalogue gives one, else Wang et al.'s, else Lialin et al.'s class."""
    family = entry.xu_family or entry.wang_family
    if family:
        return _FAMILY_ALIASES.get(family, family)
    classes = entry.lialin_classes
    if len(classes) > 1:
        return "hybrid"
    if classes:
        return {"A": "additive", "S": "partial / selective", "R": "reparameterized"}[next(iter(classes))]
    return "not placed"


def _catalogue_note(entries: list[Entry], extra: str = "") -> str:
    s = summary(entries)
    return (f"Data: data/catalogue.csv ({s['rows']} methods: {s['verified_checked']} checked, "
            f"{s['verified_partly']} partly checked, {s['verified_unverified']} unverified; "
            f"see data/catalogue_sources.md). {extra}")


def _box(ax: plt.Axes, x: float, y: float, width: float, text: str, colour: str, implemented: bool,
         fontsize: float = 7.0, height: float = 0.72) -> None:
    """A method box: filled with its family colour and bold when implemented here, outlined otherwise."""
    ax.add_patch(FancyBboxPatch((x, y - height / 2), width, height, boxstyle="round,pad=0,rounding_size=0.12",
                                facecolor=colour if implemented else "white", edgecolor=colour,
                                linewidth=1.6 if implemented else 0.9, mutation_aspect=1 / 3))
    ax.text(x + width / 2, y, text, ha="center", va="center", fontsize=fontsize,
            color="white" if implemented else "#222222", fontweight="bold" if implemented else "normal")


def _legend_handles(families: list[str]) -> list[Patch]:
    handles = [Patch(facecolor="white", edgecolor=SURVEY_FAMILY_COLOURS[f], label=f) for f in families]
    handles.append(Patch(facecolor="#555555", edgecolor="#555555", label="implemented here (filled, bold)"))
    return handles


@figure("timeline", title="PEFT methods by year of first public version, coloured by family",
        shows="every dated method of the catalogue in the column of its first arXiv (or venue) year, "
              "coloured by its family (Xu et al. where placed, else Wang et al., else Lialin et al.'s class); "
              "methods implemented in survey_utils filled",
        source="data/catalogue.csv (year, families); implemented = registry",
        survey_counterpart="Xu et al. 2023, Fig. 1 (evolutionary timeline of PEFT methods)")
def timeline(out_dir: Path) -> list[Path]:
    entries = load_catalogue()
    done = implemented_keys(entries)
    dated = [e for e in entries if e.year is not None]
    undated = len(entries) - len(dated)
    by_year: dict[int, list[Entry]] = defaultdict(list)
    order = list(SURVEY_FAMILY_COLOURS)
    for e in sorted(dated, key=lambda e: (order.index(timeline_family(e)), label(e).lower())):
        by_year[e.year].append(e)  # type: ignore[index]
    years = list(range(min(by_year), max(by_year) + 1))
    tallest = max(len(v) for v in by_year.values())
    fig, ax = plt.subplots(figsize=(2.05 * len(years) + 0.5, 0.27 * tallest + 2.0))
    for column, year in enumerate(years):
        for row, e in enumerate(by_year.get(year, [])):
            _box(ax, column + 0.04, -row, 0.92, label(e), SURVEY_FAMILY_COLOURS[timeline_family(e)], e.key in done)
    ax.set_xlim(0, len(years))
    ax.set_ylim(-tallest + 0.4, 0.9)
    ax.set_xticks([c + 0.5 for c in range(len(years))], [f"{y}\n({len(by_year.get(y, []))})" for y in years])
    ax.xaxis.tick_top()
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    present = [f for f in order if any(timeline_family(e) == f for e in dated)]
    ax.legend(handles=_legend_handles(present), loc="upper left", bbox_to_anchor=(0.0, 1.0 - 1.6 / (tallest + 0.5)),
              fontsize=7, frameon=True, title="family", title_fontsize=8)
    ax.set_title("PEFT methods by year of first public version (count per year in brackets)", fontsize=11, pad=28)
    note = (f"{undated} undated rows not shown. Family: Xu et al. where the catalogue places the method, else Wang "
            "et al., else Lialin et al.'s class. Redrawn from the catalogue, not from the survey's figure.")
    source_note(fig, _catalogue_note(entries, note))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, out_dir, "timeline")


def _taxonomy_tree(out_dir: Path, survey: str, families: tuple[str, ...], name: str, title: str,
                   note: str) -> list[Path]:
    entries = load_catalogue()
    done = implemented_keys(entries)
    groups: dict[str, dict[str, list[Entry]]] = {f: defaultdict(list) for f in families}
    for e in entries:
        family = getattr(e, f"{survey}_family")
        if family:
            groups[family][getattr(e, f"{survey}_subgroup")].append(e)
    cols, cell = 4, 1.55
    x_family, x_sub, x_leaf = 0.9, 2.45, 4.15
    rows: list[tuple[str, str, list[Entry], float]] = []  # family, subgroup, entries, y of first leaf row
    y = 0.0
    family_y: dict[str, list[float]] = defaultdict(list)
    for family in families:
        subgroups = groups[family]
        if not subgroups:
            continue
        for subgroup in sorted(subgroups, key=lambda s: (s == "", s.lower())):
            members = sorted(subgroups[subgroup], key=lambda e: (e.year or 9999, label(e).lower()))
            rows.append((family, subgroup, members, y))
            n_rows = math.ceil(len(members) / cols)
            family_y[family].append(y - (n_rows - 1) / 2)
            y -= n_rows + 0.35
        y -= 0.45
    height = -y
    fig, ax = plt.subplots(figsize=(14.5, 0.3 * height + 1.6))
    colour_of = {f: SURVEY_FAMILY_COLOURS[_FAMILY_ALIASES.get(f, f)] for f in families}
    root_y = (max(v[0] for v in family_y.values()) + min(v[-1] for v in family_y.values())) / 2
    ax.text(0, root_y, {"xu": "Xu et al.\n2023", "wang": "Wang et al.\n2024"}[survey], ha="center",
            va="center", fontsize=10, fontweight="bold",
            bbox={"boxstyle": "round", "facecolor": "#eeeeee", "edgecolor": "#666666"})
    for family, ys in family_y.items():
        fy = (ys[0] + ys[-1]) / 2
        ax.plot([0.35, 0.55, 0.55, x_family - 0.45], [root_y, root_y, fy, fy], color="#888888", lw=0.8)
        count = sum(len(m) for f, _, m, _ in rows if f == family)
        ax.text(x_family, fy, f"{family}\n({count})", ha="center", va="center", fontsize=9, color="white",
                fontweight="bold", bbox={"boxstyle": "round", "facecolor": colour_of[family], "edgecolor": "none"})
        for sy in ys:
            ax.plot([x_family + 0.5, x_family + 0.6, x_family + 0.6, x_sub - 0.62], [fy, fy, sy, sy],
                    color=colour_of[family], lw=0.8)
    for family, subgroup, members, top in rows:
        n_rows = math.ceil(len(members) / cols)
        sy = top - (n_rows - 1) / 2
        ax.text(x_sub, sy, subgroup or "(no sub-group given)", ha="center", va="center", fontsize=8,
                style="normal" if subgroup else "italic",
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": colour_of[family]})
        ax.plot([x_sub + 0.7, x_leaf - 0.05], [sy, sy], color=colour_of[family], lw=0.6)
        for i, e in enumerate(members):
            r, c = divmod(i, cols)
            _box(ax, x_leaf + c * cell, top - r, cell - 0.08, label(e), colour_of[family], e.key in done)
    ax.set_xlim(-0.55, x_leaf + cols * cell)
    ax.set_ylim(y + 0.2, 0.8)
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    placed = sum(len(m) for _, _, m, _ in rows)
    ax.legend(handles=[Patch(facecolor="#555555", edgecolor="#555555", label="implemented here (filled, bold)"),
                       Patch(facecolor="white", edgecolor="#555555", label="catalogued, not implemented")],
              loc="lower right", fontsize=7)
    source_note(fig, _catalogue_note(entries, f"{placed} methods placed. {note}"))
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    return save_figure(fig, out_dir, name)


@figure("taxonomy_xu", title="Xu et al. 2023's taxonomy tree, from the catalogue",
        shows="families (additive, partial, reparameterized, hybrid, unified), sub-groups and the catalogued "
              "members of each; implemented methods filled",
        source="data/catalogue.csv (xu_family, xu_subgroup); implemented = registry",
        survey_counterpart="Xu et al. 2023, Fig. 2 (taxonomy of PEFT methods)")
def taxonomy_xu(out_dir: Path) -> list[Path]:
    return _taxonomy_tree(
        out_dir, "xu", XU_FAMILIES, "taxonomy_xu", "Xu et al. 2023 (arXiv 2312.12148): taxonomy of PEFT methods",
        "Placements come from secondary copies of Xu Fig. 2 and research notes; the survey's figure itself was "
        "not read, and it lists more members than shown here.")


@figure("taxonomy_wang", title="Wang et al. 2024's taxonomy tree, from the catalogue",
        shows="families (additive, reparameterized, selective, hybrid, quantization, multi-task), sub-groups "
              "and the catalogued members; implemented methods filled",
        source="data/catalogue.csv (wang_family, wang_subgroup); implemented = registry",
        survey_counterpart="Wang et al. 2024, Fig. 4 (taxonomy mind map)")
def taxonomy_wang(out_dir: Path) -> list[Path]:
    return _taxonomy_tree(
        out_dir, "wang", WANG_FAMILIES, "taxonomy_wang",
        "Wang et al. 2024 (arXiv 2410.19878): taxonomy of PEFT methods",
        "Every Wang placement comes from research notes (Fig. 4 could not be read): unverified.")


# Lialin et al.'s Venn diagram: three classes, two named sub-classes of the additive one. (x, y, width, height).
VENN_SHAPES = {
    "A": (-2.0, 0.5, 8.4, 7.6),
    "adapters": (-0.7, -0.5, 4.4, 3.8),
    "soft prompts": (-3.1, 0.5, 3.8, 5.6),
    "S": (3.3, 0.5, 6.6, 7.6),
    "R": (0.3, -3.2, 8.4, 4.6),
}
VENN_COLOURS = {"A": "#1b9e77", "adapters": "#1b9e77", "soft prompts": "#d95f02", "S": "#7570b3", "R": "#e7298a"}
VENN_LABELS = {"A": "Additive", "adapters": "Adapters", "soft prompts": "Soft prompts", "S": "Selective",
               "R": "Reparametrization-based"}
_PART_SHAPES = {"A": {"A"}, "A:adapters": {"A", "adapters"}, "A:soft_prompts": {"A", "soft prompts"},
                "S": {"S"}, "R": {"R"}}


def venn_region(entry: Entry) -> frozenset[str]:
    """The set of Venn shapes a method sits in, from its ``lialin_region``."""
    return frozenset().union(*(_PART_SHAPES[p] for p in entry.lialin_parts))


def _inside(shape: tuple[float, float, float, float], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    cx, cy, w, h = shape
    return ((x - cx) / (w / 2)) ** 2 + ((y - cy) / (h / 2)) ** 2 <= 1


def venn_anchor(region: frozenset[str]) -> tuple[float, float]:
    """The point deepest inside exactly ``region`` (inside its shapes, outside the others), on a fixed grid.

    Depth = how many 8-neighbour erosions of the region's grid mask a point survives; ties go to the tied
    point nearest their centroid. Raises ``SurveyError`` when the drawing has no such region.
    """
    xs, ys = np.meshgrid(np.linspace(-6.8, 6.8, 273), np.linspace(-5.5, 4.5, 201))
    mask = np.ones_like(xs, dtype=bool)
    for name, shape in VENN_SHAPES.items():
        inside = _inside(shape, xs, ys)
        mask &= inside if name in region else ~inside
    if not mask.any():
        raise SurveyError(f"Lialin region {'+'.join(sorted(region))} does not exist in the Venn drawing")
    deepest = mask
    while True:
        padded = np.pad(deepest, 1, constant_values=False)
        eroded = deepest.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                eroded &= padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx]
        if not eroded.any():
            break
        deepest = eroded
    px, py = xs[deepest], ys[deepest]
    i = int(np.argmin((px - px.mean()) ** 2 + (py - py.mean()) ** 2))
    return float(px[i]), float(py[i])


@figure("lialin_venn", title="Lialin et al. 2023's Venn taxonomy, hybrids in the overlaps",
        shows="additive (with adapters and soft prompts), selective and reparametrization-based classes; each "
              "method the catalogue places in Lialin et al.'s diagram is written in its region; implemented bold",
        source="data/catalogue.csv (lialin_region); implemented = registry",
        survey_counterpart="Lialin et al. 2023, Fig. 2 (Venn diagram of PEFT classes)")
def lialin_venn(out_dir: Path) -> list[Path]:
    entries = load_catalogue()
    done = implemented_keys(entries)
    placed = [e for e in entries if e.lialin_region]
    by_region: dict[frozenset[str], list[Entry]] = defaultdict(list)
    for e in sorted(placed, key=lambda e: label(e).lower()):
        by_region[venn_region(e)].append(e)
    fig, ax = plt.subplots(figsize=(11, 8.6))
    for name, (cx, cy, w, h) in VENN_SHAPES.items():
        colour = VENN_COLOURS[name]
        ax.add_patch(Ellipse((cx, cy), w, h, facecolor=colour, alpha=0.10 if name in ("A", "S", "R") else 0.16,
                             edgecolor=colour, linewidth=1.6, linestyle="-" if name in ("A", "S", "R") else "--"))
    for name, (x, y) in {"A": (-4.6, 3.9), "adapters": (-0.6, 1.05), "soft prompts": (-3.9, 3.0),
                         "S": (4.9, 3.9), "R": (1.6, -5.1)}.items():
        ax.text(x, y, VENN_LABELS[name], fontsize=12 if name in ("A", "S", "R") else 9.5, fontweight="bold",
                color=VENN_COLOURS[name], ha="center", va="center")
    for region in sorted(by_region, key=lambda r: sorted(r)):
        members = by_region[region]
        x, y = venn_anchor(region)
        colour = VENN_COLOURS[next(s for s in ("soft prompts", "adapters", "S", "R", "A") if s in region)]
        for i, e in enumerate(members):  # one line each, offset in points: bold for implemented methods
            ax.annotate(label(e), (x, y), xytext=(0, ((len(members) - 1) / 2 - i) * 10.5),
                        textcoords="offset points", ha="center", va="center", fontsize=8,
                        fontweight="bold" if e.key in done else "normal",
                        color=colour if e.key in done else "#111111")
    ax.set_xlim(-6.8, 6.8)
    ax.set_ylim(-5.5, 4.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("Lialin et al. 2023 (arXiv 2303.15647): classes of PEFT methods; hybrids sit in the overlaps",
                 fontsize=11)
    missing = len(entries) - len(placed)
    source_note(fig, _catalogue_note(
        entries, f"{len(placed)} methods placed ({missing} not in Lialin et al.'s diagram). Regions: research notes, "
        "corroborated by the v1 text for 27 rows; the survey's figure was not read. Bold: implemented here."))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, out_dir, "lialin_venn")

