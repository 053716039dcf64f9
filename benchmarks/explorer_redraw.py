"""Where a slider's redraw goes, kernel side, per explorer: compute + artists, a full render, a reused frame.

For each chapter's explorer (00 to 09; chapter 06 has two) this moves its main slider ``--moves`` times (alternately up
and down by one step, as the browser benchmark does, then across its range) and times, per move:

- ``update``: the callback's compute and artist updates (``Explorer.update`` without sending the frame);
- ``full``: a full Agg render of the figure plus the PNG diff ipympl sends, at matplotlib's zlib level 6 (what
  every move cost before issue 19's changes; a move that changes the frame, e.g. an axis limit, still renders
  in full);
- ``frame``: what a move costs now (``Explorer.render_frame``: the cached frame restored and the dynamic
  artists drawn, or a full render when the frame changed) plus the PNG diff at ``FRAME_PNG_LEVEL``;
- ``png 6 -> 1``: that PNG diff's encoding alone, at matplotlib's level and at ours;

and prints p50 / p95 of each, and how many moves reused the frame. It runs on Agg, without a browser: the
browser's share (message round trips, PNG decode, canvas paint) is in ``benchmarks/browser_latency.py``. The
first line says how loaded the machine was (the numbers scale with it).

    python benchmarks/explorer_redraw.py [--moves 20] [03 07 ...]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402  (after the backend is chosen)
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from PIL import Image  # noqa: E402

from survey_utils.widgets.base import FRAME_PNG_LEVEL  # noqa: E402

MATPLOTLIB_PNG_LEVEL = 6  # PIL's default zlib level, which matplotlib's web canvas encodes at


def _explorers() -> dict[str, Callable[[], tuple[object, object, list[int]]]]:
    from survey_utils.widgets import MethodExplorer
    from survey_utils.widgets.budget import EqualBudgetExplorer
    from survey_utils.widgets.memory import MemoryExplorer
    from survey_utils.widgets.prompts import PromptLengthExplorer

    def memory():
        e = MemoryExplorer(model="llama-2-7b", method="lora")
        return e, e.controls["seq_len"], [16 * v for v in range(2, 512, 20)]

    def params():
        e = MethodExplorer(["lora", "full"], model="llama-2-7b")
        return e, e.hp_controls["r"], list(range(1, 129, 5))

    def budget():
        e = EqualBudgetExplorer(["houlsby", "compacter", "lst", "lora"], model="roberta-base", reference="lora",
                                sweep="bottleneck_size", method="compacter")
        return e, e.hp_controls["bottleneck_size"], list(range(8, 768, 30))

    def prompts():
        e = PromptLengthExplorer(model="llama-2-7b")
        return e, e.controls["num_virtual_tokens"], list(range(1, 400, 16))

    def density():
        from survey_utils.widgets.density import DensityExplorer

        e = DensityExplorer(model="roberta-base", top_k=3)
        return e, e.controls["top_k"], list(range(1, 97, 4))

    def design_search():
        from survey_utils.widgets.design_search import DesignSearchExplorer

        e = DesignSearchExplorer(["roberta-base", "t5-large", "llama-2-7b", "tiny-llama"], model="roberta-base")
        return e, e.controls["trainable"], [float(10 ** (v / 20)) for v in range(-60, 21, 4)]

    def quantization():
        from survey_utils.widgets.quantization import QuantizationExplorer

        e = QuantizationExplorer()
        sizes = list(e.controls["blocksize"].options)  # a dropdown of the sizes every weight accepts
        return e, e.controls["blocksize"], [*sizes, *reversed(sizes)]

    def qlora():
        from survey_utils.widgets.quantization import QLoRAMemoryExplorer

        e = QLoRAMemoryExplorer(["llama-65b", "llama-2-70b", "llama-2-13b", "llama-2-7b", "qwen2.5-0.5b", "tiny-llama"])
        return e, e.controls["r"], list(range(1, 257, 12))

    def comparison():
        from survey_utils.figures.explorer import ComparisonExplorer

        e = ComparisonExplorer(model="roberta-base")
        return e, e.controls["batch_size"], list(range(1, 65, 3))

    def task_scaling():
        from survey_utils.widgets.task_scaling import TaskScalingExplorer

        e = TaskScalingExplorer(model="llama-2-7b", method="mpt", reference="lora")
        return e, e.controls["tasks"], list(range(1, 65, 3))

    def lab():
        from survey_utils.experiments import ch09_lab
        from survey_utils.widgets.lab import LabExplorer

        e = LabExplorer(ch09_lab.load(), task="sentiment")
        sizes = list(e.controls["size"].options)
        return e, e.controls["size"], [*sizes, *reversed(sizes)] * 4

    return {"00 memory (seq len)": memory, "04 params (r)": params, "01 budget (bottleneck_size)": budget,
            "02 prompts (virtual tokens)": prompts, "03 density (top_k)": density,
            "05 design search (params %)": design_search, "06 quantization (block size)": quantization,
            "06 QLoRA memory (rank r)": qlora, "07 comparison (batch)": comparison,
            "08 task scaling (tasks T)": task_scaling, "09 lab (model size)": lab}


class _Png:
    """ipympl's diff PNG (webagg's get_diff_image): changed pixels against the last frame sent, at zlib ``level``."""

    def __init__(self, level: int) -> None:
        self.last = None
        self.level = level
        self.seconds: list[float] = []  # the encoding alone, per frame

    def __call__(self, canvas: FigureCanvasAgg) -> int:
        buff = np.asarray(canvas.get_renderer().buffer_rgba()).view(np.uint32).squeeze(2)
        output = buff if self.last is None or self.last.shape != buff.shape else np.where(buff != self.last, buff, 0)
        self.last = buff.copy()
        start = time.perf_counter()
        with io.BytesIO() as png:
            Image.fromarray(output.view(np.uint8).reshape((*output.shape, 4))).save(png, format="png",
                                                                                   compress_level=self.level)
            self.seconds.append(time.perf_counter() - start)
            return len(png.getvalue())


def _ms(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"p50 {1000 * statistics.median(values):6.1f}  p95 {1000 * p95:6.1f}"


def _nudges(slider: object, moves: int) -> list[object]:
    """One step up, back down, up, ... as a keyboard's arrow keys move the slider."""
    import ipywidgets as W

    start = slider.value
    if isinstance(slider, W.SelectionSlider | W.Dropdown):
        options = list(slider.options)
        i = options.index(start)
        up = options[i + 1] if i + 1 < len(options) else options[i - 1]
    elif isinstance(slider, W.FloatLogSlider):
        up = start * slider.base ** slider.step
    else:
        up = start + slider.step
    return [up if i % 2 == 0 else start for i in range(moves)]


