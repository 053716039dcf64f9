"""Reserved memory: replayed simulation traces vs the closed form, and published peaks; writes data and a figure.

1. Replay grid: for each setting, one simulated step (fake tensors) records its allocation trace, which is
   replayed through the caching-allocator model (:mod:`survey_utils.memory.allocator`). Per row: the simulated
   allocated peak, the replayed reserved peak (and with ``expandable_segments``), the segment rounding of the
   persistent tensors, and ``transient_overhead`` = (reserved - allocated - rounding) / transient peak, where the
   transient peak is the allocated peak minus weights, optimizer states and master copies. The closed form's
   ``TRANSIENT_OVERHEAD`` is the largest value on this grid rounded up to a percent (this script prints it, and
   ``tests/memory/test_allocator.py`` checks the constant against the committed CSV).
2. Published rows (``data/published_peaks.csv``, transcribed with sources): the estimate, the closed-form reserved
   and (where the model is simulable) the replayed reserved against each published figure; errors are summarised
   only over rows whose settings are fully stated (``settings_complete`` = yes).

Writes ``data/reserved_validation.csv`` and ``figures/reserved_validation.png``/``.svg`` (byte-identical reruns).

    python benchmarks/reserved_validation.py [--out data/reserved_validation.csv] [--figures figures]
        [--only-models tiny-llama,gpt2]   (filters print and write nothing)

Runs in a few minutes on 2 cores (the 7B simulations take about 10 s each).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from survey_utils.architecture import total_params  # noqa: E402
from survey_utils.errors import SurveyError  # noqa: E402
from survey_utils.memory.allocator import (  # noqa: E402
    DERIVATION_MIN_PARAMS,
    TRANSIENT_OVERHEAD,
    TRANSIENT_OVERHEAD_CHECKPOINTED,
    cached_rounding,
    persistent_tensors,
    reserved_of,
)
from survey_utils.memory.closed_form import estimate  # noqa: E402
from survey_utils.methods import get_method  # noqa: E402
from survey_utils.zoo import DATA_DIR, load_config  # noqa: E402

OUT = DATA_DIR / "reserved_validation.csv"
PUBLISHED = DATA_DIR / "published_peaks.csv"
FIGURE = "reserved_validation"
SHAPES = [("tiny-llama", 1, 512), ("tiny-llama", 8, 256), ("tiny-gpt2", 2, 256), ("tiny-bert", 2, 256),
          ("tiny-t5", 2, 128), ("gpt2", 1, 512), ("opt-350m", 2, 512), ("bloom-560m", 1, 512),
          ("qwen2.5-0.5b", 2, 1024), ("llama-2-7b", 1, 512)]
COLUMNS = ["model", "total_params", "method", "batch_size", "seq_len", "gradient_checkpointing", "simulated_allocated",
           "replayed_allocated", "replayed_reserved", "replayed_reserved_expandable", "persistent_bytes",
           "persistent_rounding", "transient_peak", "transient_overhead", "closed_form_reserved",
           "closed_form_error", "command"]


def replay_grid(models: set[str] | None) -> list[dict]:
    from survey_utils.memory.simulation import simulate

    rows = []
    for model, batch, seq in SHAPES:
        if models and model not in models:
            continue
        for method in ("full", "lora"):
            for ckpt in (False, True):
                kwargs = dict(batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt)
                try:
                    est = estimate(model, method, device="cpu", **kwargs)
                    sim = simulate(model, method, **kwargs)
                except SurveyError as error:
                    print(f"skip {model} {method}: {error}", file=sys.stderr)
                    continue
                m = get_method(method)
                persistent = est.weights + est.optimizer_states + est.master_weights
                rounding = cached_rounding(persistent_tensors(load_config(model), m, est, m.trains_whole_model))
                transient = sim.peak - persistent
                overhead = (sim.reserved - sim.peak - rounding) / transient
                closed, _ = reserved_of(load_config(model), m, est)
                rows.append(dict(
                    model=model, total_params=total_params(load_config(model)),
                    method=method, batch_size=batch, seq_len=seq, gradient_checkpointing=ckpt,
                    simulated_allocated=sim.peak, replayed_allocated=sim.allocated_rounded,
                    replayed_reserved=sim.reserved, replayed_reserved_expandable=sim.reserved_expandable,
                    persistent_bytes=persistent, persistent_rounding=rounding, transient_peak=transient,
                    transient_overhead=f"{overhead:.5f}", closed_form_reserved=closed,
                    closed_form_error=f"{(closed - sim.reserved) / sim.reserved:.5f}",
                    command=(f"python -m survey_utils memory --model {model} --method {method} --batch-size {batch} "
                             f"--seq-len {seq}{' --gradient-checkpointing' if ckpt else ''} --device cpu --simulate "
                             "--json")))
                print(f"{model:<14} {method:<5} b{batch:<2} s{seq:<5} ckpt={int(ckpt)}  allocated "
                      f"{sim.peak / 2**20:10.1f} MiB  reserved {sim.reserved / 2**20:10.1f} MiB "
                      f"(+{100 * (sim.reserved - sim.peak) / sim.peak:5.2f}%)  expandable "
                      f"{sim.reserved_expandable / 2**20:10.1f} MiB  transient overhead {100 * overhead:6.2f}%  "
                      f"closed form {100 * float(rows[-1]['closed_form_error']):+6.2f}%", flush=True)
    return rows


def derive(rows: list[dict]) -> dict[bool, float]:
    """The closed form's two constants from the grid: the largest transient overhead without and with
    checkpointing over models of at least DERIVATION_MIN_PARAMS parameters, rounded up to a percent."""
    out = {}
    for ckpt in (False, True):
        values = [float(r["transient_overhead"]) for r in rows
                  if str(r["gradient_checkpointing"]) == str(ckpt) and int(r["total_params"]) >= DERIVATION_MIN_PARAMS]
        out[ckpt] = math.ceil(100 * max(values)) / 100 if values else float("nan")
    return out


def published_rows() -> list[dict]:
    """Each published figure beside our prediction of the same kind (survey_utils.memory.reserved_figure)."""
    from survey_utils.memory.reserved_figure import published_rows as rows

    return rows(PUBLISHED)


def draw(rows: list[dict], published: list[dict], figures: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    from survey_utils.memory.reserved_figure import draw_reserved
    from survey_utils.plotting import save_figure

    with plt.rc_context({"svg.fonttype": "path"}):
        fig = draw_reserved(rows, published)
        paths = save_figure(fig, figures, FIGURE, dpi=110)
        plt.close(fig)
    return paths


def figure_only(figures: Path) -> list[Path]:
    """Redraw the figure from the committed CSV (no simulation)."""
    with OUT.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return draw(rows, published_rows(), figures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--figures", default=str(ROOT / "figures"))
    parser.add_argument("--only-models", default=None)
    parser.add_argument("--figure-only", action="store_true", help="redraw the figure from the committed CSV")
    args = parser.parse_args()
    if args.figure_only:
        print(", ".join(str(p) for p in figure_only(Path(args.figures))))
        return 0
    models = set(args.only_models.split(",")) if args.only_models else None
    start = time.perf_counter()
    rows = replay_grid(models)
    derived = derive(rows)
    overheads = [float(r["transient_overhead"]) for r in rows]
    print(f"\n{len(rows)} settings in {time.perf_counter() - start:.0f} s")
    print(f"reserved above allocated (replay): median "
          f"{100 * statistics.median((r['replayed_reserved'] - r['simulated_allocated']) / r['simulated_allocated'] for r in rows):.2f}%"
          f", worst {100 * max((r['replayed_reserved'] - r['simulated_allocated']) / r['simulated_allocated'] for r in rows):.2f}%")
    print(f"transient overhead: median {100 * statistics.median(overheads):.2f}%, max {100 * max(overheads):.2f}%; "
          f"derived (models >= {DERIVATION_MIN_PARAMS:,} parameters): without checkpointing {derived[False]:.2f} "
          f"(allocator.py has {TRANSIENT_OVERHEAD:.2f}), with {derived[True]:.2f} (allocator.py has "
          f"{TRANSIENT_OVERHEAD_CHECKPOINTED:.2f})")
    errors = [abs(float(r["closed_form_error"])) for r in rows]
    print(f"closed form vs replay: median {100 * statistics.median(errors):.2f}%, worst {100 * max(errors):.2f}%")
    published = published_rows()
    complete = [r for r in published if r["settings_complete"] == "yes"]
    for source in sorted({r["source_short"] for r in published}):
        chosen = [abs(r["error"]) for r in published if r["source_short"] == source]
        print(f"published, {source}: {len(chosen)} rows, median {100 * statistics.median(chosen):.1f}%, "
              f"worst {100 * max(chosen):.1f}% (settings complete in "
              f"{sum(r['settings_complete'] == 'yes' for r in published if r['source_short'] == source)})")
    if complete:
        errs = [abs(r["error"]) for r in complete]
        print(f"published, settings complete: median {100 * statistics.median(errs):.1f}%, worst {100 * max(errs):.1f}%")
    if models:
        print("(filtered run: nothing written)")
        return 0
    out = Path(args.out)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    paths = draw(rows, published, Path(args.figures))
    print(f"wrote {out} and {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
