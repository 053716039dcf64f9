"""NF4 and int8 from scratch (survey_utils.quantization) against bitsandbytes 0.50.2 on CPU."""

from __future__ import annotations

import pytest
import torch

from survey_utils import quantization as Q
from survey_utils.errors import SurveyError

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# (128, 96) has rows that are not a multiple of 64: blocks cross rows.
SHAPES = [(64, 64), (896, 4864), (128, 96)]  # tiny, Qwen2.5-0.5B's MLP (d=896, d_ff=4864), odd rows


def _bnb_reference_dequantize(packed, absmax, shape):
    """bitsandbytes' pure-torch dequantization (its C kernel on CPU is checked separately below)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    return _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, bnb_functional.get_4bit_type("nf4", device="cpu"),
                                    64, shape, torch.float32)


def test_nf4_codebook_is_bitsandbytes_and_has_an_exact_zero() -> None:
    code = Q.nf4_codebook()
    assert torch.equal(code, bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1 and (code > 0).sum() == 8


def test_dynamic_codebook_is_bitsandbytes() -> None:
    assert torch.equal(Q.dynamic_codebook(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_and_dequantized_tensor_equal_bitsandbytes(shape: tuple[int, int]) -> None:
    weight = torch.randn(shape) * 0.02
    ours = Q.quantize_nf4(weight, 64, double_quant=False)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert torch.equal(ours.packed(), packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(Q.dequantize_nf4(ours), _bnb_reference_dequantize(packed, state.absmax, shape))
    if shape[1] % 64 == 0:  # bitsandbytes' CPU kernel agrees where blocks do not cross rows
        assert torch.equal(Q.dequantize_nf4(ours), bnb_functional.dequantize_4bit(packed, state))


def test_bitsandbytes_cpu_kernel_when_blocks_cross_rows() -> None:
    """A finding, pinned: bitsandbytes 0.50.2's C dequantization on CPU takes an AVX512 path where the CPU has it,
    and that path errs for rows of 96 (blocks of 64 cross rows); without AVX512 its kernel equals ours. Which path
    runs depends on the machine, so each is checked where it runs."""
    from bitsandbytes.backends.cpu import ops as cpu_ops

    weight = torch.randn(128, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    kernel = bnb_functional.dequantize_4bit(packed, state)
    ours = Q.dequantize_nf4(Q.quantize_nf4(weight, 64, False))
    assert Q.reconstruction_error(weight, ours)["relative"] < 0.1
    if cpu_ops._has_avx512:
        assert Q.reconstruction_error(weight, kernel)["relative"] > 0.1
    else:
        assert torch.equal(kernel, ours)


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantization_against_bitsandbytes(shape: tuple[int, int]) -> None:
    """4-bit codes, offset and second-level constants equal; the 8-bit absmax codes equal except near ties,
    where bitsandbytes' CPU kernel rounds some to the farther neighbour (ours is the nearest)."""
    weight = torch.randn(shape) * 0.02
    ours = Q.quantize_nf4(weight, 64, double_quant=True)
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed(), packed)
    assert ours.offset == state.offset.item()
    assert torch.equal(ours.absmax2, state.state2.absmax)
    assert (ours.absmax != state.absmax).float().mean() < 0.01
    fp32_absmax = weight.reshape(-1, 64).abs().amax(dim=1)
    scaled = (fp32_absmax - ours.offset) / ours.absmax2.repeat_interleave(256)[: fp32_absmax.numel()]
    code = Q.dynamic_codebook()
    ours_gap = (scaled - code[ours.absmax.long()]).abs()
    their_gap = (scaled - code[state.absmax.long()]).abs()
    assert bool((ours_gap <= their_gap + 1e-7).all())  # ours is the nearest code, never farther than theirs
    # where the codes agree, so does the dequantized tensor; with bitsandbytes' codes ours reproduces its tensor
    ours.absmax = state.absmax
    reference = _bnb_reference_dequantize(packed, bnb_functional.dequantize_blockwise(state.absmax, state.state2)
                                          + state.offset, shape)
    assert torch.equal(Q.dequantize_nf4(ours), reference)


def test_nf4_bytes_per_weight_and_storage() -> None:
    q = Q.quantize_nf4(torch.randn(256, 256), 64, double_quant=True)
    assert q.nbytes() == 256 * 256 // 2 + 1024 + 4 * 4 + 4
    assert Q.bytes_per_weight(4, 64, True) == 0.5 + 1 / 64 + 4 / (64 * 256)
    assert Q.bytes_per_weight(4, 64, False) == 0.5 + 4 / 64
    assert Q.bytes_per_weight(8, 64) == 1 + 4 / 64


def test_reconstruction_errors_order_as_expected() -> None:
    weight = torch.randn(512, 512) * 0.02
    nf4 = Q.reconstruction_error(weight, Q.quantize_dequantize(weight, 4, 64, True))["relative"]
    int8_row = Q.reconstruction_error(weight, Q.dequantize_int8(*Q.quantize_int8(weight, "row"), "row"))["relative"]
    int8_tensor = Q.reconstruction_error(weight, Q.dequantize_int8(*Q.quantize_int8(weight, "tensor"),
                                                                   "tensor"))["relative"]
    assert int8_row < int8_tensor < nf4 < 0.12


def test_int8_rowwise_equals_bitsandbytes_vectorwise() -> None:
    x = torch.randn(16, 256).half()
    codes, absmax = Q.quantize_int8(x, "row")
    their_codes, their_stats, _ = bnb_functional.int8_vectorwise_quant(x)
    assert torch.equal(absmax, their_stats.float())
    assert (codes.int() - their_codes.int()).abs().max() <= 1  # half-precision scaling in bitsandbytes
    assert (codes != their_codes).float().mean() < 0.01


def test_llm_int8_outlier_decomposition_beats_plain_int8_with_outliers() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 256)
    x[:, 7] *= 40  # one outlier feature, as in LLM.int8's emergent features
    weight = torch.randn(128, 256) * 0.02
    exact = x @ weight.T
    mixed, outliers = Q.int8_outlier_matmul(x, weight, 6.0)
    assert outliers.tolist() == [7]
    plain, _ = Q.int8_outlier_matmul(x, weight, 1e9)
    assert Q.reconstruction_error(exact, mixed)["relative"] < Q.reconstruction_error(exact, plain)["relative"] / 5


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda: Q.quantize_nf4(torch.randn(10, 10), 64), "blocksize=64 does not divide the tensor's 100 elements"),
    (lambda: Q.quantize_nf4(torch.randn(64), 0), "blocksize=0 must be a positive integer"),
    (lambda: Q.quantize_dequantize(torch.randn(64), 3), "bits=3 is not one of 4, 8"),
    (lambda: Q.bytes_per_weight(2), "bits=2"),
    (lambda: Q.quantize_int8(torch.randn(4, 4), "column"), "granularity 'column'"),
    (lambda: Q.int8_outlier_matmul(torch.randn(2, 4), torch.randn(3, 4), -1), "threshold=-1"),
])
def test_bad_input_is_one_line_naming_the_value(call, fragment: str) -> None:
    with pytest.raises(SurveyError, match=fragment):
        call()
