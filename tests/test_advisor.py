"""The advisor: what fits N GPUs, for every registered method; its searches against brute force; the CLI."""

from __future__ import annotations

import csv
import json

import pytest

from survey_utils.advisor import (
    _Curve,
    advise,
    advise_method,
    gpu_memory_of,
    gpu_table,
    parse_memory,
    point,
)
from survey_utils.cli import main
from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import estimate
from survey_utils.memory.sharding import Sharding
from survey_utils.methods import get_method
from survey_utils.zoo import DATA_DIR, load_config


def test_units_are_required_and_distinguished() -> None:
    assert parse_memory("48GB") == 48 * 10**9
    assert parse_memory("48GiB") == 48 * 2**30
    assert parse_memory("1.5 TiB") == int(1.5 * 2**40)
    for bad, fragment in (("48", "no unit"), ("48XB", "unit 'XB'"), ("-3GB", "not a size"), ("0GB", "positive")):
        with pytest.raises(SurveyError, match=fragment):
            parse_memory(bad)


def test_llama_65b_qlora_fits_one_48gb_gpu_and_full_fine_tuning_does_not() -> None:
    advice = advise("llama-65b", "48GB", gpus=1, seq_len=512)
    rows = {r.method: r for r in advice.rows}
    assert rows["qlora"].fits and rows["qlora"].sharding == "single" and rows["qlora"].max_batch >= 1
    assert rows["qlora"].reserved + advice.as_dict()["cuda_context"] <= 48 * 10**9
    assert not rows["full"].fits and not rows["lora"].fits  # a 16-bit 65B base is 130 GB by itself
    assert rows["bitfit"].error and "bias" in rows["bitfit"].error


def test_llama_3_70b_on_eight_80gb_gpus_needs_sharded_parameters() -> None:
    advice = advise("llama-3-70b", "80GB", gpus=8, seq_len=2048, methods=["full", "lora", "qlora"])
    rows = {r.method: r for r in advice.rows}
    assert all(r.fits for r in rows.values())
    assert rows["full"].sharding.startswith(("zero3", "fsdp_full_shard"))  # 141 GB of bf16 weights
    assert rows["lora"].sharding.startswith(("zero3", "fsdp_full_shard"))
    one = advise("llama-3-70b", "80GB", gpus=1, methods=["full"])
    assert not one.rows[0].fits


@pytest.mark.parametrize("model,method,memory", [("gpt2", "lora", "4GB"), ("tiny-llama", "full", "1600MB"),
                                                 ("t5-small", "ia3", "3GB"), ("opt-350m", "prefix_tuning", "5GB")])
def test_searches_equal_brute_force_on_fresh_estimates(model: str, method: str, memory: str) -> None:
    """The closed polynomials (affine in batch, quadratic in length) give what estimating every candidate gives."""
    config, m, capacity = load_config(model), get_method(method), parse_memory(memory)
    context = 512
    row = advise_method(config, m, capacity, 1, 128, context, [Sharding()])
    ckpt = bool(row.gradient_checkpointing)

    def fits(b: int, s: int) -> bool:
        est = estimate(config, m, batch_size=b, seq_len=s, gradient_checkpointing=ckpt)
        return point(config, m, est, Sharding(), ckpt).device_total <= capacity

    assert row.fits and row.max_batch >= 1
    assert fits(row.max_batch, 128) and not fits(row.max_batch + 1, 128)
    assert fits(1, row.max_seq_len) and (row.max_seq_len == context or not fits(1, row.max_seq_len + 1))


def test_curve_interpolation_is_exact() -> None:
    config, m = load_config("llama-2-7b"), get_method("lora")
    curve = _Curve(config, m, 1024, False, {})
    for s in (100, 777, 4096):
        assert curve.at_seq(s, 4096).activations == estimate(config, m, seq_len=s).activations
    assert curve.at_batch(5).activations == estimate(config, m, batch_size=5, seq_len=1024).activations


def test_every_row_has_the_documented_keys() -> None:
    advice = advise("gpt2", "24GB").as_dict()
    assert {r["method"] for r in advice["rows"]} >= {"full", "lora", "qlora", "houlsby", "prompt_tuning"}
    for row in advice["rows"]:
        assert {"method", "fits", "max_batch", "max_seq_len", "sharding", "reserved", "terms"} <= set(row)
        if row["fits"]:
            assert row["terms"]["CUDA context"] > 0 and row["reserved"] >= row["allocated"]


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(gpus=0), "gpus=0"), (dict(sharding="zero3"), "at least 2 GPUs"), (dict(seq_len=5000), "exceeds"),
    (dict(gpus=2, sharding="single"), "one GPU")])
def test_bad_settings_name_the_value(kwargs, fragment) -> None:
    with pytest.raises(SurveyError, match=fragment):
        advise("llama-2-7b", "48GB", **kwargs)


def test_gpu_table_has_sources_and_parses() -> None:
    rows = gpu_table()
    assert len(rows) >= 10
    for row in rows:
        assert row["source"].startswith("https://") and row["memory_bytes"] >= 16 * 2**30
    with (DATA_DIR / "gpus.csv").open(encoding="utf-8") as handle:
        assert list(csv.DictReader(handle))[0].keys() >= {"name", "memory", "source"}
    assert gpu_memory_of(None, "a100-80gb") == 80 * 2**30
    with pytest.raises(SurveyError, match="exactly one"):
        gpu_memory_of("48GB", "a100-80gb")


def test_cli_json_is_one_object_with_rows(capsys) -> None:
    assert main(["advise", "--model", "llama-65b", "--gpu-memory", "48GB", "--seq-len", "512", "--json",
                 "--method", "qlora", "--method", "full"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in payload["rows"]}
    assert rows["qlora"]["fits"] is True and rows["full"]["fits"] is False


def test_cli_text_table(capsys) -> None:
    assert main(["advise", "--model", "gpt2", "--gpu", "rtx-4090", "--method", "lora"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "assumptions:" in out


@pytest.mark.parametrize("argv,fragment", [
    (["--gpu-memory", "48"], "no unit"), (["--gpu-memory", "48GB", "--gpus", "0"], "gpus=0"),
    (["--gpu-memory", "48GB", "--sharding", "fsdp_full_shard"], "at least 2 GPUs"),
    (["--gpu-memory", "48GB", "--seq-len", "9999"], "exceeds the context"), ([], "exactly one"),
    (["--gpu-memory", "48GB", "--method", "nope"], "unknown method")])
def test_cli_bad_input_exits_2_with_one_line(argv, fragment, capsys) -> None:
    assert main(["advise", "--model", "llama-2-7b", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err
