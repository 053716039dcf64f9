"""Measuring a real step: the CPU path on a tiny model, and a clear error without CUDA."""

from __future__ import annotations

import pytest
import torch

from survey_utils.errors import SurveyError
from survey_utils.memory import measure, simulate


def test_cpu_measurement_matches_the_simulation() -> None:
    real = measure("tiny-llama", "lora", seq_len=64, device="cpu")
    assert real.device == "cpu" and real.reserved is None
    assert real.allocated == simulate("tiny-llama", "lora", seq_len=64).peak


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_device_says_so() -> None:
    with pytest.raises(SurveyError, match="no CUDA device"):
        measure("tiny-llama", "lora", device="cuda")


def test_big_models_are_not_measured_on_cpu() -> None:
    with pytest.raises(SurveyError, match="too big"):
        measure("llama-2-7b", "lora", device="cpu")
