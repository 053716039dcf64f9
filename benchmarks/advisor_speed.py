"""Speed of the advisor: ``advise`` from a cold start for every zoo model, and the feasibility map's updates.

Goals (issue 16): ``python -m survey_utils advise --model M --gpu-memory 80GB`` answers for every zoo model in
under 1 s from a cold start (a fresh interpreter), importing neither torch nor transformers; the feasibility
widget's update (``compute``: categories and the picked cell's breakdown, the closed form only) under 30 ms.

    python benchmarks/advisor_speed.py [--models gpt2,llama-65b] [--gpus 8] [--skip-widget]

Each command runs once to warm the disk cache, then is timed once (wall and CPU time of the child); the
widget's ``compute`` is timed as the median of 20 calls per kind of change.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_COLD_S = 1.0
GOAL_UPDATE_MS = 30.0
PROBE = ("import runpy, sys, json, atexit\n"
         "atexit.register(lambda: print(json.dumps(sorted(m for m in ('torch', 'transformers', 'peft') "
         "if m in sys.modules)), file=sys.stderr))\n"
         "sys.argv = ['survey_utils', *sys.argv[1:]]\n"
         "runpy.run_module('survey_utils', run_name='__main__', alter_sys=True)\n")


def cold(args: list[str]) -> tuple[float, float, list[str], int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    heavy = json.loads(done.stderr.strip().splitlines()[-1]) if done.stderr.strip() else []
    return wall, cpu, heavy, done.returncode


def widget_updates() -> None:
    from survey_utils.widgets.advisor import FeasibilityTable

    start = time.perf_counter()
    table = FeasibilityTable()
    print(f"\nfeasibility table ({len(table.models)} models x {len(table.methods)} methods): built in "
          f"{time.perf_counter() - start:.1f} s (estimates, and the sharded totals for 2, 4, 8 GPUs)")
    capacities = [24 * 2**30, 48 * 2**30, 80 * 2**30, 141 * 2**30]

    def timed(fn) -> float:
        times = []
        for i in range(20):
            t = time.perf_counter()
            fn(i)
            times.append(1000 * (time.perf_counter() - t))
        return statistics.median(times)

    gpu_type = timed(lambda i: (table.categories(capacities[i % 4], 8), table.breakdown(8, 0, capacities[i % 4], 8)))
    counts = timed(lambda i: (table.categories(80 * 2**30, (2, 4, 8)[i % 3]), table.breakdown(8, 0, 80 * 2**30, 8)))
    t = time.perf_counter()
    table.categories(80 * 2**30, 16)
    uncached = 1000 * (time.perf_counter() - t)
    for label, ms in (("GPU type changed", gpu_type), ("GPU count 2/4/8", counts),
                      ("GPU count 16, first time", uncached)):
        print(f"  update, {label:<26} {ms:8.2f} ms  {'ok' if ms < GOAL_UPDATE_MS else 'OVER the 30 ms goal'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--skip-widget", action="store_true")
    args = parser.parse_args()
    from survey_utils.zoo import list_models

    models = args.models.split(",") if args.models else list_models()
    print(f"advise --gpu-memory 80GB --gpus {args.gpus}, fresh interpreter per model (goal {GOAL_COLD_S:.0f} s)")
    walls = []
    for model in models:
        command = ["advise", "--model", model, "--gpu-memory", "80GB", "--gpus", str(args.gpus), "--json"]
        cold(command)  # warm the disk cache
        wall, cpu, heavy, rc = cold(command)
        walls.append(wall)
        print(f"  {model:<16} wall {wall:6.2f} s  cpu {cpu:6.2f} s  rc {rc}  heavy imports: {', '.join(heavy) or 'none'}"
              f"  {'ok' if wall < GOAL_COLD_S else 'OVER'}", flush=True)
    print(f"median {statistics.median(walls):.2f} s, worst {max(walls):.2f} s, "
          f"within {GOAL_COLD_S:.0f} s: {sum(w < GOAL_COLD_S for w in walls)} of {len(walls)}")
    if not args.skip_widget:
        widget_updates()
    return 0


if __name__ == "__main__":
    sys.exit(main())
