"""Inference overhead of adapters (they cannot be merged) and AdapterDrop's training speed-up, measured.

Run: .venv/bin/python benchmarks/adapter_inference_overhead.py [--model tiny-llama] [--batch 8] [--seq 128]
Writes data/adapter_inference_overhead.csv (one row per method, with the command and the machine).

For each method of chapter 01 (and LoRA, unmerged and merged, for reference) on a tiny model with random
weights on the CPU:

- ``flops``: forward FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and
  attention only; element-wise operations are not counted), and the extra FLOPs over the base model;
- ``latency_ms``: best (minimum) wall time of one forward pass under ``no_grad`` over the rounds, the
  estimate least disturbed by other processes (``timeit``'s advice); the median is written too;
- ``train_ms``: best wall time of one training step (forward + backward of a summed-logits loss, no
  optimizer), against full fine-tuning. AdapterDrop's rows show its effect: backward stops at the lowest
  adapted block.

Timings interleave the methods round by round so that machine noise hits all of them alike.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from survey_utils.counting import apply_method, count_parameters
from survey_utils.methods import merge
from survey_utils.parity import example_inputs
from survey_utils.zoo import DATA_DIR, build_model

# (label, method, hyper-parameters, merge after applying)
CASES: list[tuple[str, str | None, dict, bool]] = [
    ("base", None, {}, False),
    ("houlsby", "houlsby", {}, False),
    ("pfeiffer", "pfeiffer", {}, False),
    ("parallel_adapter", "parallel_adapter", {}, False),
    ("adapterdrop k=1", "adapterdrop", {"drop_layers": 1}, False),
    ("adapterdrop k=2", "adapterdrop", {"drop_layers": 2}, False),
    ("adapterdrop k=3", "adapterdrop", {"drop_layers": 3}, False),
    ("compacter", "compacter", {}, False),
    ("ia3", "ia3", {}, False),
    ("ia3 merged", "ia3", {}, True),
    ("lst", "lst", {}, False),
    ("lora r=8 (q,v)", "lora", {}, False),
    ("lora merged", "lora", {}, True),
]


def build(model: str, method: str | None, hp: dict, merged: bool) -> torch.nn.Module:
    built = build_model(model, device="cpu", seed=0)
    if method is None:
        return built
    apply_method(built, method, **hp)
    return merge(built) if merged else built


def forward_flops(model: torch.nn.Module, inputs: dict) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs)
    return counter.get_total_flops()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def train_step(model: torch.nn.Module, inputs: dict) -> None:
    model.zero_grad(set_to_none=True)
    model(**inputs).logits.float().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise)")
    parser.add_argument("--out", default=str(DATA_DIR / "adapter_inference_overhead.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inputs = example_inputs(build_model(args.model, device="meta").config, batch=args.batch, seq_len=args.seq)

    models = {label: build(args.model, method, hp, merged) for label, method, hp, merged in CASES}
    full = build_model(args.model, device="cpu", seed=0).train()
    for model in models.values():
        model.eval()
    flops = {label: forward_flops(model, inputs) for label, model in models.items()}

    latency: dict[str, list[float]] = {label: [] for label in models}
    training: dict[str, list[float]] = {label: [] for label in [*models, "full"]}
    for round_ in range(args.rounds + 2):  # two warm-up rounds are discarded
        for label, model in models.items():
            with torch.no_grad():
                ms = timed(lambda m=model: m(**inputs))
            if round_ >= 2:
                latency[label].append(ms)
        for label, model in [*[(k, v) for k, v in models.items() if k != "base" and "merged" not in k],
                             ("full", full)]:
            ms = timed(lambda m=model: train_step(m, inputs))
            if round_ >= 2:
                training[label].append(ms)

    base_flops, base_ms = flops["base"], min(latency["base"])
    full_ms = min(training["full"])
    command = " ".join([".venv/bin/python", "benchmarks/adapter_inference_overhead.py", *sys.argv[1:]])
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads, CPU fp32"
    rows = []
    header = (f"{'method':<18}{'trainable':>11}{'fwd GFLOPs':>12}{'extra FLOPs':>13}{'latency ms':>12}"
              f"{'overhead':>10}{'train ms':>10}{'vs full':>9}")
    print(f"{args.model}, batch {args.batch} x {args.seq} tokens, best of {args.rounds} rounds; {machine}")
    print(header)
    print("-" * len(header))
    for label, method, hp, merged in CASES:
        trainable = count_parameters(models[label]).trainable if method else 0
        ms = min(latency[label])
        train = min(training[label]) if training.get(label) else None
        row = {
            "model": args.model, "method": label, "settings": repr(hp), "merged": merged,
            "trainable": trainable, "forward_flops": flops[label],
            "extra_flops_pct": round(100 * (flops[label] - base_flops) / base_flops, 3),
            "latency_ms": round(ms, 3), "latency_median_ms": round(statistics.median(latency[label]), 3),
            "latency_overhead_pct": round(100 * (ms - base_ms) / base_ms, 1),
            "train_step_ms": round(train, 3) if train else "",
            "train_step_vs_full_pct": round(100 * (train - full_ms) / full_ms, 1) if train else "",
            "batch": args.batch, "seq_len": args.seq, "rounds": args.rounds, "machine": machine, "command": command,
        }
        rows.append(row)
        train_text = f"{train:10.2f}{row['train_step_vs_full_pct']:+8.1f}%" if train else f"{'':>10}{'':>9}"
        print(f"{label:<18}{trainable:>11,}{flops[label] / 1e9:>12.3f}{row['extra_flops_pct']:>+12.2f}%"
              f"{ms:>12.2f}{row['latency_overhead_pct']:>+9.1f}%{train_text}")
    print(f"{'full fine-tuning':<18}{'':>11}{'':>12}{'':>13}{'':>12}{'':>10}{full_ms:10.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
