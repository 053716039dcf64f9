r"""bitsandbytes' quantized linear layers as the simulation sees them: their storage and their kernels' tensors (ch. 06).

The fake-tensor simulation (:mod:`survey_utils.memory.simulation`) replaces every frozen linear layer inside
the blocks (the closed form's ``quantized`` weights: the layout's ``linear`` and ``conv1d`` modules with a
block index) by one of these, so that a QLoRA step holds what bitsandbytes 0.50.2 holds on a GPU:

- **NF4** (``Linear4bit``, ``functional.quantize_4bit`` with ``compress_statistics=True``, as QLoRA's runs):
  the packed codes, :math:`\lceil n/2 \rceil` uint8; one uint8 absmax code per block of 64 (double
  quantization) with one fp32 constant per 256 blocks; the layer's own 16-entry fp32 NF4 code and fp32
  offset. Forward (``MatMul4Bit``, training batch sizes take the dequantize + ``F.linear`` path of
  ``backends/cuda/ops.py``): the fp32 block absmax is rebuilt, then the weight is dequantized into the
  input's dtype, used and freed. Nothing is saved for backward; backward dequantizes again for
  :math:`\partial L/\partial x = g\,W`.
- **int8** (``Linear8bitLt`` with ``has_fp16_weights=False``, ``threshold=0``: bitsandbytes' default; with an
  outlier threshold the decomposition's extra tensors depend on the data): int8 codes ``CB`` and one fp32
  scale per output row ``SCB``. Forward (``MatMul8bitLt``): the input cast to fp16 (a copy unless it is fp16),
  quantized row-wise (int8 codes and one fp32 scale per token), an int32 product, the output in the
  input's dtype; the input itself is kept for backward (``ctx.tensors = (CAt, subA, A)``). Backward
  dequantizes ``CB`` into the input's dtype and multiplies.

The values are zeros: only shapes, dtypes and lifetimes matter to the memory tracker (these layers compute
no meaningful output; the estimate-vs-simulation grid reads bytes only).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import NF4_BLOCK, NF4_BLOCK2

NF4_CODE_ENTRIES = 16


class _NF4Matmul(torch.autograd.Function):
    """``MatMul4Bit``'s tensors: a dequantized weight in the input's dtype, alive during each matmul only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
        ctx.shape, ctx.has_bias = shape, bias is not None
        weight = _dequantized(shape, x.dtype, x.device)
        return nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad_x = grad @ _dequantized(ctx.shape, grad.dtype, grad.device) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, None


def _dequantized(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    blocks = math.ceil(shape[0] * shape[1] / NF4_BLOCK)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=device)  # dequantize_blockwise of the absmax codes
    weight = torch.zeros(shape, dtype=dtype, device=device)
    del absmax
    return weight


class _Int8Matmul(torch.autograd.Function):
    """``MatMul8bitLt``'s tensors (threshold 0, frozen weight); the input is kept for backward as bitsandbytes does."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        half = tokens if tokens.dtype == torch.float16 else tokens.to(torch.float16)
        quantized = torch.zeros(half.shape, dtype=torch.int8, device=x.device)  # int8_vectorwise_quant: CA
        row_scales = torch.zeros(half.shape[0], dtype=torch.float32, device=x.device)  # and SCA
        del half
        product = torch.zeros((tokens.shape[0], codes.shape[0]), dtype=torch.int32, device=x.device)
        out = torch.zeros((tokens.shape[0], codes.shape[0]), dtype=x.dtype, device=x.device)
        del quantized, row_scales, product
        ctx.kept = x  # ctx.tensors = (CAt, subA, A): a reference, not a copy
        ctx.codes, ctx.scales, ctx.has_bias = codes, scales, bias is not None
        return out.reshape(*x.shape[:-1], codes.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = ctx.codes.to(grad.dtype, copy=True).mul_(ctx.scales.unsqueeze(1).mul(1.0 / 127.0))
            grad_x = grad @ weight
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        ctx.kept = None
        return grad_x, None, None, grad_bias


class QuantizedStorageLinear(nn.Module):
    """A frozen linear layer held as bitsandbytes holds it (``nf4`` or ``int8``); see the module docstring.

    GPT-2's Conv1D (``x W + b``, W of ``d_in x d_out``) is held the same way: same bytes, same output."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None, quantization: str,
                 device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features, self.quantization = in_features, out_features, quantization
        n = in_features * out_features
        if quantization == "nf4":
            blocks = math.ceil(n / NF4_BLOCK)
            self.weight = nn.Parameter(torch.zeros(math.ceil(n / 2), 1, dtype=torch.uint8, device=device),
                                       requires_grad=False)
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(math.ceil(blocks / NF4_BLOCK2), device=device))
            self.register_buffer("code", torch.zeros(NF4_CODE_ENTRIES, device=device))
            self.register_buffer("offset", torch.zeros((), device=device))
        elif quantization == "int8":
            self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                       requires_grad=False)
            self.register_buffer("scales", torch.zeros(out_features, device=device))
        else:
            raise SurveyError(f"quantization '{quantization}' is not one of nf4, int8")
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantization == "nf4":
            return _NF4Matmul.apply(x, self.bias, (self.out_features, self.in_features))
        return _Int8Matmul.apply(x, self.weight, self.scales, self.bias)


def quantize_base(model: nn.Module, shape: Any, quantization: str, method_name: str) -> int:
    """Replace every frozen linear layer of the blocks (``shape``: the model's layout) by its bitsandbytes storage,
    descending through a method's wrappers (``base_layer``); returns how many were replaced.

    A method whose own layer holds the base weight in another form (it reads or reshapes it) cannot be given a
    bitsandbytes base here: one line naming the layer."""
    from transformers.pytorch_utils import Conv1D

    from survey_utils.methods.layers.quantized import NF4Linear

    replaced = 0
    for spec in shape.modules:
        if spec.kind not in ("linear", "conv1d") or spec.layer is None:
            continue
        parent, attr = _parent(model, spec.name)
        module = getattr(parent, attr)
        while hasattr(module, "base_layer"):
            parent, attr, module = module, "base_layer", module.base_layer
        if not isinstance(module, nn.Linear | Conv1D | NF4Linear):
            raise SurveyError(f"quantization '{quantization}' cannot be simulated under method '{method_name}': its "
                              f"layer {type(module).__name__} at {spec.name} holds the base weight itself")
        if module.weight.requires_grad:
            raise SurveyError(f"{spec.name}.weight trains under method '{method_name}': it cannot be quantized")
        bias = getattr(module, "bias", None)
        setattr(parent, attr, QuantizedStorageLinear(spec.in_features, spec.out_features, bias, quantization,
                                                     module.weight.device))
        replaced += 1
    return replaced


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, attr = name.rpartition(".")
    return (model.get_submodule(head) if head else model), attr
