"""``frame_png``: the frames an explorer's ipympl canvas sends are matplotlib's own, encoded faster.

Two equal figures on matplotlib's web canvas (the class ipympl's canvas extends) go through the same frames: the
first (image mode "full"), a changed line (mode "diff": changed pixels, transparent black elsewhere), no change
(nothing to send), a forced full frame. One canvas encodes with matplotlib's ``get_diff_image``, the other with
``frame_png``; the decoded images and the modes must be equal at every step.
"""

from __future__ import annotations

from io import BytesIO

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_webagg_core import FigureCanvasWebAggCore
from PIL import Image

from survey_utils.widgets.base import frame_png


def _figure() -> tuple[FigureCanvasWebAggCore, plt.Line2D]:
    fig = plt.figure(figsize=(4, 3))
    canvas = FigureCanvasWebAggCore(fig)
    (line,) = fig.add_subplot().plot([0, 1, 2], [0, 1, 0])
    return canvas, line


def _render(canvas: FigureCanvasWebAggCore) -> None:
    """What the web canvas's ``draw`` does before it sends (it sends through a manager these canvases lack)."""
    FigureCanvasAgg.draw(canvas)
    canvas._png_is_old = True


def _decoded(png: bytes | None) -> np.ndarray | None:
    return None if png is None else np.asarray(Image.open(BytesIO(png)).convert("RGBA"))


def test_frame_png_sends_what_matplotlib_sends() -> None:
    theirs, their_line = _figure()
    ours, our_line = _figure()
    sent: list[str] = []

    def step(change=None, force_full: bool = False, draw: bool = True) -> None:
        for canvas, line in ((theirs, their_line), (ours, our_line)):
            if change is not None:
                line.set_ydata(change)
            if force_full:
                canvas._force_full = True
            if draw:
                _render(canvas)
        expected = _decoded(theirs.get_diff_image())
        got = _decoded(frame_png(ours))
        assert ours._current_image_mode == theirs._current_image_mode
        if expected is None:
            assert got is None
            sent.append("nothing")
            return
        assert got is not None and np.array_equal(got, expected)
        sent.append(ours._current_image_mode)

    try:
        step()                               # the first frame
        step(change=[1, 0, 1])               # a line moved
        step(draw=False)                     # nothing rendered since: nothing to send
        step(force_full=True)                # a frame the browser must not overlay
        assert sent == ["full", "diff", "nothing", "full"]
    finally:
        plt.close("all")


def test_a_lower_level_changes_the_size_not_the_pixels() -> None:
    canvas, _ = _figure()
    try:
        _render(canvas)
        fast = frame_png(canvas, level=1)
        canvas._png_is_old, canvas._force_full = True, True
        small = frame_png(canvas, level=9)
        assert np.array_equal(_decoded(fast), _decoded(small)) and len(small) <= len(fast)
    finally:
        plt.close("all")
