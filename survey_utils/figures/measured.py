"""Figures measured on our implementations: Lialin et al.'s comparison table, % trainable vs size, memory.

Every number comes from the registry's methods at their default hyper-parameters:

- storage: trainable parameters (closed form) x bytes per element of the adapter dtype: the size of the
  saved trainable state, without file-format overhead;
- memory: the memory model's peak estimate (``survey_utils.memory.closed_form``) for one training step;
- backprop: ``Method.backprop_through_backbone`` (False for side networks such as LST);
- inference overhead: extra FLOPs of a forward pass after ``merge`` on the tiny model of the reference
  model's architecture, counted with ``torch.utils.flop_counter.FlopCounterMode`` (deterministic); the extra
  latency is measured by ``benchmarks/inference_overhead.py`` into ``data/inference_overhead.csv`` and read
  from there (latency is not deterministic, so the figure never measures it itself);
- % trainable: closed-form count / base model parameters; % changed: parameters whose values differ from
  the base model's after training and merging (written by ``merge``, trained in place, or added and kept),
  found on the reference model built on ``meta`` from in-place write counters, / base model parameters.
"""

from __future__ import annotations

import copy
import csv
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from survey_utils.architecture import total_params
from survey_utils.counting import apply_method, changed_params, closed_form
from survey_utils.errors import SurveyError
from survey_utils.figures.base import FigureUnavailable, figure, source_note
from survey_utils.memory.figure import FIGURE_NAME as VALIDATION_STEM
from survey_utils.methods import list_methods
from survey_utils.methods.common import merge
from survey_utils.methods.registry import Method, get_method
from survey_utils.plotting import FAMILY_COLOURS, TERM_COLOURS, human, method_style, save_figure
from survey_utils.units import DTYPE_BYTES, format_bytes
from survey_utils.zoo import DATA_DIR, build_model, list_models, load_config

LATENCY_CSV = DATA_DIR / "inference_overhead.csv"
# The tiny model of each architecture family, where real forward passes are cheap.
TINY_FOR_TYPE = {"llama": "tiny-llama", "mistral": "tiny-llama", "qwen2": "tiny-llama", "gpt2": "tiny-gpt2",
                 "bert": "tiny-bert", "roberta": "tiny-bert", "t5": "tiny-t5"}
FLOPS_SEQ_LEN = 32
LIALIN_CLASSES = ("A", "S", "R")


@dataclass(frozen=True)
class Setting:
    """The reference setting of the measured table and the memory figure."""

    model: str = "roberta-base"
    batch_size: int = 8
    seq_len: int = 128
    dtype: str = "bf16"
    optimizer: str = "adamw"

    def describe(self) -> str:
        return (f"{self.model}, batch {self.batch_size} x {self.seq_len} tokens, {self.dtype}, "
                f"{self.optimizer}, default hyper-parameters")


TABLE_SETTING = Setting()
MEMORY_SETTING = Setting(model="llama-2-7b", batch_size=1, seq_len=512)


@dataclass(frozen=True)
class ComparisonRow:
    """One method in Lialin et al.'s comparison table, measured; ``error`` says why a row is empty."""

    method: str
    type: str
    storage_bytes: int | None = None
    memory_bytes: int | None = None
    memory_full_ratio: float | None = None
    backprop_through_backbone: bool | None = None
    extra_flops_pct: float | None = None
    extra_latency_pct: float | None = None
    base_quantized: bool = False  # Method.base_quantization: the merged model dequantizes its base at every forward
    trainable_pct: float | None = None
    changed_pct: float | None = None
    error: str | None = None
    memory_error: str | None = None
    flops_error: str | None = None


def lialin_type(method: Method) -> str:
    """Lialin et al.'s class (A, S, R or a hybrid like A+R) from the method's taxonomy; '-' when not placed."""
    if method.is_baseline:
        return "(baseline)"
    parts = method.taxonomy.lialin.split("+")
    classes = [c for c in LIALIN_CLASSES if any(p.split(":")[0] == c for p in parts)]
    if not classes or not all(p.split(":")[0] in LIALIN_CLASSES for p in parts):
        return "-"
    return "+".join(classes)


