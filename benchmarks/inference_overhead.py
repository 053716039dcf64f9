"""Inference overhead after merging, per method, on the tiny models: extra FLOPs and extra latency.

    .venv/bin/python benchmarks/inference_overhead.py [--models tiny-bert ...] [--methods lora ...]
                                                     [--repeats 30] [--out data/inference_overhead.csv]

For every registered method (default hyper-parameters) and tiny model: the forward FLOPs of the base model
and of the adapted model after ``merge`` (``FlopCounterMode``), and the median latency of a forward pass on
one 32-token sequence, base and merged runs interleaved, one CPU thread; the CSV records the machine's load average, since a busy machine makes the
latency noise larger than most effects. Latency is noisy, so it lives here
and in the CSV, never in a figure's own run; the chapter 07 comparison table reads the CSV. Methods a model
rejects (``SurveyError``) are reported and left out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from survey_utils.counting import apply_method  # noqa: E402
from survey_utils.errors import SurveyError  # noqa: E402
from survey_utils.figures.measured import FLOPS_SEQ_LEN, _batch, forward_flops  # noqa: E402
from survey_utils.methods import list_methods  # noqa: E402
from survey_utils.methods.common import merge  # noqa: E402
from survey_utils.zoo import build_model  # noqa: E402

TINY = ["tiny-bert", "tiny-llama", "tiny-gpt2", "tiny-t5"]
COLUMNS = ["model", "method", "seq_len", "repeats", "flops_base", "flops_merged", "flops_overhead_pct",
           "latency_base_ms", "latency_merged_ms", "latency_overhead_pct", "threads", "load_1min", "torch", "machine", "command"]


def timed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(**batch)
    return (time.perf_counter() - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=TINY)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "data" / "inference_overhead.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = [m.name for m in list_methods()] if args.methods is None else args.methods
    command = "python benchmarks/inference_overhead.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    rows = []
    for model_name in args.models:
        base = build_model(model_name, device="cpu", seed=0)
        batch = _batch(base.config, FLOPS_SEQ_LEN)
        flops_base = forward_flops(copy.deepcopy(base))
        for name in methods:
            try:
                adapted = merge(apply_method(copy.deepcopy(base), name)).eval()
            except SurveyError as error:
                print(f"{model_name:<11} {name:<17} skipped: {error}")
                continue
            flops_merged = forward_flops(copy.deepcopy(adapted))
            for _ in range(3):  # warm-up
                timed(base, batch)
                timed(adapted, batch)
            base_ms, merged_ms = [], []
            for _ in range(args.repeats):  # interleaved, so that load drift hits both alike
                base_ms.append(timed(base, batch))
                merged_ms.append(timed(adapted, batch))
            b, m = statistics.median(base_ms), statistics.median(merged_ms)
            row = {"model": model_name, "method": name, "seq_len": FLOPS_SEQ_LEN, "repeats": args.repeats,
                   "flops_base": flops_base, "flops_merged": flops_merged,
                   "flops_overhead_pct": f"{100 * (flops_merged - flops_base) / flops_base:.3f}",
                   "latency_base_ms": f"{b:.3f}", "latency_merged_ms": f"{m:.3f}",
                   "latency_overhead_pct": f"{100 * (m - b) / b:.1f}", "threads": 1, "load_1min": f"{os.getloadavg()[0]:.2f}", "torch": torch.__version__,
                   "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
                   "command": command}
            rows.append(row)
            print(f"{model_name:<11} {name:<17} FLOPs +{row['flops_overhead_pct']:>8}%  "
                  f"latency {b:7.2f} -> {m:7.2f} ms ({row['latency_overhead_pct']:>6}%)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
