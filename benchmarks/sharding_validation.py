"""The multi-GPU estimate against FSDP2 simulated on a fake process group; writes data/sharding_validation.csv.

For each setting: the closed form's per-GPU peak under ``fsdp_full_shard`` (:mod:`survey_utils.memory.sharding`,
on the CPU estimate: the simulation runs CPU kernels, like with like) and rank 0's peak of two FSDP2 steps over
``gpus`` fake ranks (:func:`survey_utils.memory.sharded_simulation.simulate_fsdp`), and their relative error.

    python benchmarks/sharding_validation.py [--out data/sharding_validation.csv] [--only-models gpt2]

DDP, ZeRO (DeepSpeed) and CPU offload are not simulated: their rows in the sharding module rest on the ZeRO
paper's accounting alone (tests/memory/test_sharding.py reproduces its figure 1).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from survey_utils.architecture import layout  # noqa: E402
from survey_utils.memory.closed_form import estimate  # noqa: E402
from survey_utils.memory.sharded_simulation import simulate_fsdp  # noqa: E402
from survey_utils.memory.sharding import Sharding, per_gpu  # noqa: E402
from survey_utils.zoo import DATA_DIR, load_config  # noqa: E402

OUT = DATA_DIR / "sharding_validation.csv"
GRID = [("tiny-llama", "full", 4), ("tiny-llama", "lora", 4), ("tiny-gpt2", "full", 2), ("gpt2", "full", 4),
        ("gpt2", "lora", 4), ("opt-350m", "full", 2), ("qwen2.5-0.5b", "full", 8), ("qwen2.5-0.5b", "lora", 8),
        ("llama-2-7b", "lora", 8), ("llama-2-7b", "full", 8)]
COLUMNS = ["model", "method", "gpus", "batch_size", "seq_len", "estimate_per_gpu", "simulated_per_gpu",
           "relative_error", "single_gpu_estimate", "command"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--only-models", default=None)
    args = parser.parse_args()
    models = set(args.only_models.split(",")) if args.only_models else None
    rows = []
    for model, method, gpus in GRID:
        if models and model not in models:
            continue
        est = estimate(model, method, batch_size=1, seq_len=512, device="cpu")
        ours = per_gpu(est, layout(load_config(model)), Sharding("fsdp_full_shard", gpus), method == "full").total
        sim = simulate_fsdp(model, method, gpus, batch_size=1, seq_len=512)
        error = (ours - sim.peak) / sim.peak
        rows.append(dict(model=model, method=method, gpus=gpus, batch_size=1, seq_len=512, estimate_per_gpu=ours,
                         simulated_per_gpu=sim.peak, relative_error=f"{error:.5f}", single_gpu_estimate=est.total,
                         command=f"python benchmarks/sharding_validation.py --only-models {model}"))
        print(f"{model:<14} {method:<5} x{gpus}  estimate {ours / 2**20:10.1f} MiB  FSDP2 fake-pg {sim.peak / 2**20:10.1f} MiB"
              f"  error {100 * error:+6.2f}%  (one GPU {est.total / 2**20:10.1f} MiB; {sim.seconds:.1f} s)", flush=True)
    errors = [abs(float(r["relative_error"])) for r in rows]
    print(f"{len(rows)} settings: median |error| {100 * statistics.median(errors):.2f}%, worst {100 * max(errors):.2f}%")
    if models:
        print("(filtered run: nothing written)")
        return 0
    with Path(args.out).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
