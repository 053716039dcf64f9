"""The sourced catalogue of PEFT methods named in the three surveys' taxonomies (chapter 07).

``data/catalogue.csv`` has one row per method: its family and sub-group in Xu et al. 2023 (arXiv
2312.12148) and Wang et al. 2024 (arXiv 2410.19878), its region of Lialin et al. 2023's Venn diagram
(arXiv 2303.15647), year of first public version, venue, arXiv id, the % of trainable parameters a paper
reports, and where every fact came from (``source``, ``pct_trainable_source``, ``verified``;
``data/catalogue_sources.md`` says what was checked and how). Whether a method is *implemented* here is
never typed in the file: it is derived from the method registry (a registered method's name equals its
catalogue key).

:func:`load_catalogue` validates every row and raises :class:`SurveyError` naming the file and the line,
e.g. ``data/catalogue.csv line 17: year 'x' is not an integer``.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from survey_utils.errors import SurveyError
from survey_utils.zoo import DATA_DIR

CATALOGUE_PATH = DATA_DIR / "catalogue.csv"

COLUMNS = ("key", "name", "year", "venue", "arxiv_id", "xu_family", "xu_subgroup", "wang_family",
           "wang_subgroup", "lialin_region", "pct_trainable_reported", "pct_trainable_source", "source",
           "verified")

XU_FAMILIES = ("additive", "partial", "reparameterized", "hybrid", "unified")
WANG_FAMILIES = ("additive", "reparameterized", "selective", "hybrid", "quantization", "multi-task")
# Lialin et al.'s Venn: additive (A), with its two named sub-classes, selective (S), reparametrization (R).
LIALIN_PARTS = ("A", "A:adapters", "A:soft_prompts", "S", "R")
VERIFIED = ("checked", "partly", "unverified")

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_ARXIV = re.compile(r"^(\d{2})(\d{2})\.\d{4,5}$")
_NUMBER = r"\d+(?:\.\d+)?"
_PCT = re.compile(rf"^({_NUMBER})(?:-({_NUMBER}))?$")


@dataclass(frozen=True)
class Entry:
    """One catalogue row, typed. ``pct_trainable`` is ``(low, high)`` (equal for a single value)."""

    key: str
    name: str
    year: int | None
    venue: str
    arxiv_id: str
    xu_family: str
    xu_subgroup: str
    wang_family: str
    wang_subgroup: str
    lialin_region: str
    pct_trainable: tuple[float, float] | None
    pct_trainable_text: str
    pct_trainable_source: str
    source: str
    verified: str
    line: int

    @property
    def lialin_parts(self) -> frozenset[str]:
        """``{'A:adapters', 'R'}`` for ``A:adapters+R``; empty when Lialin et al. do not place the method."""
        return frozenset(self.lialin_region.split("+")) if self.lialin_region else frozenset()

    @property
    def lialin_classes(self) -> frozenset[str]:
        """The Venn circles the method sits in: a subset of ``{'A', 'S', 'R'}``."""
        return frozenset(part.split(":", 1)[0] for part in self.lialin_parts)


def _label(path: Path) -> str:
    """The path as users know it: relative to the working directory when it lies below it."""
    try:
        return os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    except ValueError:  # another drive on Windows
        return str(path)


def _parse_row(values: dict[str, str], line: int, where: str) -> Entry:
    def fail(message: str) -> SurveyError:
        return SurveyError(f"{where} line {line}: {message}")

    key = values["key"]
    if not _KEY.match(key):
        raise fail(f"key '{key}' must be lower-case letters, digits and '_' (a registry method name)")
    if not values["name"]:
        raise fail(f"row '{key}' has an empty name")
    verified = values["verified"]
    if verified not in VERIFIED:
        raise fail(f"verified '{verified}' is not one of {', '.join(VERIFIED)}")
    year: int | None = None
    if values["year"]:
        try:
            year = int(values["year"])
        except ValueError:
            raise fail(f"year '{values['year']}' is not an integer") from None
        if not 2010 <= year <= 2030:
            raise fail(f"year {year} is outside 2010-2030")
    elif verified != "unverified":
        raise fail(f"row '{key}' has no year; only an 'unverified' row may leave it empty")
    if not values["venue"] and verified != "unverified":
        raise fail(f"row '{key}' has no venue; only an 'unverified' row may leave it empty")
    arxiv = values["arxiv_id"]
    if arxiv:
        match = _ARXIV.match(arxiv)
        if not match or not 1 <= int(match.group(2)) <= 12:
            raise fail(f"arxiv_id '{arxiv}' is not of the form YYMM.NNNNN")
        if year is not None and year != 2000 + int(match.group(1)):
            raise fail(f"year {year} is not the year of arXiv {arxiv} (first version 20{match.group(1)})")
    for survey, families in (("xu", XU_FAMILIES), ("wang", WANG_FAMILIES)):
        family, subgroup = values[f"{survey}_family"], values[f"{survey}_subgroup"]
        if family and family not in families:
            raise fail(f"{survey}_family '{family}' is not one of {', '.join(families)}")
        if subgroup and not family:
            raise fail(f"{survey}_subgroup '{subgroup}' is given without a {survey}_family")
    region = values["lialin_region"]
    if region:
        parts = region.split("+")
        bad = [p for p in parts if p not in LIALIN_PARTS]
        if bad:
            raise fail(f"lialin_region part '{bad[0]}' is not one of {', '.join(LIALIN_PARTS)} (join with '+')")
        if len(set(parts)) != len(parts):
            raise fail(f"lialin_region '{region}' repeats a part")
        if "A" in parts and any(p.startswith("A:") for p in parts):
            raise fail(f"lialin_region '{region}' mixes 'A' with an additive sub-class")
    pct_text = values["pct_trainable_reported"]
    pct: tuple[float, float] | None = None
    if pct_text:
        match = _PCT.match(pct_text)
        if not match:
            raise fail(f"pct_trainable_reported '{pct_text}' is not a number or a range like 0.1-3")
        low = float(match.group(1))
        high = float(match.group(2)) if match.group(2) else low
        if high < low:
            raise fail(f"pct_trainable_reported '{pct_text}' is a range whose end is below its start")
        pct = (low, high)
        if not values["pct_trainable_source"]:
            raise fail(f"pct_trainable_reported '{pct_text}' has no pct_trainable_source")
    elif values["pct_trainable_source"]:
        raise fail("pct_trainable_source is given without a pct_trainable_reported value")
    if not values["source"]:
        raise fail(f"row '{key}' has no source")
    return Entry(key=key, name=values["name"], year=year, venue=values["venue"], arxiv_id=arxiv,
                 xu_family=values["xu_family"], xu_subgroup=values["xu_subgroup"],
                 wang_family=values["wang_family"], wang_subgroup=values["wang_subgroup"],
                 lialin_region=region, pct_trainable=pct, pct_trainable_text=pct_text,
                 pct_trainable_source=values["pct_trainable_source"], source=values["source"],
                 verified=verified, line=line)


def load_catalogue(path: str | os.PathLike[str] | None = None) -> list[Entry]:
    """Read and validate the catalogue; every bad row is a ``SurveyError`` naming file and line."""
    path = Path(path) if path is not None else CATALOGUE_PATH
    where = _label(path)
    if not path.is_file():
        raise SurveyError(f"catalogue file '{where}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurveyError(f"{where}: not UTF-8 text") from None
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    try:
        header = next(reader, None)
        if header is None:
            raise SurveyError(f"{where}: the file is empty")
        if tuple(header) != COLUMNS:
            missing = [c for c in COLUMNS if c not in header]
            extra = [c for c in header if c not in COLUMNS]
            detail = f"missing {missing}" if missing else f"unexpected {extra}" if extra else "columns out of order"
            raise SurveyError(f"{where} line 1: header is not {','.join(COLUMNS)} ({detail})")
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(COLUMNS):
                raise SurveyError(f"{where} line {line}: {len(row)} fields, expected {len(COLUMNS)}")
            values = {c: v.strip() for c, v in zip(COLUMNS, row, strict=True)}
            entry = _parse_row(values, line, where)
            if entry.key in seen:
                raise SurveyError(f"{where} line {line}: key '{entry.key}' repeats line {seen[entry.key]}")
            seen[entry.key] = line
            entries.append(entry)
    except csv.Error as error:
        raise SurveyError(f"{where} line {reader.line_num}: malformed CSV ({error})") from None
    if not entries:
        raise SurveyError(f"{where}: no rows")
    return entries


def implemented_keys(entries: list[Entry] | None = None) -> set[str]:
    """Catalogue keys that name a registered method: derived from the registry, never typed."""
    from survey_utils.methods import list_methods

    entries = load_catalogue() if entries is None else entries
    registered = {m.name for m in list_methods()}
    return {e.key for e in entries if e.key in registered}


def uncatalogued_methods(entries: list[Entry] | None = None) -> list[str]:
    """Registered methods with no catalogue row (the baseline, full fine-tuning, needs none)."""
    from survey_utils.methods import list_methods

    entries = load_catalogue() if entries is None else entries
    keys = {e.key for e in entries}
    return [m.name for m in list_methods() if not m.is_baseline and m.name not in keys]


def summary(entries: list[Entry] | None = None) -> dict[str, int]:
    """Counts for captions and reports: rows, rows by ``verified``, placements per survey, % values."""
    entries = load_catalogue() if entries is None else entries
    verified = Counter(e.verified for e in entries)
    return {
        "rows": len(entries),
        **{f"verified_{v}": verified.get(v, 0) for v in VERIFIED},
        "xu_placed": sum(bool(e.xu_family) for e in entries),
        "wang_placed": sum(bool(e.wang_family) for e in entries),
        "lialin_placed": sum(bool(e.lialin_region) for e in entries),
        "pct_reported": sum(e.pct_trainable is not None for e in entries),
        "implemented": len(implemented_keys(entries)),
    }
