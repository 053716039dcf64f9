"""Counting an unseen 671B mixture-of-experts config: the first count, a repeat, and a widget update on it.

Goals (issue 12, item 6): the first count of an unseen 671B MoE config under 2 s, a repeat under 5 ms, a widget
update on it under 30 ms. "Unseen": the zoo's ``deepseek-v3`` config with one field changed (``--change``, default
``vocab_size=129536``), written to a temporary file, so that neither a stored snapshot (``survey_utils.snapshots``)
nor a cache answers and the layout is read from the model built on ``meta`` (``survey_utils.generic_layout``).

    python benchmarks/moe_count_speed.py [--change vocab_size=129536] [--repeats 50] [--moves 20]

Each measurement runs in a fresh interpreter (one untimed run of the command first warms the disk cache), wall and
CPU time:

1. ``cold``: ``python -m survey_utils count --model PATH --method lora --set target_modules=all-linear``, the whole
   command (interpreter start and every import included);
2. ``first count``: in a fresh interpreter, ``closed_form(PATH, "lora", target_modules="all-linear")``, the first
   call (it imports transformers and torch on the way: a config of a type without a hand layout needs them once
   per process, to build the model on ``meta``); then the same with those imported beforehand (what a kernel that
   already counted another model pays for a new config), the imports timed on their own, and which heavy modules
   the first count imported;
3. ``repeat``: the same call again in the same process, median of ``--repeats``;
4. ``widget``: chapter 04's parameter explorer (``MethodExplorer(["lora", "full"])``) on that config, on Agg: its
   rank slider moved ``--moves`` times; per move the update (``compute`` and the artists, as
   ``benchmarks/explorer_redraw.py`` times it) and the frame render, p50 and p95, with every linear name of its
   target boxes checked (the widget's nearest to all-linear).

The first line gives the machine's load (the numbers scale with it); the last line is the summary against the goals.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_FIRST_S, GOAL_REPEAT_MS, GOAL_WIDGET_MS = 2.0, 5.0, 30.0
LORA = {"target_modules": "all-linear"}

# Run in the child interpreter: argv[1] the config path, argv[2] "cold" or "warm", argv[3] repeats, argv[4] moves.
CHILD = r"""
import json, statistics, sys, time, warnings
warnings.filterwarnings("ignore")
path, mode, repeats, moves = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
out = {}
def clock():
    return time.perf_counter(), time.process_time()
def since(start):
    return time.perf_counter() - start[0], time.process_time() - start[1]
start = clock()
from survey_utils.counting import closed_form
out["import survey_utils"] = since(start)
if mode == "warm":
    start = clock()
    import torch, transformers  # noqa: F401
    from transformers.models.deepseek_v3 import modeling_deepseek_v3  # noqa: F401
    out["import torch, transformers"] = since(start)
start = clock()
first = closed_form(path, "lora", target_modules="all-linear")
out["first count"] = since(start)
out["count"] = [first.trainable, first.total, first.active]
out["imported"] = sorted(m for m in ("torch", "transformers", "peft", "bitsandbytes") if m in sys.modules)
times = []
for _ in range(repeats):
    t = time.perf_counter()
    closed_form(path, "lora", target_modules="all-linear")
    times.append(time.perf_counter() - t)
out["repeat"] = times
if mode == "cold" and moves:
    import matplotlib
    matplotlib.use("Agg")
    from survey_utils.widgets import MethodExplorer
    start = clock()
    explorer = MethodExplorer(["lora", "full"], models=[path], model=path)
    out["widget built"] = since(start)
    explorer._refresh = lambda: None  # the render is timed on its own below
    targets = explorer.hp_controls.get("target_modules")
    for box in getattr(targets, "boxes", []):  # every linear name checked: the widget's nearest to all-linear
        box.value = True
    out["widget targets"] = list(getattr(targets, "value", []))
    explorer.render_frame()
    slider = explorer.hp_controls["r"]
    values = [slider.value + (i % 2) * slider.step for i in range(1, moves + 1)]
    values += [max(slider.min, min(slider.max, v)) for v in range(2, 2 + 6 * moves, 6)][:moves]
    update, frame = [], []
    for value in values:
        t0 = time.perf_counter()
        slider.value = value
        t1 = time.perf_counter()
        explorer.render_frame()
        frame.append(time.perf_counter() - t1)
        update.append(t1 - t0)
    out["widget update"], out["widget frame"] = update, frame
    out["widget error"] = explorer.error
