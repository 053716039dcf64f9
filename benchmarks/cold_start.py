"""Cold start of the command line: wall time of a fresh ``python -m survey_utils ...``, and what it imported.

Run: .venv/bin/python benchmarks/cold_start.py [--runs 5] [--rev GIT_REV | --tree DIR] [--only LABEL ...] [--zoo]
Goal (issue 11, item 7, "cold start"): ``count`` and ``memory`` on the closed form, ``models``, ``methods`` and
every one-line error answer in under 1 s from a cold start; torch, transformers and peft are imported only
by the commands that build models (``--implementation scratch|peft``, ``--simulate``, ``figures``,
``build-notebooks``). Issue 16: ``advise`` under 1 s cold for every zoo model (``--zoo`` times each).

Each command runs in a new interpreter (``runpy`` of ``survey_utils.__main__``, as ``python -m`` does) once to
warm the disk cache, then ``--runs`` times; the median, minimum and maximum wall times are printed with the
heavy modules (torch, transformers, peft) found in ``sys.modules`` when the interpreter exits, and the median
CPU time (user + system), which a machine busy with other work inflates far less than the wall time. ``--rev``
runs the same commands on another commit's ``survey_utils/`` and ``data/`` (``git archive``), for a before/after;
``--tree`` on a folder holding its own ``survey_utils/`` and ``data/`` (an experiment not yet committed).
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
HEAVY = ("torch", "transformers", "peft")
GOAL_S = 1.0

# Runs the CLI exactly as `python -m survey_utils` does, then writes the heavy modules it imported.
WRAPPER = f"""
import atexit, json, os, runpy, sys
def _report():
    with open(os.environ["COLD_START_REPORT"], "w") as handle:
        json.dump(sorted(m for m in {HEAVY!r} if m in sys.modules), handle)
atexit.register(_report)
sys.argv = ["survey_utils", *sys.argv[1:]]
runpy.run_module("survey_utils", run_name="__main__", alter_sys=True)
"""

# (label, arguments, whether the 1 s goal applies). Model-building commands are listed for reference.
COMMANDS: list[tuple[str, list[str], bool]] = [
    ("models", ["models"], True),
    ("methods", ["methods"], True),
    ("count (closed form)", ["count", "--model", "llama-2-7b", "--method", "lora", "--set", "r=8"], True),
    ("memory (closed form)", ["memory", "--model", "llama-2-7b", "--method", "lora"], True),
    ("error: unknown model", ["count", "--model", "llama-9b", "--method", "lora"], True),
    ("error: unknown method", ["count", "--model", "gpt2", "--method", "nope"], True),
    ("error: corrupt config", ["count", "--model", "{corrupt}", "--method", "lora"], True),
    ("error: bad hyper-parameter", ["memory", "--model", "tiny-llama", "--method", "lora", "--set", "r=0"], True),
    ("error: usage", ["count"], True),
    ("advise (hand layout)", ["advise", "--model", "llama-65b", "--gpu-memory", "48GB"], True),
    ("advise x8 (hand layout)", ["advise", "--model", "llama-3-70b", "--gpu-memory", "80GB", "--gpus", "8"], True),
    ("advise (generic layout)", ["advise", "--model", "pythia-1b", "--gpu-memory", "48GB"], True),
    ("count --implementation scratch", ["count", "--model", "llama-2-7b", "--method", "lora",
                                        "--implementation", "scratch"], False),
]


def zoo_advise_commands() -> list[tuple[str, list[str], bool]]:
    """``advise`` on one 48 GB GPU for every zoo model (issue 16: under 1 s cold for each), for ``--zoo``."""
    from survey_utils.zoo import list_models

    return [(f"advise {name}", ["advise", "--model", name, "--gpu-memory", "48GB"], True) for name in list_models()]


def run_once(tree: Path, argv: list[str]) -> tuple[float, float, int, list[str]]:
    """Wall and CPU (user + system) seconds of one fresh interpreter running the CLI in ``tree``, its exit
    code and its heavy imports. CPU time is what a busy machine inflates least."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "heavy.json"
        env = {**os.environ, "COLD_START_REPORT": str(report)}
        env.pop("PYTHONPATH", None)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", WRAPPER, *argv], cwd=tree, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        heavy = json.loads(report.read_text()) if report.is_file() else ["(no report)"]
    return wall, cpu, done.returncode, heavy


def snapshot(rev: str, into: Path) -> Path:
    """``survey_utils/`` and ``data/`` of commit ``rev``, extracted into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "survey_utils", "data"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed cold runs per command (after one warm-up)")
    parser.add_argument("--rev", default=None, help="measure this commit's survey_utils/ and data/ instead")
    parser.add_argument("--tree", default=None, help="measure the survey_utils/ and data/ in this folder instead")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL", help="commands whose label starts so")
    parser.add_argument("--zoo", action="store_true", help="also `advise` every zoo model (issue 16's goal)")
    args = parser.parse_args()
    commands = COMMANDS + (zoo_advise_commands() if args.zoo else [])

    with tempfile.TemporaryDirectory() as tmp:
        tree = snapshot(args.rev, Path(tmp)) if args.rev else Path(args.tree).resolve() if args.tree else ROOT
        corrupt = Path(tmp) / "corrupt.json"
        corrupt.write_text('{"model_type": "llama", ')
        revision = args.rev or ("folder" if args.tree else "working tree")
        print(f"cold start of `python -m survey_utils`, {revision} ({tree}); python {sys.version.split()[0]}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median of {args.runs} runs after "
              f"one warm-up; goal < {GOAL_S:g} s")
        print(f"{'command':<32} {'wall median':>11} {'min':>6} {'max':>6} {'cpu median':>10} {'exit':>4}  "
              f"{'goal':<7} heavy modules imported")
        for label, argv, goal in commands:
            if args.only and not any(label.startswith(o) for o in args.only):
                continue
            argv = [a.format(corrupt=corrupt) for a in argv]
            run_once(tree, argv)  # warm-up: the disk cache, not the interpreter
            samples = [run_once(tree, argv) for _ in range(args.runs)]
            walls = [w for w, _, _, _ in samples]
            median = statistics.median(walls)
            cpu = statistics.median(c for _, c, _, _ in samples)
            codes = "/".join(map(str, sorted({code for _, _, code, _ in samples})))
            heavy = ", ".join(sorted({m for *_, h in samples for m in h})) or "none"
            verdict = ("met" if median < GOAL_S else "MISSED") if goal else "n/a"
            print(f"{label:<32} {median:>9.2f} s {min(walls):>6.2f} {max(walls):>6.2f} {cpu:>8.2f} s {codes:>4}  "
                  f"{verdict:<7} {heavy}", flush=True)


if __name__ == "__main__":
    main()
