"""Plot truth: read each explorer's artists back and check them against an independent computation.

Each ``check_*`` takes a live explorer and asserts that every plotted artist shows what its label says,
recomputed here from the layers below the widget (the closed form, the memory model's own terms), not from
the explorer's view; that the axis limits contain every plotted value; that a blank or n/a says why; and
that controls which do not apply are disabled. The unit tests call them on fixed states and the fuzz tests
(tests/fuzz/test_widget_fuzz.py) on random ones.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from survey_utils.counting import closed_form
from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import estimate
from survey_utils.methods import get_method
from survey_utils.zoo import load_config

GIB = 2**30
REL = 1e-9


def check_frame(explorer: Any) -> bool:
    """A redraw that reused the cached frame (``Explorer.render_frame`` blitted) shows the same pixels as a
    full render of the same state: nothing the frame is drawn from changed without its key changing.
    Returns whether the redraw blitted (tests assert the fast path is taken where it should be)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = explorer.fig.canvas
    if not isinstance(canvas, FigureCanvasAgg):
        return False
    blitted = explorer.render_frame()
    if blitted:
        fast = np.asarray(canvas.buffer_rgba()).copy()
        explorer.forget_frames()  # force the full render
        assert explorer.render_frame() is False
        full = np.asarray(canvas.buffer_rgba())
        changed = np.argwhere((fast != full).any(axis=2))
        assert changed.size == 0, (f"the blitted frame differs from a full render at {len(changed)} pixels, "
                                   f"rows {changed[:, 0].min()}-{changed[:, 0].max()}, columns "
                                   f"{changed[:, 1].min()}-{changed[:, 1].max()}: draw() changed an artist "
                                   "that is neither dynamic nor in the frame's key")
    return blitted


def _close(a: Any, b: Any, what: str) -> None:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert a.shape == b.shape, f"{what}: {a.shape} points plotted, {b.shape} expected"
    assert np.allclose(a, b, rtol=REL, atol=0, equal_nan=True), f"{what}: plotted {a.tolist()} != {b.tolist()}"


def assert_limits_contain(ax: Any, xs: Any = (), ys: Any = (), what: str = "") -> None:
    """Every drawn value lies inside the axes' limits: finite, positive on a log axis, and, for a line (``xs``
    and ``ys`` of one length), only the points drawn (matplotlib leaves out a point with a NaN coordinate)."""
    xs, ys = np.asarray(list(xs), dtype=float).ravel(), np.asarray(list(ys), dtype=float).ravel()
    if len(xs) and len(xs) == len(ys):
        drawn = np.isfinite(xs) & np.isfinite(ys)
        if ax.get_xscale() == "log":
            drawn &= xs > 0
        if ax.get_yscale() == "log":
            drawn &= ys > 0
        xs, ys = xs[drawn], ys[drawn]
    for values, (low, high), scale, name in ((xs, ax.get_xlim(), ax.get_xscale(), "x"),
                                             (ys, ax.get_ylim(), ax.get_yscale(), "y")):
        low, high = min(low, high), max(low, high)
        for v in np.asarray(list(values), dtype=float).ravel():
            if not math.isfinite(v) or (scale == "log" and v <= 0):
                continue
            assert low <= v <= high, f"{what}: {name}={v:g} is outside the {name} limits ({low:g}, {high:g})"


def assert_legend_outside(ax: Any) -> None:
    """The axes' legend does not cover its data area."""
    legend = ax.get_legend()
    if legend is None:
        return
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    overlap_w = min(box.x1, area.x1) - max(box.x0, area.x0)
    overlap_h = min(box.y1, area.y1) - max(box.y0, area.y0)
    assert overlap_w <= 1 or overlap_h <= 1, f"the legend ({box}) covers the data area ({area})"


