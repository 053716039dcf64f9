"""Chapter 06's explorers: what quantization does to a weight, and what a quantized base saves in a training step.

- :class:`QuantizationExplorer`: bits (4: NF4, 8: absmax int8), block size (:data:`BLOCKSIZES`: those
  bitsandbytes' kernels accept that divide every weight offered) and double quantization -> the histogram of a
  real-shaped weight beside its reconstruction's, the relative error and the bytes per weight.
- :class:`QLoRAMemoryExplorer`: model (the zoo and LLaMA-65B), base storage (bf16, int8, nf4), rank, optimizer
  and gradient checkpointing -> the stacked memory terms of one QLoRA step (chapter 00's memory model), with
  the 48 GB of QLoRA's claim marked.

Both follow :class:`~survey_utils.widgets.base.Explorer`: ``compute`` is pure, bad settings give one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from survey_utils import quantization as Q
from survey_utils.errors import SurveyError
from survey_utils.palette import MEMORY_TERMS, TERM_COLOURS
from survey_utils.plotting import nice_ceiling
from survey_utils.widgets.base import TITLE_Y, Explorer

SHAPES = {"Qwen2.5-0.5B q_proj (896 x 896)": (896, 896), "Qwen2.5-0.5B MLP up (4864 x 896)": (4864, 896),
          "tiny-llama MLP down (128 x 344)": (128, 344)}
"""Real models' weight shapes (Gaussian values at the zoo's init std 0.02: no weights are downloaded)."""
BINS = 80
BNB_BLOCKSIZES = tuple(2**k for k in range(5, 13))
"""The block sizes bitsandbytes' blockwise kernels accept, 32 to 4096 (bitsandbytes 0.50, ``_ops.py``: every
``quantize_4bit``, ``dequantize_4bit`` and ``quantize_blockwise`` checks ``blocksize in (32, 64, ..., 4096)``;
tests/widgets/test_quantization_widget.py asks bitsandbytes itself)."""
BLOCKSIZES = tuple(b for b in BNB_BLOCKSIZES if all(rows * cols % b == 0 for rows, cols in SHAPES.values()))
"""The block sizes the explorer offers: bitsandbytes' that divide every weight of :data:`SHAPES` (a block size
that does not divide the tensor is refused by :mod:`survey_utils.quantization`), so no choice a reader can make
is refused, whichever weight is picked."""


@dataclass
class QuantView:
    """What :class:`QuantizationExplorer` plots: the two histograms (same edges), the error and the bytes."""

    edges: np.ndarray
    original: np.ndarray
    reconstructed: np.ndarray
    levels: int
    relative_error: float
    bytes_per_weight: float
    label: str


@lru_cache(maxsize=4)
def _weight(shape: tuple[int, int]) -> Any:
    from survey_utils.experiments.ch06_quantized import real_shaped_weight

    return real_shaped_weight(*shape)


@lru_cache(maxsize=4)
def _weight_histogram(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The weight's bin edges (symmetric about 0) and its histogram: the same for every setting."""
    values = _weight(shape).reshape(-1).numpy()
    limit = float(np.abs(values).max())
    edges = np.linspace(-limit, limit, BINS + 1)
    return edges, np.histogram(values, edges)[0]


@lru_cache(maxsize=64)
def quantization_view(weight_shape: str, bits: int, blocksize: int, double_quant: bool) -> QuantView:
    """The explorer's data (pure, so cached: a block size visited again costs nothing). Defined for chapter 06,
    section "NF4 from scratch" (the quantization explorer)."""
    if weight_shape not in SHAPES:
        raise SurveyError(f"weight '{weight_shape}' is not one of {', '.join(SHAPES)}")
    weight = _weight(SHAPES[weight_shape])
    approx = Q.quantize_dequantize(weight, bits, blocksize, double_quant)
    edges, original = _weight_histogram(SHAPES[weight_shape])
    # a few distinct values: their histogram, each weighted by how often it occurs (one sort, not two passes)
    levels, counts = np.unique(approx.reshape(-1).numpy(), return_counts=True)
    dq = double_quant and bits == 4
    label = (f"{'NF4' if bits == 4 else 'int8 absmax'}, block {blocksize}{', double quant' if dq else ''}")
    return QuantView(edges, original, np.histogram(levels, edges, weights=counts)[0].astype(original.dtype),
                     int(levels.size), Q.reconstruction_error(weight, approx)["relative"],
                     Q.bytes_per_weight(bits, blocksize, double_quant), label)


