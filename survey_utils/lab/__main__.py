"""``python -m survey_utils.lab``: make the lab's results, or check that one committed row reproduces.

- ``results [--workers N] [--out DIR]``: pretrain the sizes (cached) and run the whole grid into ``data/lab``;
- ``smoke [--out DIR]``: the same pipeline on a few-second plan (what CI runs);
- ``check``: rerun one committed grid cell and compare its row bit for bit (what ``make figures`` runs).
Bad input is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from survey_utils.errors import SurveyError

DATA = Path(__file__).resolve().parents[2] / "data" / "lab"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m survey_utils.lab", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("results", "smoke", "check"))
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one thread each (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSVs (default data/lab)")
    args = parser.parse_args(argv)
    from survey_utils.lab import grid

    try:
        if args.workers < 1:
            raise SurveyError(f"--workers {args.workers}: need at least 1")
        if args.action == "check":
            committed, new = grid.reproduce_row(args.out or DATA)
            differing = {k: (committed.get(k), v) for k, v in new.items() if committed.get(k) != v}
            if differing:
                print(f"lab check FAILED: {new['size']} {new['method']} {new['task']} differs from the committed "
                      f"row: {differing}", file=sys.stderr)
                return 1
            print(f"lab check: {new['size']} {new['method']} {new['task']} reproduces its committed row bit for "
                  f"bit (test accuracy {new['test_accuracy']})", file=sys.stderr)
            return 0
        plan = grid.full_plan() if args.action == "results" else grid.smoke_plan()
        out = args.out or (DATA if args.action == "results" else Path("_build") / "lab-smoke")
        for path in grid.write(grid.run_grid(plan, args.workers), out):
            print(f"wrote {path}", file=sys.stderr)
        return 0
    except SurveyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
