"""The base of every chapter widget: controls, one figure built once, a one-line message area.

The figure is created once (``plt.ioff()``), its artists are created once in :meth:`Explorer.setup`, and
each control change calls :meth:`Explorer.compute` (a pure function of the controls' values, so tests drive
it by setting ``widget.value``) then :meth:`Explorer.draw` (which updates the artists in place), then
``canvas.draw_idle()``. The layout (constrained) is computed once, then frozen: a slider's redraw renders
only the artists (``benchmarks/browser_latency.py`` measured constrained layout at about 40% of a redraw);
controls named in ``relayout_on`` (a model or method dropdown, which change labels) lay the figure out again.
With ipympl (``%matplotlib widget``) the canvas is itself a widget; with any other
backend the figure is shown in an Output widget. Invalid settings raise ``SurveyError`` in ``compute``;
the message area shows its one line and the plot keeps its last valid state.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import ipywidgets as W
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from survey_utils.errors import SurveyError
from survey_utils.plotting import apply_style


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
        self._needs_layout = True
        with plt.ioff():
            self.fig: Figure = plt.figure(figsize=figsize, layout="constrained")
        self._output: W.Output | None = None
        if isinstance(self.fig.canvas, W.DOMWidget):
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
        self.view = view
        self.draw(view)
        if self._needs_layout:
            self.relayout()
        self.updates += 1
        self._refresh()

    def _refresh(self) -> None:
        if self._output is None:
            self.fig.canvas.draw_idle()
            return
        from IPython.display import display

        with self._output:
            self._output.clear_output(wait=True)
            display(self.fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
