"""Every explorer's plotted data, read back from its artists, equals an independent computation (issue 19)."""

from __future__ import annotations

import threading

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from survey_utils.figures.explorer import ComparisonExplorer
from survey_utils.widgets import MethodExplorer
from survey_utils.widgets.base import WORKER_THREAD
from survey_utils.widgets.budget import EqualBudgetExplorer
from survey_utils.widgets.memory import MemoryExplorer
from survey_utils.widgets.prompts import PromptLengthExplorer
from tests.widgets.plot_truth import (
    GIB,
    assert_legend_outside,
    check_budget,
    check_comparison,
    check_frame,
    check_memory,
    check_params,
    check_prompts,
)

pytestmark = pytest.mark.filterwarnings("ignore")


def test_memory_explorer_lines_are_what_their_labels_say() -> None:
    explorer = MemoryExplorer(model="llama-2-7b", method="full")
    explorer.controls["gradient_checkpointing"].value = True
    check_memory(explorer)
    growing = explorer.lines["growing"].get_ydata()
    assert growing[-1] > 10 * growing[0], "activations + logits grow with s (the issue's line was flat)"
    for method in ("lora", "lst", "full"):
        explorer.controls["method"].value = method
        explorer.controls["gradient_checkpointing"].value = method != "lst"
        check_memory(explorer)
    for control in (explorer.ax_bar, explorer.ax_seq):
        assert_legend_outside(control)


def test_memory_explorer_simulation_column_only_when_asked() -> None:
    explorer = MemoryExplorer(model="tiny-llama", method="lora", background=False)
    explorer.controls["seq_len"].value = 128
    check_memory(explorer)
    explorer.controls["simulate"].value = True
    assert explorer.view.simulated is not None
    check_memory(explorer)
    sim_top = sum(b.patches[1].get_height() for b in explorer.bars.values())
    assert abs(sim_top - explorer.view.simulated["_peak"] / GIB) / sim_top < 0.01


def test_memory_explorer_simulates_in_the_background_with_progress() -> None:
    explorer = MemoryExplorer(model="tiny-llama", method="lora")
    explorer.controls["seq_len"].value = 64
    explorer.controls["simulate"].value = True
    assert explorer.view.sim_pending and "simulating" in explorer.message.value
    explorer.controls["batch_size"].value = 2  # other controls stay live while it runs
    explorer.wait()
    assert explorer.view.simulated is not None and "simulating" not in explorer.message.value
    check_memory(explorer)


def test_rank_is_disabled_with_a_reason_for_methods_without_r() -> None:
    explorer = MemoryExplorer(model="gpt2", method="houlsby")
    assert explorer.controls["rank"].disabled and "no rank" in explorer.controls["rank"].tooltip
    explorer.controls["method"].value = "lora"
    assert not explorer.controls["rank"].disabled


@pytest.mark.parametrize("method", ["lora", "full", "vera", "ia3", "adalora"])
def test_method_explorer_sweep_and_bars(method: str) -> None:
    explorer = MethodExplorer(["lora", "full", "vera", "ia3", "adalora", "llama_adapter"], model="gpt2",
                              method=method)
    check_params(explorer)


def test_seeds_are_integer_boxes_not_sliders() -> None:
    import ipywidgets as W

    explorer = MethodExplorer(["vera"], model="llama-2-7b")
    assert isinstance(explorer.hp_controls["projection_prng_key"], W.BoundedIntText)
    assert isinstance(explorer.hp_controls["r"], W.IntSlider)


def test_compacter_sweeps_the_bottleneck_the_prose_names() -> None:
    explorer = EqualBudgetExplorer(["houlsby", "compacter", "lst", "lora"], model="roberta-base",
                                   reference="lora", sweep="bottleneck_size", method="compacter")
    assert explorer.view.sweep_name == "bottleneck_size"
    ys = explorer.sweep_line.get_ydata()
    assert max(ys) > 2 * min(ys), "not a flat line"
    check_budget(explorer)
    explorer.method_control.value = "lst"  # no bottleneck_size: its own first size
    check_budget(explorer)


def test_prompt_explorer_lines() -> None:
    explorer = PromptLengthExplorer(model="gpt2")
    check_prompts(explorer)
    explorer.controls["num_virtual_tokens"].value = 77
    check_prompts(explorer)


def test_comparison_explorer_blank_panel_says_why() -> None:
    explorer = ComparisonExplorer(model="gpt2")
    check_comparison(explorer)
    explorer.controls["seq_len"].value = 2048
    check_comparison(explorer)
    assert "exceeds the context" in explorer.mem_note.get_text()
    assert "Notes" in explorer.table.value and "(see note)" not in explorer.table.value


# --- cheap redraws (issue 19's latency): the frame is reused only when it is unchanged ---------------------
def _memory() -> tuple[MemoryExplorer, object, list[int]]:
    explorer = MemoryExplorer(model="llama-2-7b", method="lora")
    return explorer, explorer.controls["seq_len"], [528, 544, 512, 4096, 4112]


def _params() -> tuple[MethodExplorer, object, list[int]]:
    explorer = MethodExplorer(["lora", "full"], model="llama-2-7b")
    return explorer, explorer.hp_controls["r"], [9, 10, 11, 256]