def tiny_for(model: str) -> str:
    """The tiny zoo model with the reference model's architecture (``tiny-llama`` when there is none)."""
    return TINY_FOR_TYPE.get(load_config(model).model_type, "tiny-llama")


def _batch(config: Any, seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), generator=generator)
    batch = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        batch["decoder_input_ids"] = ids.clone()
    return batch


def _sdpa_cpu_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


# torch's counter has formulas for the CUDA attention kernels only; SDPA on CPU dispatches to this op, whose
# FLOPs (QK^T and PV, growing with the key length: what soft prompts add) would otherwise count as zero.
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def forward_flops(model: torch.nn.Module, seq_len: int = FLOPS_SEQ_LEN) -> int:
    """FLOPs of one forward pass on ``seq_len`` tokens (batch 1), by ``FlopCounterMode``.

    Gradients are switched off on the (throw-away) model first: the counter's module tracker hooks every
    tensor that requires a gradient. CPU attention is counted with torch's SDPA formula.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.requires_grad_(False)
    batch = _batch(model.config, seq_len)
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with torch.no_grad(), counter:
        model(**batch)
    return int(counter.get_total_flops())


@lru_cache(maxsize=8)
def _tiny(tiny: str) -> torch.nn.Module:
    return build_model(tiny, device="cpu", seed=0)


@lru_cache(maxsize=8)
def base_flops(tiny: str, seq_len: int = FLOPS_SEQ_LEN) -> int:
    """Forward FLOPs of the tiny base model."""
    return forward_flops(copy.deepcopy(_tiny(tiny)), seq_len)


@lru_cache(maxsize=512)
def merged_flops(tiny: str, method_name: str, seq_len: int = FLOPS_SEQ_LEN) -> tuple[int, int]:
    """``(base, after merge)`` forward FLOPs of the tiny model with the method at its defaults."""
    model = apply_method(copy.deepcopy(_tiny(tiny)), method_name)
    merge(model)
    return base_flops(tiny, seq_len), forward_flops(model, seq_len)


@lru_cache(maxsize=512)
def _merged_flops_or_error(tiny: str, method_name: str) -> tuple[int, int] | str:
    """:func:`merged_flops`, or its one-line error: failures are cached too (measuring one costs a model copy)."""
    try:
        return merged_flops(tiny, method_name)
    except SurveyError as error:
        return str(error)


def changed_params_real(tiny: str, method_name: str, seed: int = 0) -> tuple[int, int]:
    """``(changed, base total)`` counted element by element on a real tiny model: the check of :func:`changed_params`.

    Every trainable value is moved (a stand-in for training), the method is merged, and the base elements
    that differ from their initial values are counted, plus the trainable parameters the method adds and
    keeps (those of a module that merged itself are folded away).
    """
    model = build_model(tiny, device="cpu", seed=seed)
    snapshot = [(p, p.detach().clone()) for p in model.parameters()]
    base_ids = {id(p) for p, _ in snapshot}
    apply_method(model, method_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.rand(p.shape, generator=generator, dtype=p.dtype) * 0.1 + 0.05)
    merge(model)
    merged_modules = [m for m in model.modules() if getattr(m, "merged", False)]
    folded = {id(p) for m in merged_modules for p in m.parameters()}
    changed = sum(int((p.detach() != old).sum()) for p, old in snapshot)
    changed += sum(p.numel() for p in model.parameters()
                   if p.requires_grad and id(p) not in base_ids and id(p) not in folded)
    return changed, sum(old.numel() for _, old in snapshot)


def read_benchmark(path: Path = LATENCY_CSV) -> dict[tuple[str, str], dict[str, float]]:
    """``(model, method) -> {latency_overhead_pct, flops_base, flops_merged}`` from the benchmark CSV.

    Empty when ``benchmarks/inference_overhead.py`` has not been run; a malformed row is a ``SurveyError``.
    """
    if not path.is_file():
        return {}
    out = {}
    with path.open(encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            try:
                out[(row["model"], row["method"])] = {
                    k: float(row[k]) for k in ("latency_overhead_pct", "flops_base", "flops_merged")}
            except (KeyError, TypeError, ValueError) as error:
                raise SurveyError(f"{path} line {reader.line_num}: bad value ({error})") from None
    return out


def memory_estimate(setting: Setting, method: Method) -> Any:
    """The memory model's estimate at ``setting``; ``FigureUnavailable`` while the memory model is missing."""
    try:
        from survey_utils.memory import estimate
    except ImportError:
        raise FigureUnavailable("survey_utils.memory.closed_form does not exist yet (memory model, issue 3)") from None
    return estimate(setting.model, method, {}, batch_size=setting.batch_size, seq_len=setting.seq_len,
                    dtype=setting.dtype, optimizer=setting.optimizer)


