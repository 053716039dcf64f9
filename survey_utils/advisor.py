"""What fits my GPUs: every registered method at its defaults, on N GPUs of a given memory (chapter 06).

For each method the advisor asks the closed-form memory model (:func:`survey_utils.memory.closed_form`), spread
over the GPUs by :mod:`survey_utils.memory.sharding`, with the reserved memory of
:func:`survey_utils.memory.allocator.reserved_closed_form` and the CUDA context on top:

- **fits**: some sharding fits at batch 1 and the requested sequence length;
- **sharding**: the cheapest that fits, trying in order (cheapest first) every strategy without gradient
  checkpointing, then every strategy with it (about a third more compute), then CPU offload;
- **max_batch**: the largest per-GPU batch at that sequence length with the chosen sharding;
- **max_seq_len**: the largest sequence length at batch 1 (at most the model's context);
- **terms**: the per-GPU bytes of the chosen point, reserved overhead and CUDA context included.

Speed: every term of the estimate is affine in the batch and at most quadratic in the sequence length (linear
layers: b s h; attention scores: b h s^2; rotary tables: s), so a handful of estimates per method determine
them; the searches then run on the closed polynomials (no estimate per candidate), and the answer is checked
against a fresh estimate (``tests/test_advisor.py`` compares with a brute-force search). Torch-free.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from survey_utils.architecture import layout
from survey_utils.errors import SurveyError
from survey_utils.memory.allocator import (
    CUDA_CONTEXT_BYTES,
    CUDA_CONTEXT_SOURCE,
    cached_rounding,
    persistent_tensors,
    reserved_closed_form,
)
from survey_utils.memory.closed_form import MemoryEstimate, estimate
from survey_utils.memory.sharding import (
    SHARDS_PARAMS,
    PerGPU,
    Sharding,
    candidates,
    check_sharding,
    per_gpu,
    units,
)
from survey_utils.methods.registry import Method, get_method, list_methods
from survey_utils.zoo import DATA_DIR, load_config

GPUS_CSV = DATA_DIR / "gpus.csv"
SEQ_CAP = 1 << 20  # the search's ceiling for models without a position limit (T5's relative positions)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*$")


def parse_memory(text: str) -> int:
    """``'48GB'`` -> 48e9 bytes, ``'48GiB'`` -> 48 * 2**30; a number without a unit is refused (which one?)."""
    match = _SIZE.match(str(text))
    if match is None:
        if re.match(r"^\s*[0-9.]+\s*$", str(text)):
            raise SurveyError(f"gpu memory '{text}' has no unit: write e.g. {text.strip()}GB (10^9 bytes) or "
                              f"{text.strip()}GiB (2^30 bytes)")
        raise SurveyError(f"gpu memory '{text}' is not a size like 48GB or 80GiB")
    value, unit = float(match.group(1)), match.group(2).upper()
    if unit not in _UNITS:
        raise SurveyError(f"gpu memory '{text}': unit '{match.group(2)}' is not one of B, KB, MB, GB, TB, KiB, MiB, "
                          "GiB, TiB")
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise SurveyError(f"gpu memory '{text}' must be positive")
    return nbytes


def gpu_table(path: str | Path | None = None) -> list[dict[str, Any]]:
    """``data/gpus.csv``: common GPUs, their memory and the vendor page that states it."""
    with Path(path or GPUS_CSV).open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["memory_bytes"] = parse_memory(row["memory"])
    return rows


@dataclass(frozen=True)
class Point:
    """One GPU's memory at a (sharding, checkpointing, batch, sequence) point."""

    sharding: Sharding
    gradient_checkpointing: bool
    allocated: int
    reserved: int
    cuda_context: int
    terms: dict[str, int]
    assumptions: list[str]

    @property
    def device_total(self) -> int:
        return self.reserved + self.cuda_context


