"""Layers of the quantized family (chapter 06); the methods are registered in ``methods/quantized.py``.

- :class:`NF4Linear`: a frozen linear layer stored in NF4 (:mod:`survey_utils.quantization`), dequantized on
  the fly in every forward;
- :class:`QLoRALinear`: LoRA's layer (:class:`~survey_utils.methods.reparameterized.LoRALinear`, reused as is)
  around an :class:`NF4Linear`;
- :class:`LoftQLinear`: the same, with A and B initialised by LoftQ's alternating quantization and SVD.

Storage. The 4-bit indices are kept one per ``uint8`` element in the ``weight`` parameter (torch has no
4-bit dtype): the model's parameter count is then the weights' element count, which is what peft reports
for a bitsandbytes model (its ``get_nb_trainable_parameters`` multiplies a ``Params4bit``'s packed element
count by 2). bitsandbytes packs two indices per byte; :meth:`NF4Linear.packed` gives that layout, byte for
byte, and the memory model counts it (0.5 B per weight plus the block constants).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from survey_utils import quantization as Q
from survey_utils.methods.common import new_parameter
from survey_utils.methods.layers.lowrank import LoRALinear


class NF4Linear(nn.Module):
    r"""A frozen ``nn.Linear`` in NF4 (Dettmers et al. 2023, QLoRA, arXiv:2305.14314, section 3).

    .. math:: h = \mathrm{dequant}(W^{\text{NF4}})\,x + b, \qquad
              \mathrm{dequant}(W)_{ij} = c_{q_{ij}} \cdot \text{absmax}_{\text{block}(i,j)}

    ``weight``: the 4-bit indices (uint8, ``d_out x d_in``, frozen); buffers ``absmax`` (fp32 per block of
    ``blocksize``, or its 8-bit codes with double quantization), ``absmax2`` and ``offset`` (double
    quantization). The dequantized weight exists only inside ``forward``, in the input's dtype (bf16 in
    QLoRA's runs): compute in 16 bits, storage in 4. On ``meta`` only the shapes are made.
    """

    def __init__(self, base: nn.Linear, blocksize: int = Q.NF4_BLOCKSIZE, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self.weight = nn.Parameter(torch.empty(0, dtype=torch.uint8, device=base.weight.device), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.register_buffer("absmax", None)
        self.register_buffer("absmax2", None)
        self.offset = 0.0
        self.store(base.weight.detach())

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (``d_out x d_in``) into this layer's storage."""
        device = weight.device
        if device.type == "meta":
            blocks = weight.numel() // self.blocksize
            self.weight = nn.Parameter(torch.empty(weight.shape, dtype=torch.uint8, device=device), requires_grad=False)
            self.absmax = torch.empty(blocks, dtype=torch.uint8 if self.double_quant else torch.float32, device=device)
            self.absmax2 = (torch.empty(math.ceil(blocks / Q.DQ_BLOCKSIZE), device=device)
                            if self.double_quant else None)
            return
        q = Q.quantize_nf4(weight.float().cpu(), self.blocksize, self.double_quant)
        self.weight = nn.Parameter(q.indices.to(device), requires_grad=False)
        self.absmax = q.absmax.to(device)
        self.absmax2 = None if q.absmax2 is None else q.absmax2.to(device)
        self.offset = q.offset

    def quantized(self) -> Q.NF4Weight:
        """The stored tensor as a :class:`~survey_utils.quantization.NF4Weight`."""
        return Q.NF4Weight(self.weight, self.absmax, tuple(self.weight.shape), self.blocksize, self.absmax2,
                           self.offset)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:math:`c_q \\cdot` absmax, computed in fp32 (as bitsandbytes) and cast to ``dtype``."""
        if self.weight.is_meta:
            return torch.empty(self.weight.shape, dtype=dtype, device="meta")
        return Q.dequantize_nf4(self.quantized(), dtype)

    def packed(self) -> torch.Tensor:
        """bitsandbytes' storage of the indices: two per byte, ``(numel / 2, 1)`` uint8."""
        return self.quantized().packed()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)