def _budget() -> tuple[EqualBudgetExplorer, object, list[int]]:
    explorer = EqualBudgetExplorer(["houlsby", "compacter", "lst", "lora"], model="roberta-base",
                                   reference="lora", sweep="bottleneck_size", method="compacter")
    return explorer, explorer.hp_controls["bottleneck_size"], [65, 66, 64, 8]


def _prompts() -> tuple[PromptLengthExplorer, object, list[int]]:
    explorer = PromptLengthExplorer(model="llama-2-7b")
    return explorer, explorer.controls["num_virtual_tokens"], [21, 22, 20, 400]


def _density() -> tuple[object, object, list[int]]:
    from survey_utils.widgets.density import DensityExplorer

    explorer = DensityExplorer(model="roberta-base", top_k=3)
    return explorer, explorer.controls["top_k"], [4, 5, 3, 12]


def _design_search() -> tuple[object, object, list[float]]:
    from survey_utils.widgets.design_search import DesignSearchExplorer

    explorer = DesignSearchExplorer(["roberta-base", "tiny-bert"], model="roberta-base")
    step = 10 ** explorer.controls["trainable"].step
    return explorer, explorer.controls["trainable"], [step, step**2, 1.0, 10.0]


def _quantization() -> tuple[object, object, list[int]]:
    from survey_utils.widgets.quantization import QuantizationExplorer

    explorer = QuantizationExplorer()
    return explorer, explorer.controls["blocksize"], [128, 64, 128, 512]


def _qlora() -> tuple[object, object, list[int]]:
    from survey_utils.widgets.quantization import QLoRAMemoryExplorer

    explorer = QLoRAMemoryExplorer(["llama-65b", "llama-2-7b", "tiny-llama"])
    return explorer, explorer.controls["r"], [65, 66, 64, 256]


def _comparison() -> tuple[object, object, list[int]]:
    explorer = ComparisonExplorer(model="roberta-base")
    return explorer, explorer.controls["batch_size"], [9, 10, 8, 64]


def _task_scaling() -> tuple[object, object, list[int]]:
    from survey_utils.widgets.task_scaling import TaskScalingExplorer

    explorer = TaskScalingExplorer(model="llama-2-7b", method="mpt")
    return explorer, explorer.controls["tasks"], [9, 10, 8, 64]


def _lab() -> tuple[object, object, list[str]]:
    from survey_utils.experiments import ch09_lab
    from survey_utils.widgets.lab import LabExplorer

    explorer = LabExplorer(ch09_lab.load(), task="sentiment")
    sizes = list(explorer.controls["size"].options)
    return explorer, explorer.controls["size"], [sizes[-2], sizes[-1], sizes[-2], sizes[0]]


REDRAWS = {"memory": _memory, "params": _params, "budget": _budget, "prompts": _prompts, "density": _density,
           "design_search": _design_search, "quantization": _quantization, "qlora": _qlora,
           "comparison": _comparison, "task_scaling": _task_scaling, "lab": _lab}


@pytest.mark.parametrize("make", list(REDRAWS.values()), ids=list(REDRAWS))
def test_slider_redraws_reuse_the_frame_and_match_a_full_render(make) -> None:
    explorer, slider, values = make()
    assert check_frame(explorer) is False  # the first render draws the frame
    blits = []
    for value in values:
        slider.value = value
        blits.append(check_frame(explorer))  # a blitted redraw equals a full render, pixel for pixel
    assert sum(blits[:3]) >= 2, f"small moves of the main slider should reuse the frame: {blits}"
    first = explorer.controls[list(explorer.controls)[0]]  # the model (or task, weight) dropdown: a new frame,
    options = list(first.options)                          # still equal to a full render
    first.value = "gpt2" if "gpt2" in options and first.value != "gpt2" else next(o for o in options
                                                                                  if o not in (first.value, "gpt2"))
    check_frame(explorer)
    slider.value = values[0]
    check_frame(explorer)


class _Canvas(FigureCanvasAgg):
    """An Agg canvas that records what the explorer asks of ipympl's: a frame sent now (blit) or a draw request."""

    syncing_data_url = False  # the browser's view has said "initialized"

    def __init__(self, figure) -> None:
        super().__init__(figure)
        self.calls: list[str] = []

    def blit(self, bbox=None) -> None:
        self.calls.append("blit")

    def draw_idle(self, *args, **kwargs) -> None:
        self.calls.append("draw_idle")


@pytest.mark.parametrize(("thread_name", "expected"), [("subshell-5e1f", "blit"), ("MainThread", "blit"),
                                                       (f"{WORKER_THREAD}-memory-simulation", "draw_idle")])
def test_a_slider_callback_on_a_kernel_subshell_sends_its_frame_at_once(thread_name: str, expected: str) -> None:
    """JupyterLab with ipykernel 7 runs comm callbacks on a subshell thread, not the main thread: the frame must
    still be sent at once (a draw request costs a browser round trip and a full render, 250-400 ms a move);
    only an explorer's own worker thread leaves the frame to the browser's draw request."""
    explorer, slider, values = _prompts()
    canvas = _Canvas(explorer.fig)
    explorer.fig.set_canvas(canvas)
    explorer._output = None  # as under ipympl (%matplotlib widget): the canvas is the widget
    worker = threading.Thread(target=lambda: setattr(slider, "value", values[0]), name=thread_name)
    worker.start()
    worker.join()
    assert canvas.calls == [expected]
