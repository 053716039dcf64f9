"""One place for the settings every layer names: dtypes and their sizes, optimizers, quantizations, and the
one formatter of byte counts. Torch-free, so the closed forms and the command line load fast.
"""

from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of each training dtype."""
DTYPES = tuple(DTYPE_BYTES)
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "adafactor")
"""The optimizers the memory model (chapter 00) knows the states of."""
QUANTIZATIONS = ("nf4", "int8")
"""Storage of frozen base linears (bitsandbytes' NF4 and LLM.int8)."""
ATTENTIONS = ("sdpa", "eager")


def torch_dtype(name: str):
    """The torch dtype called ``name`` (``fp32``, ``bf16``, ``fp16``); imports torch, so only model paths call it."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def format_bytes(n: float) -> str:
    """Bytes in binary units, three significant figures: ``2**30 -> '1 GiB'``, ``1.5 * 2**20 -> '1.5 MiB'``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if abs(n) / size < 1000 else f"{n / size:,.0f} {unit}"
    return f"{int(n)} B"