class QLoRALinear(LoRALinear):
    r"""QLoRA: LoRA on a frozen NF4 base (Dettmers et al. 2023, arXiv:2305.14314).

    .. math:: h = \mathrm{dequant}(W_0^{\text{NF4}})\,x + \frac{\alpha}{r} B A x

    LoRA's layer unchanged (A Kaiming-uniform, B zero, in the base weight's dtype), built on the original
    linear layer; then the base is replaced by its :class:`NF4Linear`. Gradients flow through the
    dequantized weight to the input but the base gets none. ``merge`` does what peft does on a 4-bit layer:
    dequantize, add :math:`\frac{\alpha}{r}BA`, quantize again, so it rounds (not exactly undone by
    ``unmerge``): QLoRA is not registered as mergeable.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, blocksize: int = Q.NF4_BLOCKSIZE, double_quant: bool = True) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora)
        self.base_layer = NF4Linear(base_layer, blocksize, double_quant)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.store(self.base_layer.dequantized() + self.delta_weight().float())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.store(self.base_layer.dequantized() - self.delta_weight().float())
            self.merged = False


class LoftQLinear(QLoRALinear):
    r"""LoftQ initialisation of a QLoRA layer (Li et al. 2024, arXiv:2310.08659, Algorithm 1).

    .. math:: Q_t = q_N(W - A_{t-1} B_{t-1}^\top), \qquad A_t B_t^\top = \mathrm{SVD}_r(W - Q_t)

    starting from :math:`A_0 B_0^\top = 0`; after ``loftq_iter`` steps the base stores :math:`Q_T` and the
    adapter starts at the best rank-r correction of the quantization error, so
    :math:`Q_T + \frac{\alpha}{r} B A \approx W` better than :math:`q_N(W)` alone. The singular values are
    split evenly between the factors, :math:`B = U_r \sqrt{\Sigma_r}`, :math:`A = \sqrt{\Sigma_r} V_r^\top`,
    divided by :math:`\sqrt{\alpha / r}` each so that the *scaled* product is the correction.
    """

    def __init__(self, base_layer: nn.Linear, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, blocksize: int = Q.NF4_BLOCKSIZE, double_quant: bool = True,
                 loftq_iter: int = 1) -> None:
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, blocksize, double_quant)
        if base_layer.weight.is_meta:
            return
        a, b = loftq_init(self.base_layer, base_layer.weight.detach().float(), r, self.scaling, loftq_iter)
        with torch.no_grad():
            self.lora_A.copy_(a.to(self.lora_A.dtype))
            self.lora_B.copy_(b.to(self.lora_B.dtype))


@torch.no_grad()
def loftq_init(layer: NF4Linear, weight: torch.Tensor, r: int, scaling: float, iterations: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate quantization and rank-r SVD ``iterations`` times; store :math:`Q_T` in ``layer``, return
    ``(A, B)`` with :math:`\\text{scaling}\\cdot BA = \\mathrm{SVD}_r(W - Q_T)`."""
    residual = weight
    a = torch.zeros(r, weight.shape[1])
    b = torch.zeros(weight.shape[0], r)
    for _ in range(iterations):
        layer.store(residual)
        error = weight - layer.dequantized()
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        root = torch.sqrt(s[:r]) / math.sqrt(scaling)
        b = u[:, :r] * root
        a = root[:, None] * vh[:r]
        residual = weight - scaling * (b @ a)
    return a, b


class QALoRALinear(nn.Module):
    r"""QA-LoRA: group-wise quantized base, LoRA on the group-pooled input (Xu et al. 2023, arXiv:2309.14717).

    .. math:: h = \tilde W x + \frac{\alpha}{r}\, B A\, \mathrm{pool}_L(x), \qquad
              \tilde W_{ij} = s_{i,g(j)}\, q_{ij} + \beta_{i,g(j)}

    The base is min-max integer quantized (``bits``) with one scale and offset per row and group of L input
    columns; ``pool_L`` averages each group of L input features, so A is ``r x d_in/L`` and B ``d_out x r``
    (B = 0 at initialisation). Because the update is constant within each group, ``merge`` folds it into the
    offsets, :math:`\beta \mathrel{+}= \frac{\alpha}{r} BA / L`: the merged model is still the same integer
    codes, exactly (the point of QA-LoRA against QLoRA, whose merge re-quantizes).
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, group_size: int, bits: int = 4) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.group_size, groups = group_size, base.in_features // group_size
        weight = base.weight.detach()
        if weight.is_meta:
            codes = torch.empty(weight.shape, dtype=torch.uint8, device="meta")
            scale = offset = torch.empty(self.out_features, groups, device="meta")
        else:
            codes, scale, offset = Q.quantize_minmax(weight, bits, group_size)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.lora_A = new_parameter((r, groups), weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        self.lora_B = new_parameter((self.out_features, r), weight, nn.init.zeros_)
        self.scaling = lora_alpha / r
        self.merged = False

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return Q.dequantize_minmax(self.weight, self.scale, self.offset).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        result = F.linear(x, self.dequantized(x.dtype), bias)
        if self.merged:
            return result
        pooled = x.reshape(*x.shape[:-1], -1, self.group_size).mean(dim=-1).to(self.lora_A.dtype)
        return result + (pooled @ self.lora_A.T @ self.lora_B.T * self.scaling).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """:math:`\\beta \\mathrel{+}= \\frac{\\alpha}{r}BA/L`: the codes are untouched."""
        if not self.merged:
            self.offset += (self.lora_B @ self.lora_A).float() * self.scaling / self.group_size
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.offset -= (self.lora_B @ self.lora_A).float() * self.scaling / self.group_size
            self.merged = False


class PEQALinear(nn.Module):
    r"""PEQA: train only the quantization scales (Kim et al. 2023, arXiv:2305.14152).

    .. math:: h = \bigl(s \odot (\bar W - z)\bigr) x + b

    :math:`\bar W` (integer codes, ``bits``) and the integer zero points z are frozen; the per-channel scales
    s (``peqa_scale``, one per output feature, initialised by min-max quantization) train. The fine-tuned
    model *is* a quantized model: nothing to merge.
    """

    def __init__(self, base: nn.Linear, bits: int = 4) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = base.weight.detach()
        if weight.is_meta:
            codes = torch.empty(weight.shape, dtype=torch.uint8, device="meta")
            scale = zero = torch.empty(self.out_features, 1, device="meta")
        else:
            _, scale, low = Q.quantize_minmax(weight, bits, None)
            zero = torch.round(-low / scale)
            codes = torch.clamp(torch.round(weight.float() / scale) + zero, 0, 2**bits - 1).to(torch.uint8)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.register_buffer("zero", zero)
        self.peqa_scale = nn.Parameter(scale.to(weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.peqa_scale.to(x.dtype) * (self.weight.to(x.dtype) - self.zero.to(x.dtype))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def merge(self) -> None:
        """Nothing to fold: the trained scales are the quantized model's own."""
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False
