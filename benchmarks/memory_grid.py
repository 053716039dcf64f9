"""Estimate vs simulation (vs measurement where a GPU ran it) over a grid; writes data/memory_validation.csv.

Grid: zoo models from tiny to 70B x methods (full and LoRA everywhere; every registered method on
tiny-llama) x batch x sequence length x gradient checkpointing. Then draws
figures/memory_estimate_vs_simulation.png/svg and prints the median and worst estimate errors.
Runs in a few minutes on 2 cores: every simulation is on fake tensors. ``--measure`` adds real CUDA steps
for models up to 1B parameters when a GPU is present.

    python benchmarks/memory_grid.py [--out data/memory_validation.csv] [--figures figures] [--measure]
        [--only-models tiny-gpt2,gpt2] [--only-methods lora,full]   (filters print and write nothing)

The estimate is taken with ``device="cpu"``: the simulation runs the CPU kernels (fake CPU tensors), so the
two are compared like with like.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from survey_utils.architecture import total_params  # noqa: E402
from survey_utils.errors import SurveyError  # noqa: E402
from survey_utils.memory import estimate, measure, simulate, validation_figure  # noqa: E402
from survey_utils.methods import list_methods  # noqa: E402
from survey_utils.zoo import load_config  # noqa: E402

COLUMNS = ["model", "method", "hp", "batch_size", "seq_len", "gradient_checkpointing", "dtype", "optimizer", "attention",
           "quantization",
           "trainable_params", "estimate_bytes", "simulated_bytes", "measured_allocated_bytes",
           "measured_reserved_bytes", "relative_error", "peak_phase", "command"]

# (model, batch, seq) shapes; every one runs with and without checkpointing for full and LoRA.
SHAPES = [
    ("tiny-llama", 1, 512), ("tiny-llama", 8, 256),
    ("tiny-gpt2", 2, 256), ("tiny-bert", 2, 256), ("tiny-t5", 2, 128),
    ("gpt2", 1, 512), ("opt-350m", 2, 512), ("bloom-560m", 1, 512),
    ("qwen2.5-0.5b", 2, 1024),
    ("llama-2-7b", 1, 512), ("llama-2-7b", 4, 2048), ("mistral-7b", 1, 1024),
    ("llama-2-13b", 1, 512),
]
BIG = [("llama-2-70b", 1, 512)]  # LoRA only, without checkpointing (about 30 s each)
# The families the generic layout added (issue 12), at their zoo sizes, LoRA at peft's default targets (fake tensors
# at full size cost 1-5 minutes a row on 2 cores, so one row each); falcon has no hand recipe (its activations are
# derived from its code, survey_utils.memory.derived): full fine-tuning, and LoRA with checkpointing.
NEW_FAMILIES = [("qwen3-0.6b", 1, 512), ("olmo-2-1b", 1, 512), ("gemma-2-2b", 1, 512), ("phi-3-mini", 1, 512),
                ("starcoder2-3b", 1, 512), ("pythia-1b", 1, 512), ("mt0-large", 1, 256)]
DERIVED = [("falcon-7b", "full", False), ("falcon-7b", "lora", True)]
NO_PEFT_DEFAULT = {"phi-3-mini": {"target_modules": ["qkv_proj"]}}  # peft has no default LoRA target for phi3
# Mixtures of experts, LoRA: peft's default targets with and without checkpointing; deepseek_v3 (derived recipe, no
# peft default target) on its attention's linears.
DEEPSEEK_ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
MOE = [("mixtral-8x7b", {}, False), ("mixtral-8x7b", {}, True),
       ("deepseek-v3", {"target_modules": DEEPSEEK_ATTENTION}, False)]

ALL_METHODS_ON = [("tiny-llama", 2, 128)]
# Settings where the methods' defaults do not fit a 4-block model, or where backward stops above block 0.
EXTRA = [("tiny-llama", "adapterdrop", {"drop_layers": 2}), ("tiny-llama", "llama_adapter", {"adapter_layers": 2}),
         ("tiny-llama", "lora", {"layers_to_transform": [2, 3]}), ("tiny-gpt2", "pfeiffer", {}),
         ("tiny-bert", "houlsby", {}), ("tiny-gpt2", "prefix_tuning", {}), ("tiny-gpt2", "prompt_tuning", {})]
# Frozen bases in bitsandbytes' storage (chapter 06): the simulation holds them as bitsandbytes does.
QUANTIZED = [("tiny-llama", "qlora", "nf4", 2, 128), ("tiny-llama", "loftq", "nf4", 2, 128),
             ("tiny-llama", "lora", "nf4", 2, 128), ("tiny-llama", "lora", "int8", 2, 128),
             ("llama-2-7b", "qlora", "nf4", 1, 512)]


def settings_grid() -> list[dict]:
    grid = []
    for model, batch, seq in SHAPES:
        for method in ("full", "lora"):
            for ckpt in (False, True):
                grid.append(dict(model=model, method=method, batch_size=batch, seq_len=seq,
                                 gradient_checkpointing=ckpt))
    for model, batch, seq in NEW_FAMILIES:
        grid.append(dict(model=model, method="lora", hp=NO_PEFT_DEFAULT.get(model, {}), batch_size=batch,
                         seq_len=seq, gradient_checkpointing=False))
    for model, method, ckpt in DERIVED:
        grid.append(dict(model=model, method=method, batch_size=1, seq_len=512, gradient_checkpointing=ckpt))
    for model, hp, ckpt in MOE:
        grid.append(dict(model=model, method="lora", hp=hp, batch_size=1, seq_len=256, gradient_checkpointing=ckpt))
    for model, batch, seq in BIG:
        grid.append(dict(model=model, method="lora", batch_size=batch, seq_len=seq, gradient_checkpointing=False))
    for model, batch, seq in ALL_METHODS_ON:
        for method in list_methods():
            if method.name not in ("full", "lora"):
                grid.append(dict(model=model, method=method.name, batch_size=batch, seq_len=seq,
                                 gradient_checkpointing=False))
    for model, method, hp in EXTRA:
        grid.append(dict(model=model, method=method, hp=hp, batch_size=2, seq_len=128, gradient_checkpointing=False))
    for model, method, quantization, batch, seq in QUANTIZED:
        for ckpt in (False, True):
            grid.append(dict(model=model, method=method, quantization=quantization, batch_size=batch, seq_len=seq,
                             gradient_checkpointing=ckpt))
    return [dict({"hp": {}, "quantization": ""}, **case) for case in grid]


def _hp_text(hp: dict) -> str:
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in hp.items())


def command(row: dict) -> str:
    parts = ["python -m survey_utils memory", f"--model {row['model']}", f"--method {row['method']}",
             *(f"--set {item}" for item in row["hp"].split()),
             f"--batch-size {row['batch_size']}", f"--seq-len {row['seq_len']}", f"--dtype {row['dtype']}",
             f"--optimizer {row['optimizer']}", f"--attention {row['attention']}"]
    if row["gradient_checkpointing"]:
        parts.append("--gradient-checkpointing")
    if row["quantization"]:
        parts.append(f"--quantization {row['quantization']}")
    return " ".join(parts + ["--device cpu --simulate"])


def run(out: Path, figures: Path, with_measure: bool, models: set[str] | None = None,
        methods: set[str] | None = None) -> list[dict]:
    rows = []
    start = time.perf_counter()
    for case in settings_grid():
        if (models and case["model"] not in models) or (methods and case["method"] not in methods):
            continue
        hp = case.pop("hp")
        case = dict(case, hp=_hp_text(hp), dtype="bf16", optimizer="adamw", attention="sdpa")
        kwargs = {k: case[k] for k in ("batch_size", "seq_len", "gradient_checkpointing", "dtype", "optimizer",
                                       "attention")}
        kwargs["quantization"] = case["quantization"] or None
        try:
            est = estimate(case["model"], case["method"], hp, device="cpu", **kwargs)
            sim = simulate(case["model"], case["method"], hp, **kwargs)
        except SurveyError as error:
            print(f"skip {case['model']} {case['method']}: {error}", file=sys.stderr)
            continue
        row = dict(case, trainable_params=est.trainable_params, estimate_bytes=est.total,
                   simulated_bytes=sim.peak, measured_allocated_bytes="", measured_reserved_bytes="",
                   relative_error=f"{(est.total - sim.peak) / sim.peak:.5f}", peak_phase=est.peak_phase)
        # quantized rows are simulated only: the real step would need bitsandbytes' CUDA kernels in the base
        if with_measure and not case["quantization"] and total_params(load_config(case["model"])) <= 1_000_000_000:
            try:
                got = measure(case["model"], case["method"], hp, device="cuda", **kwargs)
                row["measured_allocated_bytes"], row["measured_reserved_bytes"] = got.allocated, got.reserved
            except SurveyError as error:
                print(f"no measurement: {error}", file=sys.stderr)
        row["command"] = command(row)
        rows.append(row)
        print(f"{case['model']:<14} {case['method']:<16} {case['hp'] or case['quantization']:<22} b{case['batch_size']:<2} s{case['seq_len']:<5} "
              f"ckpt={int(case['gradient_checkpointing'])}  est {est.total / 2**30:9.3f} GiB  "
              f"sim {sim.peak / 2**30:9.3f} GiB  err {100 * float(row['relative_error']):+6.2f}%  "
              f"({sim.seconds:.1f} s)", flush=True)
    if models or methods:
        errors = [abs(float(r["relative_error"])) for r in rows]
        print(f"{len(rows)} settings; median {100 * statistics.median(errors):.2f}%; worst {100 * max(errors):.2f}%; "
              f"within 5%: {sum(e <= 0.05 for e in errors)} (filtered run: nothing written)")
        return rows
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    paths = validation_figure(figures, out)
    errors = sorted(((abs(float(r["relative_error"])), r) for r in rows), key=lambda pair: pair[0])
    median = statistics.median(e for e, _ in errors)
    print(f"\n{len(rows)} settings in {time.perf_counter() - start:.0f} s; wrote {out} and "
          f"{', '.join(str(p) for p in paths)}")
    print(f"median |estimate - simulation| / simulation: {100 * median:.2f}%")
    within = sum(e <= 0.05 for e, _ in errors)
    print(f"within 5%: {within} of {len(rows)}")
    print("worst:")
    for error, row in errors[-5:][::-1]:
        print(f"  {100 * error:6.2f}%  {row['command']}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "memory_validation.csv")
    parser.add_argument("--figures", type=Path, default=ROOT / "figures")
    parser.add_argument("--measure", action="store_true", help="also run real CUDA steps (GPU only)")
    parser.add_argument("--only-models", type=lambda text: set(text.split(",")), default=None,
                        help="comma-separated zoo models (quick iterations: nothing is written)")
    parser.add_argument("--only-methods", type=lambda text: set(text.split(",")), default=None,
                        help="comma-separated methods (quick iterations: nothing is written)")
    args = parser.parse_args()
    run(args.out, args.figures, args.measure, args.only_models, args.only_methods)