def memory_terms(result: Any) -> dict[str, int]:
    """The estimate's stacked terms in bytes (they add up to its ``total``), plus ``total``."""
    terms = {name: int(value) for name, value in result.terms().items()}
    return {**terms, "total": int(result.total)}


def comparison_rows(setting: Setting = TABLE_SETTING, flops: str = "measure") -> list[ComparisonRow]:
    """Lialin et al.'s comparison columns, measured for every registered method at ``setting``.

    ``flops="measure"`` counts the tiny model's FLOPs now (the figure does); ``flops="csv"`` takes them
    from ``data/inference_overhead.csv`` where it has the method (the widget does, to answer fast) and
    measures the rest.
    """
    if flops not in ("measure", "csv"):
        raise SurveyError(f"flops='{flops}' is not one of measure, csv")
    if setting.dtype not in DTYPE_BYTES:
        raise SurveyError(f"dtype '{setting.dtype}' is not one of {', '.join(DTYPE_BYTES)}")
    config = load_config(setting.model)
    base_total = total_params(config)
    tiny = tiny_for(setting.model)
    bench = read_benchmark()
    full_memory: int | None = None
    rows = []
    for method in list_methods():
        kind = lialin_type(method)
        try:
            trainable = closed_form(config, method).trainable
        except SurveyError as error:
            rows.append(ComparisonRow(method.name, kind, error=str(error)))
            continue
        memory, memory_error = None, None
        try:
            memory = int(memory_estimate(setting, method).total)
        except FigureUnavailable as error:
            memory_error = str(error)
        except SurveyError as error:
            memory_error = str(error)
        if method.is_baseline:
            full_memory = memory
        try:
            row = bench.get((tiny, method.name))
            if flops == "csv" and row is not None:
                flops_base, flops_merged = int(row["flops_base"]), int(row["flops_merged"])
            else:
                measured = _merged_flops_or_error(tiny, method.name)
                if isinstance(measured, str):
                    raise SurveyError(measured)
                flops_base, flops_merged = measured
            extra_flops: float | None = 100.0 * (flops_merged - flops_base) / flops_base
        except SurveyError as error:
            extra_flops, flops_error = None, str(error)
        else:
            flops_error = None
        changed, _ = changed_params(setting.model, method.name)
        rows.append(ComparisonRow(
            method=method.name, type=kind, storage_bytes=trainable * DTYPE_BYTES[setting.dtype],
            memory_bytes=memory, backprop_through_backbone=method.backprop_through_backbone,
            extra_flops_pct=extra_flops, extra_latency_pct=bench.get((tiny, method.name), {}).get("latency_overhead_pct"),
            base_quantized=method.base_quantization is not None,
            trainable_pct=100.0 * trainable / base_total, changed_pct=100.0 * changed / base_total,
            memory_error=memory_error, flops_error=flops_error))
    if full_memory:
        rows = [ComparisonRow(**{**r.__dict__, "memory_full_ratio": r.memory_bytes / full_memory})
                if r.memory_bytes else r for r in rows]
    return rows


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.1e}"