print("RESULT " + json.dumps(out))
"""


def child(args: list[str]) -> tuple[dict, float, float]:
    """Run CHILD (or the CLI, for ``cold``) in a fresh interpreter: its output, wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode:
        raise SystemExit(f"child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")), {})
    return result or {"stdout": done.stdout.strip()}, wall, cpu


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--change", default="vocab_size=129536", help="FIELD=VALUE (JSON) changed in deepseek-v3")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--moves", type=int, default=20)
    args = parser.parse_args(argv)
    field, _, value = args.change.partition("=")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; deepseek-v3 with {field}={value} "
          f"(a config no snapshot or cache holds); LoRA all-linear", flush=True)
    config = json.loads((ROOT / "data" / "models" / "deepseek-v3.json").read_text())
    if field not in config:
        raise SystemExit(f"deepseek-v3.json has no field '{field}'")
    config[field] = json.loads(value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "deepseek-v3-unseen.json"
        path.write_text(json.dumps(config, indent=2))
        cli = ["-m", "survey_utils", "count", "--model", str(path), "--method", "lora",
               "--set", "target_modules=all-linear", "--json"]
        child(cli)  # warm the disk cache (files only: every run is a new interpreter)
        out, cli_wall, cli_cpu = child(cli)
        print(f"cold command line (count --json)      wall {cli_wall:6.2f} s  cpu {cli_cpu:6.2f} s  -> "
              f"{out.get('stdout', out)}", flush=True)
        cold, _, _ = child(["-c", CHILD, str(path), "cold", str(args.repeats), str(args.moves)])
        warm, _, _ = child(["-c", CHILD, str(path), "warm", "3", "0"])
    trainable, total, active = cold["count"]
    print(f"counted: trainable {trainable:,}  total {total:,}  active per token {active:,}; the first count imported "
          f"{', '.join(cold['imported'])}")
    for label, result in (("fresh interpreter", cold), ("torch, transformers imported", warm)):
        for step in ("import survey_utils", "import torch, transformers", "first count"):
            if step in result:
                wall, cpu = result[step]
                print(f"{label + ': ' + step:<60} wall {wall:6.2f} s  cpu {cpu:6.2f} s", flush=True)
    repeat_ms = 1000 * statistics.median(cold["repeat"])
    print(f"repeat (same process), median of {len(cold['repeat'])}: {repeat_ms:.3f} ms")
    update = [1000 * t for t in cold.get("widget update", [])]
    frame = [1000 * t for t in cold.get("widget frame", [])]
    if update:
        wall, cpu = cold["widget built"]
        print(f"widget built (MethodExplorer lora/full): wall {wall:.2f} s; {len(update)} rank-slider moves: "
              f"update p50 {statistics.median(update):.1f} ms p95 {_p(update, 0.95):.1f} ms | frame render p50 "
              f"{statistics.median(frame):.1f} ms p95 {_p(frame, 0.95):.1f} ms; targets {', '.join(cold['widget targets'])}"
              + (f" | widget message: {cold['widget error']}" if cold.get("widget error") else ""))
    first_cold, first_warm = cold["first count"][0], warm["first count"][0]
    widget = statistics.median(update) if update else float("nan")

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(f"summary (load {os.getloadavg()[0]:.2f}): first count {first_cold:.2f} s in a fresh interpreter "
          f"({verdict(first_cold < GOAL_FIRST_S)}), {first_warm:.2f} s with torch and transformers imported "
          f"({verdict(first_warm < GOAL_FIRST_S)}), cold CLI {cli_wall:.2f} s; goal {GOAL_FIRST_S:g} s | repeat "
          f"{repeat_ms:.2f} ms ({verdict(repeat_ms < GOAL_REPEAT_MS)}, goal {GOAL_REPEAT_MS:g} ms) | widget update "
          f"p50 {widget:.1f} ms ({verdict(widget < GOAL_WIDGET_MS)}, goal {GOAL_WIDGET_MS:g} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