class QuantizationExplorer(Explorer):
    """Bits, block size, double quantization -> histograms of a weight and its reconstruction, error, bytes."""

    relayout_on = ()

    def __init__(self, weight_shape: str = next(iter(SHAPES)), bits: int = 4, blocksize: int = Q.NF4_BLOCKSIZE,
                 double_quant: bool = True) -> None:
        if blocksize not in BLOCKSIZES:  # a Dropdown would raise a TraitError with a traceback
            raise SurveyError(f"blocksize={blocksize!r} is not one of the explorer's block sizes "
                              f"({', '.join(map(str, BLOCKSIZES))}: bitsandbytes' that divide every weight offered)")
        controls = {
            "weight_shape": W.Dropdown(options=list(SHAPES), value=weight_shape, description="weight"),
            "bits": W.Dropdown(options=list(Q.BITS), value=bits, description="bits"),
            # Only sizes that every weight accepts: a slider over a range offered sizes the explorer then refused
            # (80 does not divide 128 x 344). A Dropdown, not a SelectionSlider: tests/fuzz drives Dropdowns.
            "blocksize": W.Dropdown(options=list(BLOCKSIZES), value=blocksize, description="block size"),
            "double_quant": W.Checkbox(value=double_quant, description="double quantization (4 bits)"),
        }
        super().__init__(controls, figsize=(10, 3.6), title="Quantization explorer")

    def setup(self, fig: Figure) -> None:
        self.ax_hist, self.ax_bars = fig.subplots(1, 2, width_ratios=(3, 1))
        self.hist_original = self.ax_hist.stairs(np.ones(BINS), np.arange(BINS + 1), label="weight (fp32)",
                                                 color="#4d4d4d")
        self.hist_rebuilt = self.ax_hist.stairs(np.ones(BINS), np.arange(BINS + 1), label="reconstruction",
                                                color="#e6ab02", fill=True, alpha=0.6)
        self.ax_hist.set_yscale("log")
        self.ax_hist.set_xlabel("value")
        self.ax_hist.set_ylabel("weights per bin")
        self.legend = self.ax_hist.legend(fontsize=8, loc="upper right")
        self.bars = self.ax_bars.bar(["relative\nerror (%)", "bytes /\nweight x 10"], [0, 0],
                                     color=["#d95f02", "#7570b3"])
        self.bar_labels = [self.ax_bars.text(i, 0, "", ha="center", va="bottom", fontsize=8) for i in (0, 1)]
        self.ax_bars.set_ylim(0, 15)

    def compute(self, weight_shape: str, bits: int, blocksize: int, double_quant: bool) -> QuantView:
        return quantization_view(weight_shape, bits, blocksize, double_quant)

    def draw(self, view: QuantView) -> None:
        self.hist_original.set_data(view.original, view.edges)
        self.hist_rebuilt.set_data(view.reconstructed, view.edges)
        self.ax_hist.set_xlim(view.edges[0], view.edges[-1])
        # whole decades, not a jitter: the frame stays while the block size moves the reconstruction's counts
        self.ax_hist.set_ylim(0.5, 10 ** math.ceil(math.log10(max(view.original.max(), view.reconstructed.max()) * 2)))
        self.ax_hist.set_title(f"{view.label}: {view.levels} distinct values", fontsize=10, y=TITLE_Y)
        heights = [100 * view.relative_error, 10 * view.bytes_per_weight]
        for bar, text, height, shown in zip(self.bars, self.bar_labels, heights,
                                            (f"{100 * view.relative_error:.2f}%", f"{view.bytes_per_weight:.4f} B"),
                                            strict=True):
            bar.set_height(height)
            text.set_position((bar.get_x() + bar.get_width() / 2, height))
            text.set_text(shown)
        self.ax_bars.set_ylim(0, max(15.0, nice_ceiling(max(heights) * 1.2)))

    def dynamic_artists(self) -> list[Any]:
        # the legend sits over the histograms: drawn after them, as a full render does
        return [self.hist_original, self.hist_rebuilt, self.legend, self.ax_hist.title, *self.bars,
                *self.bar_labels]


# --- the QLoRA memory explorer ----------------------------------------------------------------------------

BASES = ("bf16", "int8", "nf4")
OPTIMIZERS = {"AdamW": "adamw", "AdamW 8-bit": "adamw8bit", "paged AdamW (same bytes, spills to CPU)": "adamw"}
CLAIM_GB = "qlora_65b_single_gpu"