# --- chapter 00: the memory explorer -----------------------------------------------------------------------
def check_memory(explorer: Any) -> None:
    state = explorer.state
    method = get_method(state["method"])
    has_r = any(h.name == "r" for h in method.hyperparams)
    assert explorer.controls["rank"].disabled is (not has_r), "the rank slider must be live exactly for methods with r"
    if not has_r:
        assert explorer.controls["rank"].tooltip, "a disabled control says why in its tooltip"
    if explorer.error is not None:
        return
    hp = {"r": state["rank"]} if has_r else {}
    kwargs = {k: state[k] for k in ("batch_size", "dtype", "optimizer", "gradient_checkpointing", "device")}
    here = estimate(state["model"], state["method"], hp, seq_len=state["seq_len"], **kwargs)
    # left: each term's bar = the estimate's own term, the stack = its total
    terms = here.terms()
    est_heights = {term: bars.patches[0].get_height() for term, bars in explorer.bars.items()}
    for term, height in est_heights.items():
        _close(height, terms.get(term, 0) / GIB, f"estimate bar '{term}'")
    _close(sum(est_heights.values()), here.total / GIB, "estimate stack")
    sim_heights = [bars.patches[1].get_height() for bars in explorer.bars.values()]
    ticks = [t.get_text() for t in explorer.ax_bar.get_xticklabels()]
    if not state["simulate"]:
        assert ticks == ["estimate"] and not any(sim_heights), "no simulation column while simulate is off"
    view = explorer.view
    if view.simulated:
        for term, bars in explorer.bars.items():
            _close(bars.patches[1].get_height(), view.simulated.get(term, 0) / GIB, f"simulation bar '{term}'")
    top = max(sum(est_heights.values()), sum(sim_heights))
    assert_limits_contain(explorer.ax_bar, ys=[top], what="bar panel")
    # right: each line = its label's terms at each sequence length
    xs = explorer.lines["totals"].get_xdata()
    expected = {"fixed": [], "growing": [], "step": [], "totals": []}
    for s in xs:
        point = estimate(state["model"], state["method"], hp, seq_len=int(s), **kwargs)
        expected["fixed"].append((point.weights + point.optimizer_states + point.master_weights) / GIB)
        recomputed = point.activations_by_term.get("one block recomputed", 0)  # checkpointing: never alive with the loss
        expected["growing"].append((point.activations - recomputed + max(point.loss_transient, recomputed)) / GIB)
        expected["step"].append((point.gradients + point.optimizer_transient) / GIB)
        expected["totals"].append(point.total / GIB)
    for key, line in explorer.lines.items():
        _close(line.get_xdata(), xs, f"line '{line.get_label()}' x")
        _close(line.get_ydata(), expected[key], f"line '{line.get_label()}'")
        assert_limits_contain(explorer.ax_seq, line.get_xdata(), line.get_ydata(), f"line '{line.get_label()}'")
    assert state["seq_len"] in list(explorer.current.get_xdata())
    assert_limits_contain(explorer.ax_seq, xs=[state["seq_len"]], what="current s")
    labels = [t.get_text() for t in explorer.ax_seq.get_legend().get_texts()]
    assert all(line.get_label() in labels for line in explorer.lines.values()), "every line is in the legend"
    assert any("current" in t for t in labels) and any("overtake" in t for t in labels), "dotted/dashed explained"


