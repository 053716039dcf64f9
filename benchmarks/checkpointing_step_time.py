"""Gradient checkpointing's price: training-step time with and without it, beside the memory it saves (chapter 06).

Run: .venv/bin/python benchmarks/checkpointing_step_time.py [--model tiny-llama] [--method lora] [--batch 4]
     [--seq 256] [--rounds 20] [--warmup 3] [--threads 1] [--device cpu|cuda] [--out CSV]

One step = zero_grad, forward with the model's own loss on ``input_ids`` as labels, backward, AdamW step, on
the same model built from the same seed (``method`` applied at its defaults; ``full`` trains every weight).
With checkpointing every block is wrapped by transformers' ``gradient_checkpointing_enable`` (non-reentrant),
so in backward each block's forward runs again: the expected cost is about one more forward pass of the
blocks, i.e. a step-time ratio near (F + F + B) / (F + B) ~ 4/3 when backward costs about two forwards.

Timing: ``warmup`` untimed rounds, then ``rounds`` rounds running both settings once each, interleaved so that
other processes' noise hits both alike; the median and the minimum per setting and their ratios are printed
(the minimum is the least disturbed; on a busy machine prefer its ratio). Memory, beside it: the closed-form
estimate's peak allocated bytes with and without checkpointing (``device`` kernels), the fake-tensor
simulation's on CPU, and on CUDA ``torch.cuda.max_memory_allocated`` of a timed step. ``--out`` writes one
row per setting with the command and the machine.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from survey_utils.counting import apply_method  # noqa: E402
from survey_utils.errors import SurveyError  # noqa: E402
from survey_utils.memory import estimate  # noqa: E402
from survey_utils.memory.simulation import simulate  # noqa: E402
from survey_utils.parity import example_inputs  # noqa: E402
from survey_utils.zoo import build_model  # noqa: E402


def build(model: str, method: str, checkpointing: bool, device: str, seed: int = 0):  # noqa: ANN201
    built = apply_method(build_model(model, device=device, seed=seed), method)
    built.train()
    if hasattr(built.config, "use_cache"):
        built.config.use_cache = False
    if checkpointing:
        built.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW([p for p in built.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    return built, optimizer


def step(model, optimizer, inputs: dict[str, torch.Tensor]) -> None:  # noqa: ANN001
    optimizer.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        setups = {ck: build(args.model, args.method, ck, args.device) for ck in (False, True)}
    except SurveyError as error:
        print(error, file=sys.stderr)
        return 2
    inputs = {k: v.to(args.device) for k, v in example_inputs(setups[False][0].config, batch=args.batch,
                                                                seq_len=args.seq).items()}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        for ck in (False, True):
            step(*setups[ck], inputs)
    times: dict[bool, list[float]] = {False: [], True: []}
    measured: dict[bool, int | None] = {False: None, True: None}
    for _ in range(args.rounds):
        for ck in (False, True):
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            step(*setups[ck], inputs)
            sync()
            times[ck].append(time.perf_counter() - start)
            if args.device == "cuda":
                measured[ck] = torch.cuda.max_memory_allocated()
    settings = {"batch_size": args.batch, "seq_len": args.seq, "dtype": "fp32"}
    est = {ck: estimate(args.model, args.method, gradient_checkpointing=ck, device=args.device, **settings).total
           for ck in (False, True)}
    sim = {ck: simulate(args.model, args.method, gradient_checkpointing=ck, **settings).peak for ck in (False, True)}
    med = {ck: statistics.median(t) for ck, t in times.items()}
    low = {ck: min(t) for ck, t in times.items()}
    command = "python benchmarks/checkpointing_step_time.py " + " ".join(sys.argv[1:])
    print(f"{args.model} {args.method}, batch {args.batch} x {args.seq}, fp32, {args.device}, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    print(f"{'checkpointing':<15}{'median ms':>11}{'min ms':>9}{'estimate MiB':>14}{'simulated MiB':>15}"
          f"{'measured MiB':>14}")
    for ck in (False, True):
        measured_text = f"{measured[ck] / 2**20:>14.1f}" if measured[ck] is not None else f"{'-':>14}"
        print(f"{'on' if ck else 'off':<15}{1e3 * med[ck]:>11.2f}{1e3 * low[ck]:>9.2f}{est[ck] / 2**20:>14.1f}"
              f"{sim[ck] / 2**20:>15.1f}{measured_text}")
    print(f"step-time ratio (on / off): median {med[True] / med[False]:.3f}, minimum {low[True] / low[False]:.3f}")
    print(f"peak memory ratio (on / off): estimate {est[True] / est[False]:.3f}, simulation "
          f"{sim[True] / sim[False]:.3f}"
          + (f", measured {measured[True] / measured[False]:.3f}" if measured[False] else ""))
    if args.out:
        with Path(args.out).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["model", "method", "batch_size", "seq_len", "device", "threads", "rounds",
                             "gradient_checkpointing", "median_s", "min_s", "estimate_bytes", "simulated_bytes",
                             "measured_allocated_bytes", "machine", "command"])
            machine = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"
            if args.device == "cuda":
                machine = torch.cuda.get_device_name()
            for ck in (False, True):
                writer.writerow([args.model, args.method, args.batch, args.seq, args.device, args.threads,
                                 args.rounds, ck, f"{med[ck]:.6f}", f"{low[ck]:.6f}", est[ck], sim[ck],
                                 measured[ck] if measured[ck] is not None else "", machine, command])
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
