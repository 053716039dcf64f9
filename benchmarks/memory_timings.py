"""Timing goals of the memory model: estimate for a 405B model (< 5 ms), a simulated 7B LoRA step (< 30 s),
and a memory-widget update (< 30 ms).

    python benchmarks/memory_timings.py
"""

from __future__ import annotations

import io
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import median_ms  # noqa: E402

from survey_utils.memory import estimate, simulate  # noqa: E402
from survey_utils.zoo import load_config  # noqa: E402

if __name__ == "__main__":
    config = load_config("llama-3.1-405b")
    estimate(config, "lora")  # warm the layout cache, as a widget session would
    for method in ("full", "lora"):
        ms = median_ms(lambda m=method: estimate(config, m, batch_size=4, seq_len=4096), 50)
        print(f"estimate llama-3.1-405b {method:<5} median {ms:7.2f} ms  (goal < 5 ms)  "
              f"{'ok' if ms < 5 else 'MISS'}")
    start = time.perf_counter()
    result = simulate("llama-2-7b", "lora", batch_size=1, seq_len=512)
    seconds = time.perf_counter() - start
    print(f"simulated llama-2-7b LoRA step (2 steps, fake tensors) {seconds:6.2f} s  (goal < 30 s)  "
          f"{'ok' if seconds < 30 else 'MISS'}  peak {result.peak / 2**30:.2f} GiB")
    try:
        from survey_utils.widgets.memory import MemoryExplorer
    except ImportError as error:
        print(f"widget timing skipped: {error}")
    else:
        # Off a kernel each update's display(fig) prints "Figure(1050x400)" (and clear_output an escape
        # code): the same calls are timed, with their stdout dropped.
        with redirect_stdout(io.StringIO()):
            explorer = MemoryExplorer()
            ms = median_ms(explorer.update, 20)
        print(f"memory widget update median {ms:7.2f} ms  (goal < 30 ms)  {'ok' if ms < 30 else 'MISS'}")
