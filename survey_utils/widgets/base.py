"""The base of every chapter widget: controls, one figure built once, a one-line message area.

The figure is created once (``plt.ioff()``), its artists are created once in :meth:`Explorer.setup`, and
each control change calls :meth:`Explorer.compute` (a pure function of the controls' values, so tests drive
it by setting ``widget.value``) then :meth:`Explorer.draw` (which updates the artists in place), then
``canvas.draw_idle()``. The layout (constrained) is computed once, then frozen: a slider's redraw renders
only the artists (``benchmarks/browser_latency.py`` measured constrained layout at about 40% of a redraw);
controls named in ``relayout_on`` (a model or method dropdown, which change labels) lay the figure out again.
With ipympl (``%matplotlib widget``) the canvas is itself a widget; with any other
backend the figure is shown in an Output widget.

Redraws are cheap where the frame stays (``benchmarks/explorer_redraw.py`` profiles them): a subclass names
the artists its :meth:`Explorer.draw` changes (:meth:`Explorer.dynamic_artists`: lines, bars, value labels,
titles); everything else (axes, ticks, grid, axis labels, legends) is the frame, rendered once with the
dynamic artists hidden and kept as a pixel copy. While the frame's state (:func:`frame_state`: limits,
scales, fixed tick labels, axis labels, static texts, layout) is unchanged, an update restores that copy and
draws only the dynamic artists (a blit, ~10x cheaper than rendering every tick label and legend), then sends
the image at once instead of asking the browser for a draw (``draw_idle`` costs a round trip). The last
:data:`FRAMES_KEPT` frames are kept, keyed by their state, so a slider moved back and forth across an axis-limit
step finds both frames rendered. Tests compare
a blitted frame with a full render, pixel for pixel (``tests/widgets/plot_truth.py``, ``check_frame``). Invalid settings raise ``SurveyError`` in ``compute``;
the message area shows its one line and the plot keeps its last valid state.
"""

from __future__ import annotations

import html
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from io import BytesIO
from typing import Any

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.artist import Artist
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator
from PIL import Image

from survey_utils.errors import SurveyError
from survey_utils.plotting import apply_style

TITLE_Y = 1.0
"""Where a dynamic title sits (axes fraction): fixed, because matplotlib places a title automatically only in a
full render, and a blitted one must land where the full render puts it (nothing sits above these axes)."""


FRAMES_KEPT = 4
"""Rendered frames an explorer keeps, most recent first: each is a pixel copy of the whole figure (about 3 MB for
a 10 x 7 in figure at 100 dpi), and four cover a slider nudged both ways across two limit steps."""

RENDER_LOCK = threading.RLock()
"""Held while an explorer changes or renders its figure, and around its ipympl canvas's own draws: FreeType's
rasterizer and matplotlib's font cache are shared by every figure and are not thread-safe. In JupyterLab with
ipykernel 7 a slider's callback and the canvas's draw request (after a resize) can run on different threads; two
renders at once failed with FT_Render_Glyph "raster overflow" (chapter 07 in the browser test)."""

FRAME_PNG_LEVEL = 1
"""zlib level of the PNG frames an ipympl canvas sends the browser. matplotlib's web canvas encodes at PIL's default,
6, where most of the cost is zlib's search: a 1000 x 380 px diff with no pixel changed took 25 ms at level 6 and
10 ms at 1 (a changed full frame 58 ms and 39 ms; ``benchmarks/explorer_redraw.py`` prints both per chapter). The
image is lossless either way; level 1's is a few KB larger, sent over a local socket."""

WORKER_THREAD = "explorer-worker"
"""The name prefix of the threads explorers start for slow work (a simulation); a frame drawn there is left to
the browser's draw request."""


def in_worker_thread() -> bool:
    """Whether the caller runs in an explorer's own worker thread (named with :data:`WORKER_THREAD`)."""
    return threading.current_thread().name.startswith(WORKER_THREAD)


