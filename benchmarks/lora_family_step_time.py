"""Training-step time of our from-scratch LoRA and DoRA against HF peft's, and merged inference speed.

Run: .venv/bin/python benchmarks/lora_family_step_time.py [--model tiny-llama] [--batch 4] [--seq 128]
     [--rounds 30] [--warmup 5] [--threads 1]
Writes data/lora_family_step_time.csv (one row per measurement, with the command and the machine).

- ``train_step``: one AdamW step (zero_grad, forward, mean-squared-logits loss, backward, optimizer step)
  on the same tiny model with random weights, ours and peft's built from the same seed with the same
  hyper-parameters (r=8 on the architecture's default targets). The goal is ours <= 1.1x peft's time.
- ``inference``: one forward pass under ``no_grad`` of the base model, of our LoRA and DoRA unmerged,
  and of the same adapters merged; merged should run at the base model's speed (ratio ~1).

Timings: ``warmup`` untimed rounds, then ``rounds`` rounds in which every case runs once, interleaved so
that noise from other processes hits all cases alike; the median over rounds is reported, and the
minimum (the time least disturbed by other processes, ``timeit``'s advice) with its own ratio: on a busy
machine the two ratios differ and the minimum's is the better estimate. ``torch.set_num_threads`` is fixed. Chapter 04's closing note quotes the ratios.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from survey_utils.counting import apply_method, peft_model
from survey_utils.methods import merge
from survey_utils.parity import example_inputs
from survey_utils.zoo import DATA_DIR, build_model

METHODS = ("lora", "dora")


def training_step(model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).logits.pow(2).mean().backward()
        optimizer.step()

    return step


def inference(model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
    model.eval()

    def run() -> None:
        with torch.no_grad():
            model(**inputs)

    return run


def measure(cases: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DATA_DIR / "lora_family_step_time.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join([".venv/bin/python", "benchmarks/lora_family_step_time.py", *(argv or sys.argv[1:])])

    config = build_model(args.model, device="meta").config
    inputs = example_inputs(config, batch=args.batch, seq_len=args.seq)
    hp = {"r": args.rank, "lora_alpha": 16.0}

    train_cases = {}
    for method in METHODS:
        train_cases[f"{method} ours"] = training_step(apply_method(build_model(args.model, seed=0), method, **hp),
                                                      inputs)
        train_cases[f"{method} peft"] = training_step(peft_model(build_model(args.model, seed=0), method, **hp),
                                                      inputs)
    train = measure(train_cases, args.rounds, args.warmup)

    infer_cases = {"base": inference(build_model(args.model, seed=0), inputs)}
    for method in METHODS:
        infer_cases[f"{method} unmerged"] = inference(apply_method(build_model(args.model, seed=0), method, **hp),
                                                      inputs)
        infer_cases[f"{method} merged"] = inference(
            merge(apply_method(build_model(args.model, seed=0), method, **hp)), inputs)
    infer = measure(infer_cases, args.rounds, args.warmup)

    rows = []
    machine = f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()}".strip()
    print(f"{args.model}, batch {args.batch} x seq {args.seq}, r={args.rank}, {args.threads} thread(s), "
          f"median of {args.rounds} after {args.warmup} warm-up rounds")
    print(f"{'phase':<11}{'case':<16}{'median ms':>10}{'min ms':>9}  ratio of medians (of minima)")
    for phase, times, reference in (("train_step", train, None), ("inference", infer, "base")):
        for name, values in times.items():
            ref = reference or name.replace(" ours", " peft")
            median = statistics.median(values)
            ratio = median / statistics.median(times[ref]) if ref in times and ref != name else None
            ratio_min = min(values) / min(times[ref]) if ratio is not None else None
            label = f"{ratio:.3f}x ({ratio_min:.3f}x) {ref}" if ratio is not None else ""
            print(f"{phase:<11}{name:<16}{median:>10.2f}{min(values):>9.2f}  {label}")
            rows.append({"phase": phase, "case": name, "median_ms": round(median, 3),
                         "min_ms": round(min(values), 3), "ratio": round(ratio, 4) if ratio else "",
                         "ratio_min": round(ratio_min, 4) if ratio_min else "",
                         "ratio_against": ref if ratio is not None else "", "model": args.model,
                         "batch": args.batch, "seq_len": args.seq, "rank": args.rank, "threads": args.threads,
                         "rounds": args.rounds, "warmup": args.warmup, "torch": torch.__version__,
                         "machine": machine, "command": command})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