# Merged methods run the base model's graph, so their measured latency overheads are pure noise; latency is
# shown only when that noise floor is within this many percent.
LATENCY_NOISE_LIMIT_PCT = 5.0


def latency_noise(rows: list[ComparisonRow]) -> tuple[float, float] | None:
    """The spread of latency overheads among methods whose merged model runs the base model's graph on the base
    model's weights (no extra FLOPs, base not quantized), or None if none was measured. A quantized base (QLoRA,
    LoftQ, QA-LoRA, PEQA) counts no extra FLOPs (FlopCounterMode counts matrix products, not dequantization) but
    dequantizes its weights at every forward: its overhead (+12% to +88% in the CSV) is real, not noise."""
    floor = [r.extra_latency_pct for r in rows
             if r.extra_flops_pct == 0 and not r.base_quantized and r.extra_latency_pct is not None]
    return (min(floor), max(floor)) if floor else None


def latency_unmeasured(rows: list[ComparisonRow]) -> list[str]:
    """Methods with a row but no latency: ``data/inference_overhead.csv`` has no line for them on the tiny model."""
    return [r.method for r in rows if not r.error and r.extra_latency_pct is None]


def latency_trustworthy(rows: list[ComparisonRow]) -> bool:
    noise = latency_noise(rows)
    return noise is not None and max(abs(noise[0]), abs(noise[1])) <= LATENCY_NOISE_LIMIT_PCT


