"""The simulation with bitsandbytes' NF4 and int8 storage (chapter 06): bytes, fake vs real, estimate within 5%."""

from __future__ import annotations

import math

import pytest
import torch

from survey_utils.errors import SurveyError
from survey_utils.memory import estimate, simulate
from survey_utils.memory.closed_form import NF4_BYTES_PER_WEIGHT
from survey_utils.memory.quantized_storage import QuantizedStorageLinear


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize(("d_in", "d_out"), [(128, 344), (4096, 11008), (8192, 8192)])
def test_storage_is_what_bitsandbytes_holds_and_what_the_estimate_counts(d_in: int, d_out: int) -> None:
    n = d_in * d_out
    with torch.device("meta"):
        nf4 = QuantizedStorageLinear(d_in, d_out, None, "nf4", torch.device("meta"))
        int8 = QuantizedStorageLinear(d_in, d_out, None, "int8", torch.device("meta"))
    # packed codes, uint8 absmax per 64, fp32 per 256 blocks; the layer's 16-entry code and offset (68 B)
    assert _bytes(nf4) == math.ceil(n / 2) + n // 64 + 4 * math.ceil(n / 64 / 256) + 68
    assert abs(_bytes(nf4) - n * NF4_BYTES_PER_WEIGHT) <= 68 + 4
    assert _bytes(int8) == n + 4 * d_out


def test_fake_quantized_step_equals_the_real_one() -> None:
    fake = simulate("tiny-llama", "qlora", quantization="nf4", seq_len=32)
    real = simulate("tiny-llama", "qlora", quantization="nf4", seq_len=32, fake=False)
    assert fake.peak == real.peak


@pytest.mark.parametrize(("method", "quantization", "settings"), [
    ("qlora", "nf4", {}),
    ("qlora", "nf4", {"gradient_checkpointing": True}),
    ("lora", "int8", {}),
])
def test_estimate_is_within_5_percent_of_the_quantized_simulation(method: str, quantization: str,
                                                                   settings: dict) -> None:
    sim = simulate("tiny-llama", method, quantization=quantization, seq_len=64, **settings)
    est = estimate("tiny-llama", method, quantization=quantization, seq_len=64, device="cpu", **settings)
    assert abs(est.total - sim.peak) / sim.peak < 0.05
    plain = simulate("tiny-llama", method, seq_len=64, **settings)
    assert sim.by_category["Parameter"] < plain.by_category["Parameter"]  # the base really is smaller


@pytest.mark.parametrize(("method", "fragment"), [
    ("peqa", "PEQALinear at model.layers.0.self_attn.q_proj holds the base weight itself"),
    ("dora", "reads the base weight itself"),
])
def test_methods_that_hold_or_read_the_base_weight_are_one_line(method: str, fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment):
        simulate("tiny-llama", method, quantization="nf4", seq_len=16)
