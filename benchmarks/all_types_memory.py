"""Memory for every text model type transformers builds: estimate vs simulation, one row per type (issue 12).

For each model type of transformers' causal-LM and seq2seq-LM auto mappings (the all-types test's list, built from
its default config shrunk to two blocks, ``tests/test_all_types.small_default``), this asks the closed-form
``estimate`` for full fine-tuning at batch 1 x 64 tokens on CPU kernels (like with like) and, for every
``--simulate-every``-th type in alphabetical order (all with ``--simulate-every 1``; a simulation of a default-size
config takes 10-60 s on 2 cores), runs the fake-tensor ``simulate`` of the same step. Types with a hand activation recipe use it; every other type's recipe is derived from
its own code (``survey_utils.memory.derived``). A type the memory model cannot answer for gets its one-line reason.
Writes ``data/all_types_memory.csv`` and prints how many types answer and the error distribution.

    python benchmarks/all_types_memory.py [--out data/all_types_memory.csv] [--simulate-every 8] [--only llama,falcon]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from survey_utils.errors import SurveyError  # noqa: E402  (the repository root is put on the path first)
from survey_utils.memory import estimate, simulate  # noqa: E402
from survey_utils.memory.activations import RECIPES  # noqa: E402
from tests.test_all_types import all_types, small_default  # noqa: E402

COMMAND = "python benchmarks/all_types_memory.py"
COLUMNS = ["model_type", "recipe", "status", "estimate_bytes", "simulated_bytes", "relative_error", "reason"]
BATCH, SEQ = 1, 64


def row_for(model_type: str, with_simulation: bool) -> dict[str, object]:
    row: dict[str, object] = dict.fromkeys(COLUMNS, "")
    row["model_type"] = model_type
    try:
        config = small_default(model_type)
        from survey_utils.architecture import layout

        row["recipe"] = "hand" if layout(config).family in RECIPES else "derived"
        est = estimate(config, "full", {}, batch_size=BATCH, seq_len=SEQ, device="cpu")
        sim = simulate(config, "full", {}, batch_size=BATCH, seq_len=SEQ) if with_simulation else None
    except SurveyError as error:
        row["status"], row["reason"] = "refused", str(error)
        return row
    except Exception as error:  # noqa: BLE001 - a simulation's own failure is reported, not hidden
        row["status"], row["reason"] = "simulation failed", " ".join(f"{type(error).__name__}: {error}".split())[:200]
        return row
    row.update(status="answered", estimate_bytes=est.total)
    if sim is not None:
        row.update(simulated_bytes=sim.peak, relative_error=f"{(est.total - sim.peak) / sim.peak:.5f}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "all_types_memory.csv")
    parser.add_argument("--simulate-every", type=int, default=8, help="simulate every N-th type (1: all)")
    parser.add_argument("--only", default="", help="comma-separated model types (prints, writes nothing)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    types = [t for t in all_types() if not args.only or t in args.only.split(",")]
    rows = []
    for index, model_type in enumerate(types):
        start = time.perf_counter()
        row = row_for(model_type, with_simulation=bool(args.only) or index % args.simulate_every == 0)
        rows.append(row)
        print(f"{model_type:<28} {row['recipe']:<8} {row['status']:<18} {row['relative_error'] or '':>9}  "
              f"{time.perf_counter() - start:5.1f} s  {str(row['reason'])[:90]}", flush=True)
    answered = [r for r in rows if r["status"] == "answered"]
    errors = sorted(abs(float(r["relative_error"])) for r in answered if r["relative_error"] != "")
    derived = [r for r in answered if r["recipe"] == "derived"]
    summary = (f"{len(answered)} of {len(rows)} model types answered ({len(derived)} with derived recipes); "
               f"{len(errors)} simulated, |estimate - simulation| / simulation: median {100 * statistics.median(errors):.2f}%, "
               f"worst {100 * errors[-1]:.2f}%, within 1%: {sum(e <= 0.01 for e in errors)}, "
               f"within 5%: {sum(e <= 0.05 for e in errors)}" if errors else f"0 of {len(rows)} answered")
    print(summary)
    if args.only:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as handle:
        handle.write(f"# full fine-tuning, batch {BATCH} x {SEQ} tokens, bf16, AdamW, CPU kernels, each type's default "
                     f"config shrunk to two blocks; simulated: every {args.simulate_every}-th type; written by "
                     f"'{COMMAND} --simulate-every {args.simulate_every}'\n")
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
