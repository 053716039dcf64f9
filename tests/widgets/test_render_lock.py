"""Explorers render under one lock (widgets/base.py RENDER_LOCK): FreeType is not thread-safe, and JupyterLab with
ipykernel 7 can run a slider's callback and the canvas's draw request on different threads."""

from __future__ import annotations

import threading
import time

import ipywidgets as W
import matplotlib.pyplot as plt

from survey_utils.widgets.base import RENDER_LOCK, Explorer, _draw_under_render_lock


class _Probe(Explorer):
    """Records whether the lock was held while it drew."""

    def setup(self, fig):
        self.ax = fig.subplots()
        (self.line,) = self.ax.plot([0, 1], [0, 0])
        self.held: list[bool] = []

    def compute(self, k):
        return k

    def draw(self, k):
        self.held.append(RENDER_LOCK._is_owned())
        self.line.set_ydata([k, k])


def test_an_update_draws_and_renders_holding_the_lock() -> None:
    probe = _Probe({"k": W.IntSlider(value=1, min=0, max=5)})
    probe.controls["k"].value = 2
    assert probe.held == [True, True]
    plt.close(probe.fig)


def test_a_wrapped_canvas_draw_waits_for_a_render_in_another_thread() -> None:
    order: list[str] = []

    class Canvas:
        def draw(self) -> None:
            order.append("canvas draw")

    canvas = Canvas()
    _draw_under_render_lock(canvas)
    with RENDER_LOCK:
        other = threading.Thread(target=canvas.draw)
        other.start()
        time.sleep(0.2)  # the other thread is blocked on the lock, not drawing
        order.append("render done")
    other.join(5)
    assert order == ["render done", "canvas draw"]
