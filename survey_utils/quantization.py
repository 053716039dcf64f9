r"""NF4 and int8 quantization from scratch, in pure torch (chapter 06, sections "NF4" and "int8").

**NF4** (Dettmers et al. 2023, QLoRA, arXiv:2305.14314, section 3). A 4-bit code is an index into 16 values
that are quantiles of :math:`\mathcal N(0, 1)`, scaled to :math:`[-1, 1]` (:func:`nf4_codebook`). A weight
tensor is cut into blocks of 64; each block is divided by its absolute maximum (``absmax``) and every value
is replaced by the index of the nearest codebook value. Dequantization is ``code[index] * absmax``.

*Double quantization* (same section) quantizes the fp32 absmax constants themselves: their mean is
subtracted (``offset``) and they are quantized blockwise (256 per block) to 8 bits with bitsandbytes'
signed dynamic code (:func:`dynamic_codebook`), keeping one fp32 constant per 256 blocks. Bytes per weight:
:math:`\frac12 + \frac{1}{64} + \frac{4}{64\cdot256}` instead of :math:`\frac12 + \frac{4}{64}`.

**int8** absmax (Dettmers et al. 2022, LLM.int8(), arXiv:2208.07339, section 3): ``round(127 x / absmax)``
with one absmax per tensor or per row ("vector-wise"); :func:`int8_outlier_matmul` is LLM.int8's
mixed-precision decomposition: the input's feature columns holding any magnitude of at least ``threshold``
(6.0) are multiplied in floating point, the rest in int8 with row-wise scales.

Every function refuses bad input with a one-line :class:`SurveyError`: a block size that does not divide
the tensor, bits other than 4 or 8, a granularity we do not know. bitsandbytes is never imported here; the
chapter and the tests check these functions against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from survey_utils.errors import SurveyError

NF4_BLOCKSIZE = 64
"""QLoRA's block of weights sharing one absmax (paper, section 3; bitsandbytes' default)."""
DQ_BLOCKSIZE = 256
"""Absmax constants per block in double quantization (paper, section 3)."""
NF4_OFFSET = 0.9677083
r"""The outermost quantile, :math:`1 - \delta` with :math:`\delta = \frac12(\frac1{30} + \frac1{32})` (paper,
section 3), rounded to 7 decimals as in QLoRA's reference ``create_normal_map(offset=0.9677083)``; with the
unrounded :math:`\delta` the values move by at most 3e-7."""
LLM_INT8_THRESHOLD = 6.0
"""LLM.int8's outlier magnitude (paper, section 3.2; bitsandbytes' ``llm_int8_threshold``)."""
BITS = (4, 8)
GRANULARITIES = ("tensor", "row")


def nf4_codebook() -> torch.Tensor:
    r"""The 16 NF4 values: 8 positive quantiles of :math:`\mathcal N(0,1)` at ``linspace(1-δ, 0.5, 9)[:-1]``,
    7 negative ones at ``linspace(1-δ, 0.5, 8)[:-1]`` and an exact zero, divided by the largest (fp32, sorted).

    Asymmetric on purpose: 8 positive and 7 negative values make room for a zero that is exact.
    """
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


def dynamic_codebook(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (Dettmers 2015, arXiv:1511.04561), used to quantize the absmax
    constants: a sign, a run of zeros giving a power of ten, and a linear fraction in the remaining bits."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (-(max_exponent_bits - 1) + i)).tolist()
        data += means + [-m for m in means]
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _check_blocks(numel: int, blocksize: int, what: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise SurveyError(f"{what}={blocksize!r} must be a positive integer")
    if numel % blocksize:
        raise SurveyError(f"{what}={blocksize} does not divide the tensor's {numel} elements")


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted ``code`` (a tie goes to the lower value), as uint8."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int,
                       partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices uint8, absmax fp32 per block)``: each block divided by its absmax, each value to its nearest
    code. ``partial``: a last, shorter block is allowed (double quantization's absmax run, as bitsandbytes)."""
    flat = x.reshape(-1).float()
    if not partial:
        _check_blocks(flat.numel(), blocksize)
    starts = range(0, flat.numel(), blocksize)
    absmax = torch.stack([flat[i:i + blocksize].abs().max() for i in starts]) if partial else \
        flat.reshape(-1, blocksize).abs().max(dim=1).values
    scale = (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(blocksize)[: flat.numel()]
    scaled = torch.clamp(flat * scale, -1, 1)
    return _nearest(scaled, code).reshape(x.shape), absmax


def dequantize_blockwise(indices: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         blocksize: int) -> torch.Tensor:
    """``code[indices] * absmax`` block by block (fp32; a last, shorter block takes the last absmax)."""
    flat = indices.reshape(-1)
    values = code[flat.long()] * absmax.repeat_interleave(blocksize)[: flat.numel()]
    return values.reshape(indices.shape)


@dataclass
class NF4Weight:
    """An NF4-quantized tensor: one 4-bit index per element (kept in a uint8; :meth:`packed` stores two per
    byte, as bitsandbytes does), and the absmax of each block, double-quantized or not."""

    indices: torch.Tensor
    absmax: torch.Tensor
    """fp32 per block; with double quantization, the uint8 codes of ``absmax - offset``."""
    shape: tuple[int, ...]
    blocksize: int
    absmax2: torch.Tensor | None = None
    """Double quantization: fp32 absmax of each block of 256 absmax codes."""
    offset: float = 0.0
    """Double quantization: the mean absmax, subtracted before quantizing."""

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per block (dequantized first with double quantization)."""
        if self.absmax2 is None:
            return self.absmax
        return dequantize_blockwise(self.absmax, self.absmax2, dynamic_codebook(), DQ_BLOCKSIZE) + self.offset

    def packed(self) -> torch.Tensor:
        """Two indices per byte, the first in the high nibble: bitsandbytes' storage, shape ``(numel/2, 1)``."""
        flat = self.indices.reshape(-1)
        return ((flat[::2] << 4) | flat[1::2]).unsqueeze(1)

    def nbytes(self) -> int:
        """Bytes of the packed storage: codes, absmax (or its codes, second-level constants and offset)."""
        codes = math.ceil(self.indices.numel() / 2)
        if self.absmax2 is None:
            return codes + 4 * self.absmax.numel()
        return codes + self.absmax.numel() + 4 * self.absmax2.numel() + 4


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` to NF4 in blocks of ``blocksize`` (QLoRA section 3); see the module docstring."""
    _check_blocks(weight.numel(), blocksize)
    indices, absmax = quantize_blockwise(weight, nf4_codebook(), blocksize)
    result = NF4Weight(indices, absmax, tuple(weight.shape), blocksize)
    if double_quant:
        result.offset = float(absmax.mean())
        codes, absmax2 = quantize_blockwise(absmax - result.offset, dynamic_codebook(), DQ_BLOCKSIZE, partial=True)
        result.absmax, result.absmax2 = codes, absmax2
    return result


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``code[index] * absmax`` per block, computed in fp32 and cast to ``dtype`` (as bitsandbytes does)."""
    absmax = q.block_absmax()
    values = nf4_codebook()[q.indices.reshape(-1).long()].reshape(-1, q.blocksize) * absmax[:, None]
    return values.reshape(q.shape).to(dtype)


# --- int8 ------------------------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor, granularity: str = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 codes, fp32 absmax)``: ``round(127 w / absmax)`` with one absmax per ``tensor`` or per ``row``."""
    if granularity not in GRANULARITIES:
        raise SurveyError(f"granularity '{granularity}' is not one of {', '.join(GRANULARITIES)}")
    w = weight.float()
    if granularity == "tensor":
        absmax = w.abs().max().reshape(1)
        scale = absmax
    else:
        absmax = w.abs().amax(dim=-1)
        scale = absmax[..., None]
    codes = torch.round(w * (127.0 / scale.clamp(min=1e-38))).clamp(-127, 127).to(torch.int8)
    return codes, absmax


def dequantize_int8(codes: torch.Tensor, absmax: torch.Tensor, granularity: str = "row") -> torch.Tensor:
    """``codes * absmax / 127`` (fp32)."""
    scale = absmax if granularity == "tensor" else absmax[..., None]
    return codes.float() * scale / 127.0


def int8_outlier_matmul(x: torch.Tensor, weight: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""LLM.int8's ``x @ weight.T`` (paper, section 3.2): ``(output fp32, outlier feature columns)``.

    .. math:: XW^\top = X_{:,O} W_{:,O}^\top + \frac{s_X s_W^\top}{127^2} \odot (C_X C_W^\top)

    ``O``: the input features where some ``|x| >= threshold``, multiplied in floating point; the rest in int8
    with one absmax per row of ``x`` (token) and per row of ``weight`` (output feature), accumulated in int32.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not threshold > 0:
        raise SurveyError(f"threshold={threshold!r} must be a positive number")
    x2 = x.reshape(-1, x.shape[-1]).float()
    outliers = (x2.abs() >= threshold).any(dim=0).nonzero().reshape(-1)
    regular = x2.clone()
    regular[:, outliers] = 0
    cx, sx = quantize_int8(regular, "row")
    w_regular = weight.float().clone()
    w_regular[:, outliers] = 0
    cw, sw = quantize_int8(w_regular, "row")
    accumulated = (cx.to(torch.int32) @ cw.to(torch.int32).T).float()
    out = accumulated * (sx[:, None] * sw[None, :]) / 127.0**2
    out = out + x2[:, outliers] @ weight.float()[:, outliers].T
    return out.reshape(*x.shape[:-1], weight.shape[0]), outliers


# --- one entry point for the chapter's explorer ----------------------------------------------------------

def quantize_dequantize(weight: torch.Tensor, bits: int, blocksize: int = NF4_BLOCKSIZE,
                        double_quant: bool = True) -> torch.Tensor:
    """The reconstruction of ``weight`` after ``bits``-bit blockwise quantization: NF4 for 4 bits, absmax int8
    per block for 8 bits (double quantization applies to 4 bits only)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise SurveyError(f"bits={bits!r} is not one of 4, 8")
    if bits == 4:
        return dequantize_nf4(quantize_nf4(weight, blocksize, double_quant))
    _check_blocks(weight.numel(), blocksize)
    codes, absmax = quantize_int8(weight.reshape(-1, blocksize), "row")
    return dequantize_int8(codes, absmax, "row").reshape(weight.shape)


def bytes_per_weight(bits: int, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True) -> float:
    r"""Storage per weight: ``bits/8`` plus the block constants (4 B each, or 1 B plus 4 B per 256 blocks
    with double quantization, 4 bits only): NF4 at 64 with DQ is :math:`0.5 + 1/64 + 4/(64\cdot256)`."""
    if isinstance(bits, bool) or bits not in BITS:
        raise SurveyError(f"bits={bits!r} is not one of 4, 8")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise SurveyError(f"blocksize={blocksize!r} must be a positive integer")
    if bits == 4 and double_quant:
        return 0.5 + 1 / blocksize + 4 / (blocksize * DQ_BLOCKSIZE)
    return bits / 8 + 4 / blocksize


def reconstruction_error(weight: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """``rmse``, ``max_abs`` and ``relative`` (Frobenius ``||W - Ŵ|| / ||W||``) of a reconstruction, in fp64."""
    w, a = weight.double(), approx.double()
    diff = w - a
    return {"rmse": float(diff.pow(2).mean().sqrt()), "max_abs": float(diff.abs().max()),
            "relative": float(diff.norm() / w.norm())}


# --- asymmetric min-max integers per group (QA-LoRA, PEQA) -----------------------------------------------

def quantize_minmax(weight: torch.Tensor, bits: int = 4, group_size: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(codes uint8, scale, offset)`` with :math:`W \approx \text{scale}\cdot q + \text{offset}`, one scale and
    offset per row and group of ``group_size`` input columns (``None``: per row, PEQA's per-channel setting),
    :math:`q = \mathrm{round}((W - \min) / \text{scale})`, :math:`\text{scale} = (\max - \min) / (2^\text{bits} - 1)`
    (QA-LoRA, Xu et al. 2023, arXiv:2309.14717, section 3.2; PEQA, Kim et al. 2023, arXiv:2305.14152).

    Defined for chapter 06, section "QA-LoRA and PEQA"."""
    if isinstance(bits, bool) or bits not in BITS:
        raise SurveyError(f"bits={bits!r} is not one of 4, 8")
    rows, cols = weight.shape
    group = cols if group_size is None else group_size
    _check_blocks(cols, group, "group_size")
    w = weight.float().reshape(rows, cols // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-12)
    codes = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 2**bits - 1).to(torch.uint8)
    return codes.reshape(rows, cols), scale, low


def dequantize_minmax(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``scale * q + offset`` per row and group (fp32, or ``scale``'s dtype)."""
    rows, cols = codes.shape
    groups = scale.shape[-1]
    q = codes.reshape(rows, groups, cols // groups).to(scale.dtype)
    return (q * scale[..., None] + offset[..., None]).reshape(rows, cols)
