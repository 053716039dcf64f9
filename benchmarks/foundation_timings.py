"""Timings of the foundation: closed-form counts and a widget update (goals, not tests).

Run: .venv/bin/python benchmarks/foundation_timings.py
Goals (issues 2 and 3): the 405B closed form answers in milliseconds; a widget update under 30 ms.
"""

from __future__ import annotations

import io
import time
from contextlib import redirect_stdout

import matplotlib

matplotlib.use("Agg")

from _timing import median_ms  # noqa: E402

from survey_utils.counting import count  # noqa: E402
from survey_utils.widgets import MethodExplorer  # noqa: E402
from survey_utils.zoo import load_config  # noqa: E402


def main() -> None:
    config = load_config("llama-3.1-405b")
    print(f"count formula, llama-3.1-405b, lora r=8 q,v        : "
          f"{median_ms(lambda: count(config, 'lora', r=8, target_modules=['q_proj', 'v_proj'])):8.2f} ms (median of 20)")
    print(f"count formula, llama-3.1-405b, full                 : {median_ms(lambda: count(config, 'full')):8.2f} ms")
    start = time.perf_counter()
    count(config, "lora", "scratch", r=8)
    print(f"count scratch (meta build + apply), llama-3.1-405b  : {(time.perf_counter() - start) * 1e3:8.0f} ms (once)")
    start = time.perf_counter()
    count(config, "lora", "peft", r=8)
    print(f"count peft (meta build + get_peft_model), 405b      : {(time.perf_counter() - start) * 1e3:8.0f} ms (once)")
    # Off a kernel each update's display(fig) prints "Figure(1000x380)" (and clear_output an escape code):
    # the same calls are timed, with their stdout dropped.
    with redirect_stdout(io.StringIO()):
        explorer = MethodExplorer(["lora", "full"], model="llama-3.1-405b")
        ranks = iter([4, 8] * 50)
        ms_405b = median_ms(lambda: setattr(explorer.hp_controls['r'], 'value', next(ranks)))
        explorer.model_control.value = "llama-2-7b"
        ms_7b = median_ms(lambda: setattr(explorer.hp_controls['r'], 'value', next(ranks)))
    print(f"widget update (rank slider), llama-3.1-405b         : {ms_405b:8.2f} ms (median of 20)")
    print(f"widget update (rank slider), llama-2-7b             : {ms_7b:8.2f} ms (median of 20)")


if __name__ == "__main__":
    main()