def table_cells(rows: list[ComparisonRow]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the comparison table (the figure and the chapter's widget share them)."""
    show_latency = latency_trustworthy(rows)
    header = ["method", "type", "storage", "memory (peak)", "backprop\nthrough backbone",
              "extra FLOPs\nafter merge", "extra latency\nafter merge", "% trainable", "% changed"]
    cells = []
    for r in rows:
        if r.error:
            cells.append([r.method, r.type, *["n/a (note)" for _ in header[2:]]])
            continue
        memory = "n/a (note)" if r.memory_bytes is None else format_bytes(r.memory_bytes) + (
            f" ({r.memory_full_ratio:.0%})" if r.memory_full_ratio else "")
        cells.append([
            r.method, r.type, format_bytes(r.storage_bytes or 0), memory,
            "yes" if r.backprop_through_backbone else "no",
            "n/a (note)" if r.extra_flops_pct is None else ("none" if abs(r.extra_flops_pct) < 1e-9
                                                     else f"+{r.extra_flops_pct:.2f}%"),
            ("not measured (note)" if r.extra_latency_pct is None else f"{r.extra_latency_pct:+.1f}%")
            if show_latency else "noisy (note)",
            _pct(r.trainable_pct), _pct(r.changed_pct)])
    return header, cells


def table_notes(rows: list[ComparisonRow]) -> list[str]:
    """One line for every n/a or "noisy" cell of :func:`table_cells`: why it is blank."""
    notes = [f"{r.method}: every column n/a: {r.error}" for r in rows if r.error]
    memory = [r for r in rows if not r.error and r.memory_bytes is None]
    if memory and len(memory) == len([r for r in rows if not r.error]):
        others = len({r.memory_error for r in memory}) - 1
        notes.append(f"memory n/a for every method: {memory[0].memory_error}"
                     + (f" (and {others} similar reasons)" if others else ""))
    else:
        notes += [f"{r.method}: memory n/a: {r.memory_error or 'no estimate'}" for r in memory]
    notes += [f"{r.method}: extra FLOPs n/a: {r.flops_error or 'not measured'}" for r in rows
              if not r.error and r.extra_flops_pct is None]
    noise = latency_noise(rows)
    if noise is None:
        notes.append("extra latency: not measured for this architecture's tiny model "
                     "(python benchmarks/inference_overhead.py writes data/inference_overhead.csv)")
    elif not latency_trustworthy(rows):
        notes.append(f"extra latency 'noisy': methods with no extra FLOPs and an unquantized base (the base model's "
                     f"graph on its own weights) measured "
                     f"{noise[0]:+.0f}% to {noise[1]:+.0f}%, beyond the {LATENCY_NOISE_LIMIT_PCT:.0f}% noise limit; "
                     "rerun benchmarks/inference_overhead.py on a quiet machine")
    elif unmeasured := latency_unmeasured(rows):
        notes.append(f"extra latency 'not measured' ({', '.join(unmeasured)}): no row in "
                     "data/inference_overhead.csv (the benchmark skips a method its tiny model rejects)")
    return notes


@figure("lialin_comparison", title="Lialin et al.'s comparison table, measured on our implementations",
        shows="for every registered method at default hyper-parameters on roberta-base: Lialin class, storage of "
              "the trainable state, peak training memory, whether gradients flow through the backbone, extra "
              "FLOPs and latency after merging (tiny model), % trainable and % changed",
        source="measured: closed-form counts, memory model, FlopCounterMode on the tiny model, "
               "data/inference_overhead.csv (latency, benchmarks/inference_overhead.py)",
        survey_counterpart="Lialin et al. 2023, Table 1 (type, storage, memory, backprop, inference overhead) "
                           "and Table 2 (% trainable, % changed)")
def lialin_comparison(out_dir: Path, setting: Setting = TABLE_SETTING) -> list[Path]:
    rows = comparison_rows(setting)
    header, cells = table_cells(rows)
    fig, ax = plt.subplots(figsize=(14, 0.25 * (len(cells) + 2) + 1.2))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=header, bbox=(0, 0, 1, 1), cellLoc="center",
                     colWidths=[0.12, 0.07, 0.09, 0.13, 0.1, 0.1, 0.11, 0.09, 0.09])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (r, _c), cell in table.get_celld().items():
        cell.set_edgecolor("#cccccc")
        if r == 0:
            cell.set_facecolor("#eeeeee")
            cell.set_height(cell.get_height() * 2)
            cell.get_text().set_fontweight("bold")
        elif r > 0:
            family = get_method(rows[r - 1].method).family
            if _c == 0:
                cell.get_text().set_color(FAMILY_COLOURS.get(family, "#222222"))
                cell.get_text().set_fontweight("bold")
    ax.set_title(f"Lialin et al.'s comparison (Tables 1-2), measured on our implementations: {setting.describe()}",
                 fontsize=10)
    memory_note = ("memory: peak of one training step from survey_utils.memory.closed_form (share of full "
                   "fine-tuning in brackets)" if any(r.memory_bytes for r in rows)
                   else "memory: n/a, the memory model (survey_utils.memory.closed_form) is not available")
    tiny = tiny_for(setting.model)
    errors = " ".join(f"{r.method}: {r.error}." for r in rows if r.error)
    noise = latency_noise(rows)
    if noise is not None and not latency_trustworthy(rows):
        errors += (f" Latency not shown: methods with no extra FLOPs and an unquantized base (the base model's graph "
                   f"on its own weights) measured "
                   f"{noise[0]:+.0f}% to {noise[1]:+.0f}%, beyond the {LATENCY_NOISE_LIMIT_PCT:.0f}% noise limit; "
                   "rerun benchmarks/inference_overhead.py on a quiet machine (raw values in the CSV).")
    elif noise is not None:
        errors += (f" Latency noise floor (methods with no extra FLOPs and an unquantized base): {noise[0]:+.1f}% to "
                   f"{noise[1]:+.1f}%; a quantized base dequantizes at every forward.")
        if unmeasured := latency_unmeasured(rows):
            errors += f" Latency not measured: {', '.join(unmeasured)} (no row for {tiny}: rejected at its defaults)."
    flops_na = [r.method for r in rows if not r.error and r.extra_flops_pct is None]
    if flops_na:
        errors += f" Extra FLOPs n/a: {', '.join(flops_na)} rejects {tiny} at its defaults."
    source_note(fig, (
        f"Measured here, not copied from the survey. storage: trainable params x {DTYPE_BYTES[setting.dtype]} bytes "
        f"({setting.dtype}). {memory_note}. backprop: Method.backprop_through_backbone. Extra FLOPs: "
        f"FlopCounterMode, forward of {tiny} on {FLOPS_SEQ_LEN} tokens after merge(). Extra latency: "
        "data/inference_overhead.csv (python benchmarks/inference_overhead.py). % of the base model's parameters; "
        "% changed = base tensors written by merge or trained in place + added parameters kept, whole tensors. "
        f"{errors}"))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return save_figure(fig, out_dir, "lialin_comparison", dpi=70)  # a row per method: keep the PNG under 300 KB


def trainable_across_zoo(models: list[str] | None = None) -> dict[str, list[tuple[str, int, float]]]:
    """``method -> [(model, total params, % trainable)]`` by the closed form; models a method rejects are left out."""
    models = [m for m in list_models() if not m.startswith("tiny")] if models is None else models
    result: dict[str, list[tuple[str, int, float]]] = {}
    for method in list_methods():
        if method.is_baseline:
            continue
        points = []
        for name in models:
            try:
                count = closed_form(name, method)
            except SurveyError:
                continue
            points.append((name, count.total, count.trainable_percent))
        result[method.name] = sorted(points, key=lambda p: p[1])
    return result


@figure("trainable_vs_size", title="% trainable parameters against model size, every implemented method",
        shows="closed-form % trainable of each registered method at its default hyper-parameters on every zoo "
              "model (tiny models excluded), against the model's total parameters",
        source="survey_utils.counting.closed_form over data/models/ (model configs)",
        survey_counterpart="Lialin et al. 2023, Table 2 (% trainable parameters), Wang et al. 2024 "
                           "(per-method trainable parameters); the surveys report single values, not curves")
def trainable_vs_size(out_dir: Path) -> list[Path]:
    data = trainable_across_zoo()
    skipped = [name for name, points in data.items() if not points]
    groups: dict[str, list[str]] = {}
    for name, points in data.items():
        if points:  # a family with no point on any model gets no panel
            groups.setdefault(get_method(name).family, []).append(name)
    ncols = 2
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(13, 4.0 * nrows), sharex=True, sharey=True, squeeze=False)
    for ax, (family, names) in zip(axes.flat, groups.items(), strict=False):
        for name in names:  # points, not lines: sizes of different architectures do not join into a curve
            colour, marker = method_style(name)
            points = data[name]
            ax.scatter([p[1] for p in points], [p[2] for p in points], marker=marker, s=22, color=colour,
                       edgecolor="white", linewidth=0.4, label=f"{name} ({len(points)} models)", zorder=3)
        ax.set_title(family.replace("_", " "), fontsize=10, color=FAMILY_COLOURS.get(family, "#333333"))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    for ax in axes.flat[len(groups):]:
        ax.remove()
    for ax in axes.flat[:len(groups)]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("% trainable (of the adapted model)")
    ticks = [1e8, 1e9, 1e10, 1e11]
    for ax in axes.flat[:len(groups)]:
        ax.set_xticks(ticks, [human(t) for t in ticks])
        ax.set_xlabel("total parameters of the model (closed form)")
        ax.tick_params(labelbottom=True, labelleft=True)
    fig.suptitle("% trainable parameters against model size, default hyper-parameters (one point per zoo model)",
                 fontsize=11)
    note = f" Not applicable to any zoo model: {', '.join(skipped)}." if skipped else ""
    source_note(fig, "Computed: survey_utils.counting.closed_form for every registered method on every non-tiny "
                     "model of data/models/; a method that rejects a model (SurveyError) has no point there. Colours "
                     "and markers: survey_utils.palette (the same method, the same style in every figure)." + note)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(fig, out_dir, "trainable_vs_size", dpi=90)  # a marker per method and model: under 300 KB