# --- chapter 04 (and 01, 02): the trainable-parameter explorer ------------------------------------------------
def check_params(explorer: Any) -> None:
    if explorer.error is not None:
        return
    state = explorer.state
    config = load_config(state["model"])
    method = get_method(state["method"])
    hp = state["hp"]
    count = closed_form(config, method, **hp)
    xs, ys = explorer.sweep_line.get_data()
    sweep = explorer.view.sweep_name
    assert str(count.trainable)[:1] and f"{count.trainable_percent:.4g}%" in explorer.ax_sweep.get_title()
    if sweep is None:
        assert len(xs) == 0 and explorer.sweep_note.get_text(), "an empty sweep panel says why"
        assert len(explorer.current_point.get_ydata()) == 0
    else:
        assert explorer.sweep_note.get_text() == ""
        _close(explorer.current_point.get_ydata(), [count.trainable], "current point")
        expected = [closed_form(config, method, **{**hp, sweep: int(x)}).trainable for x in xs]
        _close(ys, expected, f"sweep of {sweep}")
        if hp[sweep] >= 1:
            _close(explorer.current_point.get_xdata(), [hp[sweep]], "current x")
        assert_limits_contain(explorer.ax_sweep, [*xs, *explorer.current_point.get_xdata()],
                              [*ys, count.trainable], "sweep panel")
    names = [m.name for m in explorer.methods]
    widths = []
    for bar, label, name in zip(explorer.bars, explorer.bar_labels, names, strict=True):
        other = get_method(name)
        shared = {k: v for k, v in hp.items() if k in {h.name for h in other.hyperparams}}
        try:
            percent = closed_form(config, other, **shared).trainable_percent
        except SurveyError:
            percent = None
        if percent:
            _close(bar.get_width(), percent, f"bar of {name}")
            widths.append(percent)
        else:
            assert label.get_text().strip().startswith("n/a:") and len(label.get_text()) > 6, \
                f"{name}: an n/a bar says why"
    assert_limits_contain(explorer.ax_compare, xs=widths, what="comparison bars")


def check_budget(explorer: Any) -> None:
    check_params(explorer)
    if explorer.error is not None:
        return
    state, view = explorer.state, explorer.view
    config = load_config(state["model"])
    method = get_method(state["method"])
    reference = explorer.reference
    _close([b.get_width() for b in explorer.budget_bars],
           [closed_form(config, method, **state["hp"]).trainable, reference.count(config, r=view.reference_rank)],
           "equal-budget bars")
    setting = {"batch_size": explorer.batch_size, "seq_len": explorer.seq_len}
    estimates = [estimate(config, method.name, state["hp"], **setting),
                 estimate(config, reference.name, {"r": view.reference_rank}, **setting)]
    for term, bars in explorer.memory_bars.items():
        _close([p.get_width() for p in bars.patches], [e.terms().get(term, 0) / GIB for e in estimates],
               f"memory bars '{term}'")
    assert_limits_contain(explorer.ax_memory, xs=[e.total / GIB for e in estimates], what="memory panel")
    assert_legend_outside(explorer.ax_memory)


# --- chapter 02: the prompt-length explorer ---------------------------------------------------------------
def check_prompts(explorer: Any) -> None:
    if explorer.error is not None:
        return
    from survey_utils.experiments.ch02_soft_prompts import sequence_costs
    from survey_utils.widgets.prompts import prompt_hp

    state = explorer.state
    config = load_config(state["model"])
    for method in explorer.methods:
        xs = explorer.lines[method][0].get_xdata()
        expected: list[list[float]] = [[], [], []]
        for n in xs:
            hp = prompt_hp(method, int(n), state["prefix_projection"])
            try:
                point = (float(get_method(method).count(config, **hp)),
                         estimate(config, method, hp, batch_size=state["batch_size"],
                                  seq_len=state["seq_len"]).total / GIB,
                         sequence_costs(config, method, int(n), state["seq_len"],
                                        state["batch_size"])["kv cache bytes"] / 2**20)
            except SurveyError:
                point = (math.nan, math.nan, math.nan)
            for i in range(3):
                expected[i].append(point[i])
        for ax, line, values in zip(explorer.axes, explorer.lines[method], expected, strict=True):
            _close(line.get_ydata(), values, f"{method} on '{ax.get_ylabel()}'")
            assert_limits_contain(ax, line.get_xdata(), line.get_ydata(), f"{method} on '{ax.get_ylabel()}'")


