"""What fits my GPUs: a feasibility map of zoo models x methods for a GPU type and count (chapter 06, reused in 00).

Each cell is one of: fits on one GPU; fits on one GPU with gradient checkpointing; fits sharded over the GPUs
(FSDP full shard or ZeRO-3, with CPU offload if needed, checkpointing where the method allows it); does not fit;
n/a (the method cannot run on that model, e.g. BitFit on a model without biases). Picking a cell (the
dropdown, or a click on the map with ipympl) shows its per-GPU terms. The estimates are computed once when the
widget is built (with the sharded totals for 2, 4 and 8 GPUs); a change of GPU type or to one of those counts
is then comparisons only, another count one pass of the sharding arithmetic (then cached):
``benchmarks/advisor_speed.py`` times them against the 30 ms goal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from survey_utils.advisor import gpu_table, parse_memory, point
from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import MemoryEstimate, estimate
from survey_utils.memory.sharding import Sharding
from survey_utils.methods import get_method, list_methods
from survey_utils.units import format_bytes
from survey_utils.widgets.base import Explorer
from survey_utils.zoo import load_config

DEFAULT_MODELS = ("gpt2-xl", "t5-3b", "llama-2-7b", "llama-3-8b", "mistral-7b", "llama-2-13b", "qwen2.5-7b",
                  "llama-65b", "llama-3-70b", "qwen2.5-72b", "llama-3.1-405b")
CATEGORIES = ("n/a", "does not fit", "fits sharded", "fits with checkpointing", "fits")
COLOURS = ("#dddddd", "#d62728", "#ff7f0e", "#bcbd22", "#2ca02c")
CUSTOM = "custom (memory box)"


@dataclass
class Cell:
    """One model x method: its estimates (no checkpointing, checkpointing) and single-GPU device totals."""

    model: str
    method: str
    error: str | None = None
    plain: MemoryEstimate | None = None
    ckpt: MemoryEstimate | None = None
    single: dict[bool, int] = field(default_factory=dict)  # checkpointing -> device total on one GPU


class FeasibilityTable:
    """The estimates of every cell, computed once; :meth:`categories` answers a (capacity, GPUs) question."""

    def __init__(self, models: tuple[str, ...] = DEFAULT_MODELS, methods: list[str] | None = None,
                 seq_len: int = 512, precompute_gpus: tuple[int, ...] = (2, 4, 8)) -> None:
        self.models = list(models)
        self.methods = methods or [m.name for m in list_methods()]
        self.seq_len = seq_len
        self.cells = [[self._cell(model, method) for method in self.methods] for model in self.models]
        self._sharded: dict[int, np.ndarray] = {}
        self.single = np.array([[[c.single.get(False, np.inf), c.single.get(True, np.inf)] for c in row]
                                for row in self.cells], dtype=float)
        self.na = np.array([[c.error is not None for c in row] for row in self.cells])
        for gpus in precompute_gpus:  # the counts a reader picks first: their updates are comparisons only
            self.sharded(gpus)

    def _cell(self, model: str, name: str) -> Cell:
        cell = Cell(model, name)
        method = get_method(name)
        config = load_config(model)
        for ckpt in (False, True):
            try:
                est = estimate(config, method, seq_len=min(self.seq_len, _context(config)),
                               gradient_checkpointing=ckpt, quantization=method.base_quantization)
            except SurveyError as error:
                if not ckpt:
                    cell.error = str(error)
                    return cell
                continue
            setattr(cell, "ckpt" if ckpt else "plain", est)
            cell.single[ckpt] = point(config, method, est, Sharding(), ckpt).device_total
        return cell

    def sharded(self, gpus: int) -> np.ndarray:
        """Per-GPU device totals with the most memory-saving sharding on ``gpus`` GPUs (cached per count)."""
        if gpus not in self._sharded:
            out = np.full(self.na.shape, np.inf)
            for i, row in enumerate(self.cells):
                for j, cell in enumerate(row):
                    if cell.error is None:
                        out[i, j] = min(p.device_total for p in self._sharded_points(cell, gpus))
            self._sharded[gpus] = out
        return self._sharded[gpus]

    def _sharded_points(self, cell: Cell, gpus: int) -> list[Any]:
        config, method = load_config(cell.model), get_method(cell.method)
        est, ckpt = (cell.ckpt, True) if cell.ckpt is not None else (cell.plain, False)
        return [point(config, method, est, Sharding(strategy, gpus, offload), ckpt)
                for strategy in ("zero3", "fsdp_full_shard") for offload in ("none", "optimizer+params")]

    def categories(self, capacity: int, gpus: int) -> np.ndarray:
        """Index into :data:`CATEGORIES` per cell."""
        cat = np.ones(self.na.shape, dtype=int)
        if gpus > 1:
            cat[self.sharded(gpus) <= capacity] = 2
        cat[self.single[:, :, 1] <= capacity] = 3
        cat[self.single[:, :, 0] <= capacity] = 4
        cat[self.na] = 0
        return cat

    def breakdown(self, i: int, j: int, capacity: int, gpus: int) -> tuple[str, dict[str, int]]:
        """The terms of the cell's cheapest fitting point (or its single-GPU point when nothing fits)."""
        cell = self.cells[i][j]
        if cell.error is not None:
            return f"n/a: {cell.error}", {}
        config, method = load_config(cell.model), get_method(cell.method)
        category = int(self.categories(capacity, gpus)[i, j])
        if category == 2:
            best = min(self._sharded_points(cell, gpus), key=lambda p: p.device_total)
        else:
            ckpt = category == 3 and cell.ckpt is not None
            best = point(config, method, cell.ckpt if ckpt else cell.plain, Sharding(), ckpt)
        label = (f"{cell.model} / {cell.method}: {CATEGORIES[category]} ({best.sharding.label}"
                 f"{', checkpointing' if best.gradient_checkpointing else ''}), "
                 f"{format_bytes(best.device_total)} per GPU")
        return label, {k: v for k, v in best.terms.items() if v}


