"""Measure a real training step: CUDA's allocator counters on a GPU, a tracked real step on the CPU (chapter 00).

On CUDA the step is built on the device and ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``
are read after a warm-up step (so the optimizer states exist, as in the estimate's steady state). Without a
GPU, ``device="cpu"`` runs the same two steps on real CPU tensors (tiny models only) under the same
tracker the simulation uses; ``device="cuda"`` says plainly that there is no CUDA device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig

from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import check_settings
from survey_utils.methods.registry import Method, get_method
from survey_utils.zoo import REAL_TENSOR_LIMIT, load_config

# Real CPU steps are limited to models this small (the tiny-* models of the zoo are about 3M parameters).
CPU_MEASURE_LIMIT = 50_000_000


@dataclass(frozen=True)
class Measurement:
    """A real step's peak: ``allocated`` always, ``reserved`` on CUDA (what nvidia-smi approaches)."""

    device: str
    allocated: int
    reserved: int | None
    seconds: float
    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "allocated": self.allocated, "reserved": self.reserved,
                "seconds": self.seconds, "assumptions": self.assumptions}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def measure(model_or_config: str | PretrainedConfig, method: str | Method, hp: dict[str, Any] | None = None,
            batch_size: int = 1, seq_len: int = 512, dtype: str = "bf16", adapter_dtype: str | None = None,
            optimizer: str = "adamw", gradient_checkpointing: bool = False, quantization: str | None = None,
            attention: str = "sdpa", device: str | None = None) -> Measurement:
    """Peak memory of a real step on ``device`` (``cuda`` when available, else ``cpu``)."""
    from survey_utils.architecture import total_params

    config = load_config(model_or_config)
    method = get_method(method) if isinstance(method, str) else method
    resolved = check_settings(config, method, hp or {}, batch_size, seq_len, dtype, adapter_dtype, optimizer,
                              quantization, attention, gradient_checkpointing=gradient_checkpointing)
    device = device or ("cuda" if cuda_available() else "cpu")
    if quantization is not None:
        raise SurveyError(f"quantization '{quantization}' needs bitsandbytes, which this environment lacks")
    if device == "cuda":
        if not cuda_available():
            raise SurveyError("no CUDA device: measure on 'cpu' (tiny models) or use the simulation")
        return _measure_cuda(config, method, resolved, batch_size, seq_len, dtype, adapter_dtype, optimizer,
                             gradient_checkpointing, attention)
    if device != "cpu":
        raise SurveyError(f"device '{device}' is not 'cpu' or 'cuda'")
    if total_params(config) > min(CPU_MEASURE_LIMIT, REAL_TENSOR_LIMIT):
        raise SurveyError(f"model '{config.name_or_path}' is too big for a real CPU step "
                          f"(limit {CPU_MEASURE_LIMIT:,} parameters); simulate it instead")
    from survey_utils.memory.simulation import simulate

    result = simulate(config, method, resolved, batch_size, seq_len, dtype, adapter_dtype, optimizer,
                      gradient_checkpointing, None, attention, fake=False)
    return Measurement("cpu", result.peak, None, result.seconds,
                       ["real CPU tensors, tracked operator by operator (the CPU allocator has no peak counter)",
                        *result.assumptions[1:]])


def _measure_cuda(config: PretrainedConfig, method: Method, hp: dict[str, Any], batch_size: int, seq_len: int,
                  dtype: str, adapter_dtype: str | None, optimizer: str, gradient_checkpointing: bool,
                  attention: str) -> Measurement:
    from survey_utils.memory.simulation import _quiet, build_step

    start = time.perf_counter()
    torch.cuda.empty_cache()
    with _quiet():
        step = build_step(config, method, hp, batch_size, seq_len, dtype, adapter_dtype, optimizer,
                          gradient_checkpointing, attention, device="cuda")
        step.run()  # warm-up: creates the optimizer states
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step.run()
        torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated()
    reserved = torch.cuda.max_memory_reserved()
    name = torch.cuda.get_device_name()
    del step
    torch.cuda.empty_cache()
    return Measurement("cuda", allocated, reserved, time.perf_counter() - start,
                       [f"{name}: torch.cuda.max_memory_allocated / max_memory_reserved over step 2 "
                        "(CUDA context not included)"])