# --- chapter 07: the comparison explorer ------------------------------------------------------------------
def check_comparison(explorer: Any) -> None:
    if explorer.error is not None:
        return
    state = explorer.state
    config = load_config(state["model"])
    from survey_utils.architecture import total_params

    base = total_params(config)
    mems = []
    for i, name in enumerate(explorer.methods):
        try:
            pct = 100.0 * closed_form(config, name).trainable / base
        except SurveyError:
            pct = None
        if pct:
            _close(explorer.pct_bars[i].get_width(), pct, f"% trainable of {name}")
        else:
            assert explorer.pct_labels[i].get_text().strip().startswith("n/a:"), f"{name}: n/a says why"
        try:
            mem = estimate(config, name, {}, batch_size=state["batch_size"], seq_len=state["seq_len"],
                           dtype=state["dtype"], optimizer=state["optimizer"]).total / GIB if pct else None
        except SurveyError:
            mem = None
        if mem:
            _close(explorer.mem_bars[i].get_width(), mem, f"memory of {name}")
            mems.append(mem)
        else:
            assert explorer.mem_bars[i].get_width() == 0
    if not mems:
        assert explorer.mem_note.get_text(), "an empty memory panel says why"
    assert_limits_contain(explorer.ax_mem, xs=mems, what="memory panel")
    assert "n/a (note)" not in explorer.table.value or "<li>" in explorer.table.value, "n/a cells have notes"


# --- chapter 03: the density explorer -----------------------------------------------------------------------
def check_density(explorer: Any) -> None:
    if explorer.error is not None:
        return
    from survey_utils.counting import changed_params
    from survey_utils.experiments.ch03_selective import storage_formats, touched_params
    from survey_utils.widgets.density import MEMORY_SETTING, merged_changed

    state = explorer.state
    config = load_config(state["model"])
    method = get_method(state["method"])
    reference, label = explorer.reference, explorer.reference_label
    hp = explorer.hyperparameters(config, **{k: v for k, v in state.items() if k != "model"})
    count = closed_form(config, method, **hp)
    per_rank = closed_form(config, reference, r=1).trainable
    rank = max(1, round(count.trainable / per_rank))  # the reference at the rank closest to the method's budget
    matched = closed_form(config, reference, r=rank)
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in hp.items()))
    changed = {"method": changed_params(state["model"], method.name, key)[0],
               label: merged_changed(config, reference, r=rank)}
    trained = {"method": count.trainable, label: matched.trainable}
    widths = []
    for who, bars in explorer.param_bars.items():
        expected = [100 * trained[who] / count.total, 100 * changed[who] / count.total]
        _close([b.get_width() for b in bars], expected, f"{who}: trained, changed (% of the model)")
        widths += expected
    assert_limits_contain(explorer.ax_params, xs=widths, what="parameter bars")
    touched = {"method": touched_params(config, method, changed["method"], **hp), label: changed[label]}
    sizes = []
    for who, name, settings, adds in (("method", method.name, hp, method.adds_parameters),
                                      (label, reference.name, {"r": rank}, True)):
        stored = min(storage_formats(trained[who], changed[who], count.total, adds, touched=touched[who]).values())
        peak = estimate(config, name, settings, **MEMORY_SETTING).total
        _close([b.get_width() for b in explorer.byte_bars[who]], [stored, peak], f"{who}: stored, peak (bytes)")
        sizes += [stored, peak]
    assert_limits_contain(explorer.ax_bytes, xs=sizes, what="byte bars")
    assert f"{label} r={rank}" in explorer.ax_params.get_title()