@dataclass(frozen=True)
class AdviceRow:
    """The advisor's answer for one method (``error``: why the method cannot run on this model at all)."""

    method: str
    fits: bool
    max_batch: int
    max_seq_len: int
    sharding: str | None
    gradient_checkpointing: bool | None
    reserved: int | None
    allocated: int | None
    terms: dict[str, int]
    assumptions: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "fits": self.fits, "max_batch": self.max_batch,
                "max_seq_len": self.max_seq_len, "sharding": self.sharding,
                "gradient_checkpointing": self.gradient_checkpointing, "reserved": self.reserved,
                "allocated": self.allocated, "terms": self.terms, "assumptions": self.assumptions,
                "error": self.error}


@dataclass(frozen=True)
class Advice:
    model: str
    gpu_memory: int
    gpus: int
    seq_len: int
    rows: list[AdviceRow]
    assumptions: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "gpu_memory": self.gpu_memory, "gpus": self.gpus, "seq_len": self.seq_len,
                "cuda_context": CUDA_CONTEXT_BYTES, "rows": [r.as_dict() for r in self.rows],
                "assumptions": self.assumptions}


# ------------------------------------------------------------------------------------------ one method
_VARYING = ("activations", "loss_transient", "batch")


class _Curve:
    """The estimate as a function of (batch, seq): exact from a few samples (affine in b, quadratic in s)."""

    def __init__(self, config: Any, method: Method, seq_len: int, ckpt: bool, settings: dict[str, Any]) -> None:
        self.config, self.method, self.ckpt, self.settings = config, method, ckpt, settings
        self.seq_len = seq_len
        self.base = self._est(1, seq_len)
        self._b2: MemoryEstimate | None = None
        self._s: list[tuple[int, MemoryEstimate]] | None = None
        self._poly: dict[str, tuple[list[int], int]] = {}

    def _est(self, b: int, s: int) -> MemoryEstimate:
        return estimate(self.config, self.method, batch_size=b, seq_len=s, gradient_checkpointing=self.ckpt,
                        quantization=self.method.base_quantization, **self.settings)

    @staticmethod
    def _values(e: MemoryEstimate) -> dict[str, int]:
        out = {k: getattr(e, k) for k in _VARYING}
        for term, value in e.activations_by_term.items():
            out["term:" + term] = value
        return out

    @staticmethod
    def _build(template: MemoryEstimate, values: dict[str, int]) -> MemoryEstimate:
        ints = {k: max(0, int(v)) for k, v in values.items()}
        by_term = {k[5:]: v for k, v in ints.items() if k.startswith("term:")}
        return dataclasses.replace(template, activations_by_term=by_term,
                                   **{k: ints[k] for k in _VARYING})

    def without_activations(self) -> MemoryEstimate:
        """The step with no batch, activations or loss: a floor no sequence length goes under."""
        return self._build(self.base, {k: 0 for k in self._values(self.base)})

    def at_batch(self, b: int) -> MemoryEstimate:
        if b == 1:
            return self.base
        if self._b2 is None:
            self._b2 = self._est(2, self.seq_len)
        v1, v2 = self._values(self.base), self._values(self._b2)
        return self._build(self.base, {k: v1[k] + (b - 1) * (v2.get(k, 0) - v1[k]) for k in v1})

    def at_seq(self, s: int, s_max: int) -> MemoryEstimate:
        if s == self.seq_len:
            return self.base
        if self._s is None:
            xs = sorted({max(1, self.seq_len // 2), self.seq_len, s_max})
            if len(xs) < 3:
                xs = sorted({1, 2, 3} | set(xs))[-3:] if s_max >= 3 else xs
            self._s = [(x, self.base if x == self.seq_len else self._est(1, x)) for x in xs]
            pts = [(x, self._values(e)) for x, e in self._s]
            keys = sorted(set().union(*(v for _, v in pts)))
            self._poly = {k: _interpolant([(x, v.get(k, 0)) for x, v in pts]) for k in keys}
        return self._build(self.base, {k: _evaluate(poly, s) for k, poly in self._poly.items()})


def _interpolant(points: list[tuple[int, int]]) -> tuple[list[int], int]:
    """The polynomial through ``points`` (degree <= 2 for three points) as integer coefficients over one integer
    denominator (Lagrange's form brought to a common denominator), so each evaluation is exact integer arithmetic."""
    denominators = [math.prod(xi - xj for j, (xj, _) in enumerate(points) if j != i) for i, (xi, _) in enumerate(points)]
    common = math.prod(denominators)
    coefficients = [0] * len(points)
    for i, (_, yi) in enumerate(points):
        basis = [1]  # prod_{j != i} (x - x_j), lowest power first
        for j, (xj, _) in enumerate(points):
            if j != i:
                basis = [a - xj * b for a, b in zip([0, *basis], [*basis, 0], strict=True)]
        for power, c in enumerate(basis):
            coefficients[power] += yi * c * (common // denominators[i])
    return coefficients, common


def _evaluate(poly: tuple[list[int], int], x: int) -> int:
    """The interpolant at ``x``, truncated toward zero (as ``int`` of the exact fraction)."""
    coefficients, common = poly
    numerator = sum(c * x**power for power, c in enumerate(coefficients))
    quotient = abs(numerator) // abs(common)
    return quotient if (numerator >= 0) == (common > 0) else -quotient


_ROUNDINGS: dict[tuple[Any, ...], int] = {}
_LAYOUTS: dict[int, tuple[Any, Any]] = {}


def _layout(config: Any) -> Any:
    """``layout(config)``, remembered per config object (the zoo's configs are shared and read-only)."""
    cached = _LAYOUTS.get(id(config))
    if cached is None or cached[0] is not config:
        cached = _LAYOUTS[id(config)] = (config, layout(config))
    return cached[1]



def _rounding(config: Any, method: Method, est: MemoryEstimate, sharding: Sharding) -> int:
    """Block rounding of the persistent tensors: one flat shard per unit under ZeRO-3 / FULL_SHARD, the
    tensors one by one otherwise (:func:`survey_utils.memory.allocator.persistent_tensors`); remembered per
    model, storage and sharding."""
    key = (getattr(config, "name_or_path", id(config)), est.total_params, est.weights, est.optimizer_states,
           method.trains_whole_model, method.base_quantization, sharding.strategy, sharding.gpus)
    if key not in _ROUNDINGS:
        _ROUNDINGS[key] = _compute_rounding(config, method, est, sharding)
    return _ROUNDINGS[key]


def _compute_rounding(config: Any, method: Method, est: MemoryEstimate, sharding: Sharding) -> int:
    if sharding.strategy in SHARDS_PARAMS:
        u = units(_layout(config))
        per_param = est.weights / max(est.total_params, 1)
        n = sharding.gpus
        shards = [int(u.largest_block * per_param) // n] * u.blocks + [int(u.root * per_param) // n]
        return cached_rounding(shards)
    states = method.trains_whole_model and sharding.strategy in ("single", "ddp")
    return cached_rounding(persistent_tensors(config, method, est, optimizer_states=states))


def point(config: Any, method: Method, est: MemoryEstimate, sharding: Sharding, ckpt: bool,
          rounding: int | None = None) -> Point:
    """Per-GPU allocated, reserved and device total of ``est`` under ``sharding``, with the terms."""
    gpu: PerGPU = per_gpu(est, _layout(config), sharding, method.trains_whole_model)
    fixed = gpu.terms["weights"] + gpu.terms["optimizer states"] + gpu.terms.get("DDP gradient buckets", 0)
    if rounding is None:
        rounding = _rounding(config, method, est, sharding)
    reserved, note = reserved_closed_form(gpu.total, rounding, gpu.total - fixed, ckpt)
    terms = dict(gpu.terms)
    terms["allocator reserve"] = reserved - gpu.total
    terms["CUDA context"] = CUDA_CONTEXT_BYTES
    return Point(sharding, ckpt, gpu.total, reserved, CUDA_CONTEXT_BYTES,
                 terms, [*gpu.assumptions, note, CUDA_CONTEXT_SOURCE])


def _fits(p: Point, capacity: int) -> bool:
    return p.device_total <= capacity


def advise_method(config: Any, method: Method, capacity: int, gpus: int, seq_len: int, s_max: int,
                  shardings: list[Sharding], settings: dict[str, Any] | None = None) -> AdviceRow:
    """The row of one method (see the module docstring)."""
    settings = settings or {}
    try:
        curves = {False: _Curve(config, method, seq_len, False, settings)}
    except SurveyError as error:
        return AdviceRow(method.name, False, 0, 0, None, None, None, None, {}, error=str(error))
    chosen: tuple[Sharding, bool] | None = None
    order = [(s, False) for s in shardings if s.offload == "none"] + \
            [(s, True) for s in shardings if s.offload == "none"] + \
            [(s, ck) for ck in (False, True) for s in shardings if s.offload != "none"]
    rounding_cache: dict[tuple[str, int], int] = {}

    def at(curve: _Curve, est: MemoryEstimate, sharding: Sharding) -> Point:
        key = (sharding.strategy, sharding.gpus)
        if key not in rounding_cache:
            rounding_cache[key] = _rounding(config, method, curve.base, sharding)
        return point(config, method, est, sharding, curve.ckpt, rounding_cache[key])

    ckpt_error = None
    for sharding, ckpt in order:
        if ckpt not in curves:
            try:
                curves[ckpt] = _Curve(config, method, seq_len, ckpt, settings)
            except SurveyError as error:  # prefix methods refuse checkpointing
                ckpt_error = str(error)
                curves[ckpt] = None  # type: ignore[assignment]
        curve = curves[ckpt]
        if curve is None:
            continue
        if _fits(at(curve, curve.base, sharding), capacity):
            chosen = (sharding, ckpt)
            break
    if chosen is None:
        # Nothing fits at batch 1: report the largest sequence with the most memory-saving choice there is.
        sharding, ckpt = order[-1] if curves.get(True) is not None else \
            [o for o in order if not o[1]][-1]
        curve = curves[ckpt]
        best = at(curve, curve.base, sharding)
        floor = curve.without_activations()
        max_s = 0 if not _fits(at(curve, floor, sharding), capacity) else \
            _largest(lambda s: _fits(at(curve, curve.at_seq(s, s_max), sharding), capacity), s_max)
        notes = best.assumptions + ([f"gradient checkpointing unavailable: {ckpt_error}"] if ckpt_error else [])
        return AdviceRow(method.name, False, 0, max_s, None, None, best.reserved, best.allocated,
                         best.terms, notes)
    sharding, ckpt = chosen
    curve = curves[ckpt]
    best = at(curve, curve.base, sharding)
    max_b = _largest(lambda b: _fits(at(curve, curve.at_batch(b), sharding), capacity), 1 << 24)
    max_s = _largest(lambda s: _fits(at(curve, curve.at_seq(s, s_max), sharding), capacity), s_max)
    return AdviceRow(method.name, True, max_b, max_s, sharding.label, ckpt, best.reserved, best.allocated,
                     best.terms, best.assumptions)


def _largest(ok: Any, upper: int) -> int:
    """The largest x in [1, upper] with ok(x) for a monotone ok (0 when ok(1) fails)."""
    if not ok(1):
        return 0
    lo, hi = 1, 1
    while hi < upper and ok(min(hi * 2, upper)):
        lo = hi = min(hi * 2, upper)
        if hi == upper:
            return upper
    hi = min(hi * 2, upper)
    while lo < hi:  # ok(lo) holds, ok(hi) fails
        mid = (lo + hi + 1) // 2
        if mid == hi:
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------------------- all
def advise(model: str, gpu_memory: int | str, gpus: int = 1, seq_len: int | None = None,
           methods: list[str] | None = None, sharding: str | None = None, dtype: str = "bf16",
           optimizer: str = "adamw") -> Advice:
    """Every registered method (or ``methods``) at its defaults on ``gpus`` GPUs of ``gpu_memory`` each."""
    capacity = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
        raise SurveyError(f"gpu memory {gpu_memory!r} must be a positive number of bytes")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise SurveyError(f"gpus={gpus!r} must be a positive integer")
    config = load_config(model)
    shape = layout(config)
    context = shape.max_positions or SEQ_CAP
    seq_len = min(2048, context) if seq_len is None else seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise SurveyError(f"seq_len={seq_len!r} must be a positive integer")
    if seq_len > context:
        raise SurveyError(f"seq_len={seq_len} exceeds the context of {model} ({context} positions)")
    if sharding is not None:
        check_sharding(sharding, gpus)
        shardings = [Sharding(sharding, gpus)]
    else:
        shardings = candidates(gpus)
    chosen = [get_method(m) for m in methods] if methods else list_methods()
    settings = {"dtype": dtype, "optimizer": optimizer}
    rows = []
    for method in chosen:
        s_max = context
        if method.extra_positions is not None:
            try:
                s_max = context - method.extra_positions(config, **method.resolve(config))
            except SurveyError:
                s_max = context
        rows.append(advise_method(config, method, capacity, gpus, min(seq_len, max(s_max, 1)), max(s_max, 1),
                                  shardings, settings))
    notes = [f"each method at its registered defaults, {dtype} weights and activations, {optimizer}, SDPA "
             "attention, CUDA kernels; frozen bases stored as the method implies (QLoRA: NF4)",
             f"fits: reserved memory + CUDA context <= {capacity:,} B per GPU",
             "sharding tried cheapest first: " + ", ".join(s.label for s in shardings)
             + "; each without gradient checkpointing, then with it, then with CPU offload",
             f"max_seq_len is capped by the model's context ({context:,} positions) and by positions a method adds"]
    return Advice(str(model), capacity, gpus, seq_len, rows, notes)


def format_advice(advice: Advice) -> str:
    """The text table of ``python -m survey_utils advise``."""
    from survey_utils.units import format_bytes

    lines = [f"model {advice.model}  {advice.gpus} x {format_bytes(advice.gpu_memory)} "
             f"({advice.gpu_memory:,} B)  seq_len {advice.seq_len}",
             f"{'method':<18} {'fits':<5} {'sharding':<34} {'ckpt':<5} {'max batch':>9} {'max seq':>8} "
             f"{'reserved':>10}"]
    for row in advice.rows:
        if row.error:
            lines.append(f"{row.method:<18} n/a   {row.error}")
            continue
        lines.append(f"{row.method:<18} {'yes' if row.fits else 'no':<5} {row.sharding or '-':<34} "
                     f"{'-' if row.gradient_checkpointing is None else ('yes' if row.gradient_checkpointing else 'no'):<5} "
                     f"{row.max_batch:>9} {row.max_seq_len:>8} "
                     f"{format_bytes(row.reserved) if row.reserved is not None else '-':>10}")
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in advice.assumptions]
    return "\n".join(lines)


__all__ = ["Advice", "AdviceRow", "advise", "advise_method", "format_advice", "gpu_memory_of", "gpu_table",
           "parse_memory"]


def gpu_memory_of(memory: str | None, gpu: str | None = None) -> int:
    """Bytes of one GPU from ``--gpu-memory`` (with its unit) or ``--gpu`` (a name of ``data/gpus.csv``, whose
    capacities are the vendors' nominal figures read as binary units: pass ``--gpu-memory`` with the total
    ``nvidia-smi`` shows to be exact)."""
    from survey_utils.errors import closest

    if (memory is None) == (gpu is None):
        raise SurveyError("give exactly one of --gpu-memory (e.g. 48GB) and --gpu (a name of data/gpus.csv)")
    if memory is not None:
        return parse_memory(memory)
    table = {row["name"]: row for row in gpu_table()}
    if gpu not in table:
        raise SurveyError(f"unknown gpu '{gpu}'; choose one of: {closest(str(gpu), list(table))}")
    return table[gpu]["memory_bytes"]