class Explorer:
    """Subclass and implement :meth:`setup`, :meth:`compute` and :meth:`draw`."""

    relayout_on: tuple[str, ...] = ("model", "method")

    def __init__(self, controls: Mapping[str, W.Widget], figsize: tuple[float, float] = (10, 3.8),
                 title: str = "") -> None:
        apply_style()
        self.controls: dict[str, W.Widget] = dict(controls)
        self.message = W.HTML(value="", layout=W.Layout(min_height="1.6em"))
        self.error: str | None = None
        self.view: Any = None
        self.updates = 0
        self.blits = 0
        self._needs_layout = True
        self._layout_version = 0
        self._frames: OrderedDict[tuple, Any] = OrderedDict()  # frame state -> its rendered pixels
        with plt.ioff():
            self.fig: Figure = plt.figure(figsize=figsize, layout="constrained")
        # pyplot redraws an interactive figure on every artist change (each one a message to the browser
        # asking for a full render); update() sends one finished image instead.
        self.fig.stale_callback = None
        self._output: W.Output | None = None
        if isinstance(self.fig.canvas, W.DOMWidget):
            _draw_under_render_lock(self.fig.canvas)
            self.fig.canvas.get_diff_image = lambda: frame_png(self.fig.canvas)
            self.fig.canvas.header_visible = False
            self.fig.canvas.toolbar_visible = False
            self.fig.canvas.resizable = False
            self.fig.canvas.layout.height = f"{int(figsize[1] * 100) + 10}px"
            canvas: W.Widget = self.fig.canvas
        else:
            self._output = W.Output(layout=W.Layout(height=f"{int(figsize[1] * 100) + 10}px"))
            canvas = self._output
        self.controls_box = W.VBox([], layout=W.Layout(width="100%"))
        header = [W.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        self.widget = W.VBox([*header, self.controls_box, self.message, canvas])
        self.setup(self.fig)
        self._layout_controls()
        for control in self.controls.values():
            self.watch(control)
        self.update()

    # --- for subclasses -------------------------------------------------------------------------------
    def setup(self, fig: Figure) -> None:
        """Create axes and artists once."""
        raise NotImplementedError

    def compute(self, **state: Any) -> Any:
        """The view's data from the controls' values; pure; raise ``SurveyError`` for bad settings."""
        raise NotImplementedError

    def draw(self, view: Any) -> None:
        """Update the artists created in :meth:`setup` with ``view``."""
        raise NotImplementedError

    def after_frame(self, view: Any) -> None:
        """Update widgets beside the figure (a table) from ``view``, after the frame has been sent: the browser
        handles messages in order, so a large HTML update sent first would hold the new pixels back."""

    def dynamic_artists(self) -> Sequence[Artist]:
        """The artists :meth:`draw` changes while the frame stays; anything else it changes must show in
        :func:`frame_state` or :meth:`frame_key`. Default: none (every update renders the whole figure)."""
        return ()

    def frame_key(self) -> tuple:
        """State of the frame that :func:`frame_state` cannot read (e.g. a secondary axis' conversion)."""
        return ()

    # --- machinery ------------------------------------------------------------------------------------
    @property
    def state(self) -> dict[str, Any]:
        return {name: control.value for name, control in self.controls.items()}

    def watch(self, control: W.Widget) -> None:
        control.observe(self._on_change, names="value")

    def _layout_controls(self) -> None:
        self.controls_box.children = [W.HBox(list(self.controls.values())[i:i + 3])
                                      for i in range(0, len(self.controls), 3)]

    def _on_change(self, change: Mapping[str, Any] | None = None) -> None:
        owner = change.get("owner") if change else None
        if any(self.controls.get(name) is owner for name in self.relayout_on):
            self._needs_layout = True
        self.update()

    def relayout(self) -> None:
        """Lay the figure out (constrained) for its current artists, then freeze the positions."""
        self.fig.set_layout_engine("constrained")
        self.fig.draw_without_rendering()
        self.fig.set_layout_engine("none")
        self._needs_layout = False
        self._layout_version += 1
        self._frames.clear()  # drawn at the old positions: their keys can never match again

    def update(self) -> None:
        """Recompute and redraw; on a ``SurveyError`` show its line and keep the last valid plot."""
        try:
            view = self.compute(**self.state)
        except SurveyError as error:
            self.error = str(error)
            self.message.value = f'<span style="color:#b00020">&#9888; {html.escape(self.error)}</span>'
            return
        self.error = None
        self.message.value = ""
        with RENDER_LOCK:
            self.view = view
            self.draw(view)
            if self._needs_layout:
                self.relayout()
            self.updates += 1
            self._refresh()
        self.after_frame(view)

    def render_frame(self) -> bool:
        """Render the figure into its (Agg) canvas: the frame from its cached pixels when its state is
        unchanged (returns True), else in full (returns False), then the dynamic artists over it."""
        with RENDER_LOCK:
            return self._render_frame()

    def _render_frame(self) -> bool:
        canvas = self.fig.canvas
        dynamic = sorted(self.dynamic_artists(), key=lambda a: a.get_zorder())
        key = (self._layout_version, self.frame_key(), frame_state(self.fig, dynamic))
        background = self._frames.get(key)
        blit = background is not None
        if blit:
            self._frames.move_to_end(key)
            canvas.restore_region(background)
        else:
            shown = [a for a in dynamic if a.get_visible()]
            for artist in shown:
                artist.set_visible(False)
            try:
                FigureCanvasAgg.draw(canvas)  # Agg's own draw: renders without sending the frame to the browser
            finally:
                for artist in shown:
                    artist.set_visible(True)
            self._frames[key] = canvas.copy_from_bbox(self.fig.bbox)
            while len(self._frames) > FRAMES_KEPT:
                self._frames.popitem(last=False)
        renderer = canvas.get_renderer()
        for artist in dynamic:
            if artist.get_visible():
                artist.draw(renderer)
        self.blits += blit
        return blit

    def forget_frames(self) -> None:
        """Drop the kept frames: the next :meth:`render_frame` renders in full (tests compare the two)."""
        self._frames.clear()

    def _refresh(self) -> None:
        if self._output is None:
            canvas = self.fig.canvas
            # Until the browser's view has said "initialized", ipympl would store a sent frame as its data URL
            # without the data: prefix, and the view's first resize fails on that broken image (the figure
            # never shows). Before that, and from an explorer's own worker thread (a simulation), the browser asks
            # for a full draw. Control callbacks run on the kernel's shell thread, or, in JupyterLab with ipykernel
            # 7, on a subshell thread: both send the frame now (the draw_idle round trip and full render cost
            # 250-400 ms a move in benchmarks/browser_latency.py).
            shown = not getattr(canvas, "syncing_data_url", True)
            if isinstance(canvas, FigureCanvasAgg) and shown and not in_worker_thread():
                self.render_frame()
                canvas.blit()  # ipympl (webagg): send the rendered buffer now, as a diff against the last one
            else:
                canvas.draw_idle()
            return
        from IPython.display import display

        with self._output:
            self._output.clear_output(wait=True)
            display(self.fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _draw_under_render_lock(canvas: Any) -> None:
    """Make ``canvas.draw`` (what ipympl runs for the browser's draw request) hold :data:`RENDER_LOCK`."""
    unlocked = canvas.draw

    def draw(*args: Any, **kwargs: Any) -> Any:
        with RENDER_LOCK:
            return unlocked(*args, **kwargs)

    canvas.draw = draw


def frame_png(canvas: Any, level: int = FRAME_PNG_LEVEL) -> bytes | None:
    """The PNG an ipympl canvas sends for its current buffer: matplotlib's ``get_diff_image`` (webagg), encoded at
    zlib ``level`` (:data:`FRAME_PNG_LEVEL`). As there, it is ``None`` while the last image sent is current;
    otherwise the full buffer (first frame, new size, a transparent pixel, or a forced full frame: image mode
    "full") or the buffer where it differs from the last one sent and transparent black elsewhere (image mode
    "diff", which the browser draws over its last frame); the buffer is kept for the next diff.
    ``tests/widgets/test_frame_png.py`` checks it decodes to matplotlib's own image, in the same mode."""
    if not canvas._png_is_old:
        return None
    pixels = np.asarray(canvas.get_renderer().buffer_rgba())
    buffer = pixels.view(np.uint32).squeeze(2)  # one uint32 a pixel: the whole pixel compares in one operation
    if canvas._force_full or buffer.shape != canvas._last_buff.shape or (pixels[:, :, 3] != 255).any():
        canvas.set_image_mode("full")
        output = buffer
    else:
        canvas.set_image_mode("diff")
        output = np.where(buffer != canvas._last_buff, buffer, 0)
    canvas._last_buff = buffer.copy()
    canvas._force_full = False
    canvas._png_is_old = False
    with BytesIO() as png:
        Image.fromarray(output.view(np.uint8).reshape((*output.shape, 4))).save(png, format="png", compress_level=level)
        return png.getvalue()


def _axis_state(axis: Axis) -> tuple:
    locator, formatter = axis.get_major_locator(), axis.get_major_formatter()
    # Fixed ticks (set_xticks(positions, labels)) are drawn from their own list, not from the limits.
    fixed = (tuple((loc, formatter(loc, i)) for i, loc in enumerate(locator.locs))
             if isinstance(locator, FixedLocator) else ())
    return (axis.get_visible(), axis.get_label_text(), type(locator).__name__, type(formatter).__name__, fixed)


def frame_state(fig: Figure, dynamic: Sequence[Artist] = ()) -> tuple:
    """What the frame of ``fig`` (every artist but ``dynamic``) is drawn from: size and dpi; per axes its
    place, limits, scales, tick locators and fixed tick labels, axis labels, titles and texts; legends'
    texts; the figure's texts. Equal states draw equal frames, provided the explorer's :meth:`Explorer.draw`
    changes nothing else outside ``dynamic`` (``check_frame`` in the tests compares the pixels)."""
    skip = {id(a) for a in dynamic}

    def texts(items: Any) -> tuple:
        return tuple((t.get_text(), t.get_position(), t.get_visible(), t.get_color()) for t in items
                     if id(t) not in skip)

    state: list[Any] = [fig.dpi, tuple(fig.bbox.bounds), texts(fig.texts)]  # fig.texts holds the suptitle
    for ax in fig.get_axes():
        legend = ax.get_legend()
        state.append((ax.get_visible(), tuple(ax.get_position().bounds), ax.get_xlim(), ax.get_ylim(),
                      ax.get_xscale(), ax.get_yscale(), _axis_state(ax.xaxis), _axis_state(ax.yaxis),
                      texts([ax.title]), ax.get_title("left"), ax.get_title("right"), texts(ax.texts),
                      texts(legend.get_texts()) if legend is not None else None))
    return tuple(state)