@dataclass
class QLoRAMemoryView:
    """Stacked terms (bytes) of each base storage, the chosen one first; the claim's line in GB."""

    bases: list[str]
    terms: list[dict[str, int]]
    claim_gb: float
    model: str
    notes: list[str] = field(default_factory=list)


@lru_cache(maxsize=256)
def qlora_memory_view(model: str, base: str, r: int, optimizer: str, gradient_checkpointing: bool,
                      batch_size: int = 1, seq_len: int = 512) -> QLoRAMemoryView:
    """Memory terms of one QLoRA step for every base storage (pure, so cached: a rank visited again costs
    nothing). Defined for chapter 06, section "QLoRA's memory"."""
    from survey_utils.experiments.ch06_quantized import claim_configs, read_claims
    from survey_utils.memory import estimate

    if base not in BASES:
        raise SurveyError(f"base '{base}' is not one of {', '.join(BASES)}")
    if optimizer not in OPTIMIZERS:
        raise SurveyError(f"optimizer '{optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    claims = read_claims()
    config: Any = claim_configs(claims)[model] if model == "llama-65b" else model
    hp = {"r": r, "lora_alpha": claims["qlora_lora_alpha"].value, "bnb_4bit_use_double_quant": True}
    terms = []
    for storage in BASES:
        est = estimate(config, "qlora", hp=hp, quantization=None if storage == "bf16" else storage,
                       optimizer=OPTIMIZERS[optimizer], gradient_checkpointing=gradient_checkpointing,
                       batch_size=batch_size, seq_len=seq_len)
        terms.append(est.terms())
    return QLoRAMemoryView(list(BASES), terms, claims[CLAIM_GB].value, model)


class QLoRAMemoryExplorer(Explorer):
    """Model, base storage, rank, optimizer, checkpointing -> stacked memory terms of one QLoRA step."""

    relayout_on = ()

    def __init__(self, models: list[str], model: str = "llama-65b", r: int = 64) -> None:
        controls = {
            "model": W.Dropdown(options=models, value=model, description="model"),
            "base": W.Dropdown(options=list(BASES), value="nf4", description="base"),
            "r": W.IntSlider(value=r, min=1, max=256, description="rank r", continuous_update=False),
            "optimizer": W.Dropdown(options=list(OPTIMIZERS), value="AdamW", description="optimizer"),
            "gradient_checkpointing": W.Checkbox(value=True, description="gradient checkpointing"),
        }
        super().__init__(controls, figsize=(10, 3.4), title="QLoRA memory explorer")

    def setup(self, fig: Figure) -> None:
        self.ax = fig.subplots()
        self.stacks = {term: self.ax.barh(range(len(BASES)), [0] * len(BASES), color=TERM_COLOURS[term], label=term)
                       for term in MEMORY_TERMS}
        self.claim_line = self.ax.axvline(0, color="#b00020", linestyle="--", label="QLoRA's 48 GB GPU")
        self.ax.set_yticks(range(len(BASES)), list(BASES))
        self.ax.invert_yaxis()
        self.ax.set_xlabel("GB (10^9 B) at the peak of one training step (allocated)")
        self.ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncols=4, frameon=False)

    def dynamic_artists(self) -> list[Any]:
        return [*(bar for bars in self.stacks.values() for bar in bars), self.claim_line, self.ax.title]

    def compute(self, model: str, base: str, r: int, optimizer: str, gradient_checkpointing: bool) -> QLoRAMemoryView:
        return qlora_memory_view(model, base, r, optimizer, gradient_checkpointing)

    def draw(self, view: QLoRAMemoryView) -> None:
        chosen = self.controls["base"].value
        left = np.zeros(len(view.bases))
        for term in MEMORY_TERMS:
            widths = [t.get(term, 0) / 1e9 for t in view.terms]
            for i, (bar, width) in enumerate(zip(self.stacks[term], widths, strict=True)):
                bar.set_x(left[i])
                bar.set_width(width)
                bar.set_alpha(1.0 if view.bases[i] == chosen else 0.45)
            left += widths
        self.claim_line.set_xdata([view.claim_gb, view.claim_gb])
        # a step of the R10 series, not a jitter: the frame (axes, ticks) stays while the rank moves the stacks
        self.ax.set_xlim(0, nice_ceiling(max(left.max(), view.claim_gb) * 1.08))
        self.ax.set_title(f"{view.model}: LoRA on every linear layer, base stored in bf16 / int8 / nf4 "
                          f"(chosen: {chosen})", fontsize=10, y=TITLE_Y)