# --- chapter 05: the design-search explorer -----------------------------------------------------------------
def check_design_search(explorer: Any) -> None:
    if explorer.error is not None:
        return
    from survey_utils.architecture import total_params
    from survey_utils.experiments.ch05_hybrid import search

    state = explorer.state
    space = explorer.space(state["model"])
    smallest = min(c.peak for c in search(space.config, 10**15, 2**62, space=space).feasible)
    budget = int(total_params(space.config) * state["trainable"] / 100)
    result = search(space.config, budget, int(smallest * state["memory"]), space=space)
    _close(np.asarray(explorer.all_points.get_offsets()), [(c.trainable, c.peak / GIB) for c in result.feasible],
           "feasible candidates (trainable, GiB)")
    _close(np.asarray(explorer.front_points.get_offsets()), [(c.trainable, c.peak / GIB) for c in result.front],
           "Pareto front (trainable, GiB)")
    chosen = result.front[min(max(int(state["point"]), 0), len(result.front) - 1)]
    _close(np.asarray(explorer.chosen_point.get_offsets()), [(chosen.trainable, chosen.peak / GIB)], "chosen point")
    parts = [space.atom(p.method, **p.settings).trainable for p in chosen.parts]
    _close([b.get_width() for b in explorer.ax_parts.patches], parts, "the chosen point's parts")
    _close(sum(parts), chosen.trainable, "the parts add up to the chosen point")
    points = np.asarray(explorer.all_points.get_offsets())
    assert_limits_contain(explorer.ax, points[:, 0], points[:, 1], "feasible candidates")
    assert_limits_contain(explorer.ax, [chosen.trainable], [chosen.peak / GIB], "chosen point")


# --- chapter 06: the feasibility map, the quantization and QLoRA memory explorers ----------------------------
def check_feasibility(explorer: Any) -> None:
    if explorer.error is not None:
        return
    from survey_utils.advisor import point
    from survey_utils.memory.sharding import Sharding
    from survey_utils.widgets.advisor import CATEGORIES

    state, table = explorer.state, explorer.table
    capacity = explorer.capacity(state["gpu"], state["memory"])
    shown = np.asarray(explorer.image.get_array())
    assert np.array_equal(shown, table.categories(capacity, state["gpus"])), "the map is the table's categories"
    i, j = state["cell"]
    assert list(explorer.marker.get_xdata()) == [j] and list(explorer.marker.get_ydata()) == [i]
    cell = table.cells[i][j]
    config, method = load_config(cell.model), get_method(cell.method)
    category = CATEGORIES[int(shown[i, j])]
    if cell.error is not None:
        assert category == "n/a" and explorer.view.label.startswith("n/a:"), "an n/a cell says why"
    else:  # the picked cell, recomputed from the advisor's point: one GPU without and with checkpointing
        plain = point(config, method, cell.plain, Sharding(), False).device_total <= capacity
        ckpt = cell.ckpt is not None and point(config, method, cell.ckpt, Sharding(), True).device_total <= capacity
        assert (category == "fits") == plain and (category == "fits with checkpointing") == (ckpt and not plain)
    terms = explorer.view.terms
    widths = [p.get_width() for p in explorer.ax_terms.patches]
    _close(widths, [*(v / GIB for v in terms.values()), sum(terms.values()) / GIB], "terms and their total (GiB)")
    assert_limits_contain(explorer.ax_terms, xs=[*widths, capacity / GIB], what="terms panel")


def check_quantization(explorer: Any) -> None:
    if explorer.error is not None:
        return
    from survey_utils import quantization as Q
    from survey_utils.widgets.quantization import SHAPES, _weight

    state = explorer.state
    weight = _weight(SHAPES[state["weight_shape"]])
    rebuilt = Q.quantize_dequantize(weight, state["bits"], state["blocksize"], state["double_quant"])
    counts, edges = explorer.hist_original.get_data().values, explorer.hist_original.get_data().edges
    rebuilt_counts = explorer.hist_rebuilt.get_data().values
    _close(explorer.hist_rebuilt.get_data().edges, edges, "the two histograms' edges")
    _close(counts, np.histogram(weight.reshape(-1).numpy(), edges)[0], "histogram of the weight")
    _close(rebuilt_counts, np.histogram(rebuilt.reshape(-1).numpy(), edges)[0], "histogram of the reconstruction")
    heights = [b.get_height() for b in explorer.bars]
    _close(heights, [100 * Q.reconstruction_error(weight, rebuilt)["relative"],
                     10 * Q.bytes_per_weight(state["bits"], state["blocksize"], state["double_quant"])],
           "relative error (%), bytes per weight x 10")
    assert_limits_contain(explorer.ax_bars, ys=heights, what="error and bytes bars")
    assert_limits_contain(explorer.ax_hist, xs=[edges[0], edges[-1]],
                          ys=[c for c in (*counts, *rebuilt_counts) if c > 0], what="histograms")