def measure(make: Callable[[], tuple[object, object, list[int]]], moves: int) -> dict[str, list[float] | int]:
    explorer, slider, sweep = make()
    explorer._refresh = lambda: None  # time the render separately
    canvas = explorer.fig.canvas
    explorer.render_frame()
    values = _nudges(slider, moves) + sweep[:moves]
    times: dict[str, list[float]] = {"update": [], "full": [], "frame": []}
    blits, png_full, png_frame, png_old = 0, _Png(MATPLOTLIB_PNG_LEVEL), _Png(FRAME_PNG_LEVEL), _Png(MATPLOTLIB_PNG_LEVEL)
    for value in values:
        t0 = time.perf_counter()
        slider.value = value
        t1 = time.perf_counter()
        FigureCanvasAgg.draw(canvas)  # the old path: every artist, every tick label, every legend
        png_full(canvas)
        t2 = time.perf_counter()
        blits += explorer.render_frame()  # the new path (its cache follows the moves as in a session)
        png_frame(canvas)
        t3 = time.perf_counter()
        png_old(canvas)
        times["update"].append(t1 - t0)
        times["full"].append(t2 - t1)
        times["frame"].append(t3 - t2)
    return {**times, "png matplotlib": png_old.seconds, "png ours": png_frame.seconds, "blits": blits,
            "moves": len(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="chapter numbers (default: all), e.g. 03 07")
    parser.add_argument("--moves", type=int, default=20)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.moves} steps up/down, then "
          f"{args.moves} across the range; milliseconds per move")
    for name, make in _explorers().items():
        if args.chapters and name[:2] not in args.chapters:
            continue
        result = measure(make, args.moves)
        print(f"{name:<30} update {_ms(result['update'])} | full render {_ms(result['full'])} | "
              f"frame reused or rendered {_ms(result['frame'])} | reused {result['blits']}/{result['moves']} | "
              f"png level {MATPLOTLIB_PNG_LEVEL} {_ms(result['png matplotlib'])} -> level {FRAME_PNG_LEVEL} "
              f"{_ms(result['png ours'])}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
