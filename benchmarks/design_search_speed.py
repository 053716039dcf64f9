"""Chapter 05's budgeted design search: candidates scored per second, from the closed forms only.

Run: ``.venv/bin/python benchmarks/design_search_speed.py``. Prints, per model, the candidates scored, the
time of the first search (which scores each part's atoms once) and the median of later searches (atoms cached).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import median_ms  # noqa: E402

from survey_utils.experiments.ch05_hybrid import DesignSpace, search  # noqa: E402

MODELS = ("roberta-base", "t5-large", "llama-2-7b")


def main() -> None:
    print("python benchmarks/design_search_speed.py  (batch 8 x 128 tokens, bf16, AdamW)")
    for model in MODELS:
        began = time.perf_counter()
        space = DesignSpace(model)
        first = search(model, 10**15, 2**62, space=space)
        cold = time.perf_counter() - began
        warm = median_ms(lambda model=model, space=space: search(model, 10**15, 2**62, space=space), repeats=10)
        print(f"{model:14s} {first.evaluated} candidates, front {len(first.front)}: first search {cold:.2f} s "
              f"({first.evaluated / cold:,.0f}/s incl. atoms), then {warm:.1f} ms "
              f"({first.evaluated / warm * 1e3:,.0f} candidates/s)")


if __name__ == "__main__":
    main()