def check_qlora_memory(explorer: Any) -> None:
    if explorer.error is not None:
        return
    from survey_utils.experiments.ch06_quantized import claim_configs, read_claims
    from survey_utils.widgets.quantization import BASES, CLAIM_GB, OPTIMIZERS

    state = explorer.state
    claims = read_claims()
    config = claim_configs(claims)[state["model"]] if state["model"] == "llama-65b" else state["model"]
    hp = {"r": state["r"], "lora_alpha": claims["qlora_lora_alpha"].value, "bnb_4bit_use_double_quant": True}
    totals = []
    for row, storage in enumerate(BASES):
        est = estimate(config, "qlora", hp=hp, quantization=None if storage == "bf16" else storage,
                       optimizer=OPTIMIZERS[state["optimizer"]],
                       gradient_checkpointing=state["gradient_checkpointing"], batch_size=1, seq_len=512)
        terms = est.terms()
        for term, bars in explorer.stacks.items():
            _close(bars.patches[row].get_width(), terms.get(term, 0) / 1e9, f"{storage}: '{term}' (GB)")
        totals.append(sum(terms.values()) / 1e9)
    claim = claims[CLAIM_GB].value
    assert list(explorer.claim_line.get_xdata()) == [claim, claim]
    assert_limits_contain(explorer.ax, xs=[*totals, claim], what="stacks and the claim's line")


# --- chapter 09: the lab explorer ----------------------------------------------------------------------------
def check_lab(explorer: Any) -> None:
    """Chapter 09's lab explorer: each dot, its name and colour, the right panel's lines, from data/lab/runs.csv."""
    state = explorer.state
    if not state["methods"]:
        assert explorer.error is not None and "no method selected" in explorer.error
        return
    assert explorer.error is None
    expected = sorted((float(r["trainable_pct"]), float(r["test_accuracy"])) for r in explorer.results.runs
                      if r["size"] == state["size"] and r["task"] == state["task"] and r["phase"] == "grid"
                      and r["status"] == "ok" and r["method"] in state["methods"])
    plotted = sorted(tuple(p) for c in explorer.ax_tradeoff.collections for p in c.get_offsets())
    assert np.allclose(plotted, expected)
    # each dot's name sits at its dot and names the method whose row it is; the rest of the pool is hidden
    named = sorted((float(r["trainable_pct"]), float(r["test_accuracy"]), r["method"]) for r in explorer.results.runs
                   if r["size"] == state["size"] and r["task"] == state["task"] and r["phase"] == "grid"
                   and r["status"] == "ok" and r["method"] in state["methods"])
    shown = [t for t in explorer.names if t.get_visible()]
    assert sorted((*t.get_position(), t.get_text()) for t in shown) == named
    colours = {tuple(np.round(c, 6)) for c in explorer.dots.get_facecolor()}
    assert len(colours) == len({explorer.colors[r["chapter"]] for r in explorer.results.grid(state["size"], state["task"])
                                if r["method"] in state["methods"]})
    assert_legend_outside(explorer.ax_tradeoff)
    assert_legend_outside(explorer.ax_scale)
    check_frame(explorer)
    assert_limits_contain(explorer.ax_tradeoff, [p[0] for p in plotted], [p[1] for p in plotted], "trade-off dots")
    for line in explorer.ax_scale.get_lines()[:-1]:  # the last is chance
        method = line.get_label()
        rows = [r for r in explorer.results.grid(task=state["task"]) if r["method"] == method]
        assert list(line.get_ydata()) == [float(r["test_accuracy"]) for r in rows]