def _context(config: Any) -> int:
    from survey_utils.architecture import layout

    return layout(config).max_positions or 1 << 20


@dataclass
class MapView:
    categories: np.ndarray
    capacity: int
    gpus: int
    cell: tuple[int, int]
    label: str
    terms: dict[str, int]


class FeasibilityExplorer(Explorer):
    """Controls: GPU type (or a memory box), GPU count, the cell to break down. Figure: the map and the terms."""

    relayout_on = ()

    def __init__(self, table: FeasibilityTable | None = None, gpu: str = "rtx-a6000", gpus: int = 1) -> None:
        self.table = table or FeasibilityTable()
        names = [row["name"] for row in gpu_table()]
        cells = [(f"{m} / {k}", (i, j)) for i, m in enumerate(self.table.models)
                 for j, k in enumerate(self.table.methods)]
        controls = {
            "gpu": W.Dropdown(options=[*names, CUSTOM], value=gpu, description="GPU"),
            "gpus": W.BoundedIntText(value=gpus, min=0, max=1024, description="GPUs"),
            "memory": W.Text(value="48GB", description="memory", continuous_update=False),
            "cell": W.Dropdown(options=cells, value=cells[0][1], description="cell"),
        }
        super().__init__(controls, figsize=(11, 3.2 + 0.28 * len(self.table.models)), title="What fits my GPUs")

    def setup(self, fig: Figure) -> None:
        grid = fig.add_gridspec(1, 2, width_ratios=(3, 1))
        self.ax_map, self.ax_terms = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
        shape = self.table.na.shape
        self.image = self.ax_map.imshow(np.zeros(shape), cmap=ListedColormap(COLOURS), vmin=-0.5, vmax=4.5,
                                        aspect="auto", interpolation="nearest")
        self.ax_map.set_yticks(range(shape[0]), self.table.models, fontsize=7)
        self.ax_map.set_xticks(range(shape[1]), self.table.methods, rotation=90, fontsize=7)
        (self.marker,) = self.ax_map.plot([0], [0], marker="s", markersize=9, markerfacecolor="none",
                                          markeredgecolor="black")
        handles = [self.ax_map.scatter([], [], marker="s", color=c, label=label) for c, label in
                   zip(COLOURS, CATEGORIES, strict=True)]
        self.ax_map.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.42), ncols=5,
                           frameon=False)
        self.bars = None
        self.fig.canvas.mpl_connect("button_press_event", self._on_click)

    def _on_click(self, event: Any) -> None:
        if event.inaxes is self.ax_map and event.xdata is not None:
            i, j = int(round(event.ydata)), int(round(event.xdata))
            if 0 <= i < self.table.na.shape[0] and 0 <= j < self.table.na.shape[1]:
                self.controls["cell"].value = (i, j)

    def capacity(self, gpu: str, memory: str) -> int:
        if gpu == CUSTOM:
            return parse_memory(memory)
        return next(row["memory_bytes"] for row in gpu_table() if row["name"] == gpu)

    def compute(self, gpu: str, gpus: int, memory: str, cell: tuple[int, int]) -> MapView:
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
            raise SurveyError(f"gpus={gpus!r} must be a positive integer")
        capacity = self.capacity(gpu, memory)
        categories = self.table.categories(capacity, gpus)
        label, terms = self.table.breakdown(*cell, capacity, gpus)
        return MapView(categories, capacity, gpus, cell, label, terms)

    def draw(self, view: MapView) -> None:
        self.image.set_data(view.categories)
        self.marker.set_data([view.cell[1]], [view.cell[0]])
        self.ax_map.set_title(f"{view.gpus} x {format_bytes(view.capacity)}: reserved + CUDA context per GPU, "
                              f"batch 1, seq {self.table.seq_len}", fontsize=9)
        self.ax_terms.clear()
        names = [*view.terms, "total per GPU"]
        values = [v / 2**30 for v in view.terms.values()]
        values.append(sum(values))
        self.ax_terms.barh(range(len(names)), values, color="#1f77b4")
        self.ax_terms.set_yticks(range(len(names)), names, fontsize=7)
        self.ax_terms.invert_yaxis()
        self.ax_terms.set_xlabel("GiB per GPU")
        self.ax_terms.axvline(view.capacity / 2**30, color="black", lw=0.8)  # compare with the total's bar
        self.ax_terms.set_title(view.label, fontsize=7, wrap=True)