MEMORY_COLOURS = TERM_COLOURS  # the palette's, as in chapter 00's explorer


def memory_breakdowns(setting: Setting = MEMORY_SETTING) -> dict[str, dict[str, int] | str]:
    """``method -> memory terms`` at ``setting``, or the one-line reason the estimate failed."""
    out: dict[str, dict[str, int] | str] = {}
    for method in list_methods():
        try:
            out[method.name] = memory_terms(memory_estimate(setting, method))
        except FigureUnavailable:
            raise
        except SurveyError as error:
            out[method.name] = str(error)
    return out


@figure("memory_breakdown", title="Memory of one training step, term by term, every implemented method",
        shows="the memory terms present at the peak of one training step (weights, optimizer states, "
              "activations, logits and loss, gradients or the optimizer step, batch) for every registered method at "
              "llama-2-7b, batch 1 x 512 tokens, bf16, AdamW",
        source="survey_utils.memory.closed_form (memory model)",
        survey_counterpart="Lialin et al. 2023, Table 1 'memory' column; Xu et al. 2023's GPU-memory "
                           "measurements (table not read)")
def memory_breakdown(out_dir: Path, setting: Setting = MEMORY_SETTING) -> list[Path]:
    data = memory_breakdowns(setting)
    names = list(data)
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(names) + 1.8))
    gib = 2**30
    labelled: set[str] = set()
    for i, name in enumerate(names):
        terms = data[name]
        if isinstance(terms, str):
            ax.text(0, i, f"  n/a: {terms[:90]}", va="center", fontsize=7, color="#b00020")
            continue
        left = 0.0
        for term, value in terms.items():
            if term == "total":
                continue
            ax.barh(i, value / gib, left=left, color=MEMORY_COLOURS.get(term, "#999999"), height=0.7,
                    label=None if term in labelled else term)
            labelled.add(term)
            left += value / gib
        ax.text(terms["total"] / gib, i, f" {format_bytes(terms['total'])}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GiB (peak of one training step; allocated, no CUDA context or allocator cache)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, frameon=False,
              title="term at the peak", title_fontsize=8)
    ax.set_title(f"Memory of one training step: {setting.describe()}", fontsize=11)
    source_note(fig, "Estimated by survey_utils.memory.closed_form (the memory model; chapter 00 checks it against "
                     "a simulated step): the terms present at the moment of the peak, which add up to it.")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, out_dir, "memory_breakdown")


@figure("memory_validation", title="Memory model: estimate against simulated step",
        shows="the memory model's estimate against a fake-tensor simulation of the training step over a grid",
        source="data/memory_validation.csv (benchmarks of the memory model); drawn by "
               "survey_utils.memory.validation_figure",
        survey_counterpart="none (the surveys report measured memory for a few settings only)",
        stem=VALIDATION_STEM)
def memory_validation(out_dir: Path) -> list[Path]:
    try:
        from survey_utils.memory import validation_figure
    except ImportError:
        raise FigureUnavailable("survey_utils.memory.validation_figure does not exist yet (memory model, issue 3)"
                                ) from None
    csv_path = DATA_DIR / "memory_validation.csv"
    if not csv_path.is_file():
        raise FigureUnavailable(f"{csv_path.name} is missing: run the memory helper's grid benchmark "
                                "(benchmarks/memory_grid.py) first")
    result = validation_figure(out_dir)
    paths = [Path(p) for p in result] if result else sorted(Path(out_dir).glob(f"{VALIDATION_STEM}.*"))
    if not paths:
        raise SurveyError("survey_utils.memory.validation_figure wrote no file")
    return paths

