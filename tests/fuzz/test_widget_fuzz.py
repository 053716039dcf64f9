"""Fuzz every chapter widget through its Python API: random states, in and out of bounds, no traceback.

One explorer per test lives through all examples (as a reader's does): each example draws a sequence of
control changes (model over the whole zoo, method over the whole registry, every hyper-parameter control
set to random values, sliders past their bounds, which ipywidgets clamps, target checkboxes toggled) and
direct ``compute(...)`` calls with values no control offers (negative, huge, NaN, wrong types, unknown
names). After every step:

- no exception escapes: a bad setting is a ``SurveyError`` shown as one line in the message area, with the
  last valid plot kept;
- the plot data is the pure function of the controls (``compute(**state)`` again gives the same view), is
  consistent with the registry's closed form, and the artists show it;
- where the explorer redrew by reusing its cached frame, the pixels equal a full render (``check_frame``).
"""

from __future__ import annotations

import html
import math
from contextlib import contextmanager

import hypothesis.strategies as st
import ipywidgets as W
import matplotlib.pyplot as plt
import pytest
from hypothesis import given

from survey_utils.counting import closed_form
from survey_utils.errors import SurveyError
from survey_utils.methods import get_method, list_methods
from survey_utils.plotting import human
from survey_utils.widgets import MethodExplorer
from survey_utils.zoo import list_models
from tests.fuzz._settings import FUZZ, Counter, run_counted
from tests.widgets.plot_truth import check_frame, check_memory, check_params

pytestmark = pytest.mark.filterwarnings("ignore")

MODELS = list_models()
METHODS = [m.name for m in list_methods()]

# Values no control offers: what a notebook cell or a script may pass to compute() directly.
WILD = st.one_of(
    st.integers(-10**12, 10**12), st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.lists(st.text(max_size=8), max_size=3), st.lists(st.integers(-5, 200), max_size=4),
    st.sampled_from(["q_proj", "v_proj", "all-linear", ".*", "[", "c_attn", "query", "fc1"]),
    st.sampled_from([math.inf, -math.inf, math.nan, 0, -1, 10**18, 0.5, 1e300]),
)


def plausible(hp) -> st.SearchStrategy:
    """Values a control would offer for this hyper-parameter (so that valid states stay common)."""
    if hp.choices is not None:
        return st.sampled_from(list(hp.choices))
    low = hp.minimum if hp.minimum is not None else 0
    high = hp.maximum if hp.maximum is not None else 256
    if hp.type == "int":
        return st.integers(int(low), int(high))
    if hp.type == "float":
        return st.floats(float(low), float(high))
    if hp.type == "bool":
        return st.booleans()
    return st.just(hp.default)


def assert_one_line(error: str | None) -> None:
    if error is not None:
        assert isinstance(error, str) and error.strip(), f"empty error message {error!r}"
        assert "\n" not in error, f"the error message has several lines: {error!r}"
        assert "Traceback" not in error


def _slider_value(data: st.DataObject, control: W.Widget):
    """A value for a control: in range, at the ends, or far outside (sliders and bounded boxes clamp)."""
    if isinstance(control, W.IntRangeSlider):
        a, b = sorted(data.draw(st.lists(st.integers(control.min - 50, control.max + 50), min_size=2,
                                         max_size=2), label="range"))
        return (a, b)
    if isinstance(control, (W.IntSlider, W.BoundedIntText)):
        return data.draw(st.one_of(st.integers(control.min, control.max), st.sampled_from([control.min, control.max]),
                                   st.integers(-10**9, 10**9)), label="int")
    if isinstance(control, W.FloatSlider):
        return data.draw(st.one_of(st.floats(control.min, control.max), st.floats(-1e12, 1e12)), label="float")
    if isinstance(control, W.Checkbox):
        return data.draw(st.booleans(), label="bool")
    if isinstance(control, W.Dropdown):
        return data.draw(st.sampled_from(list(control.options)), label="choice")
    raise AssertionError(f"the fuzz does not know how to set a {type(control).__name__}")


def _check_params_view(explorer: MethodExplorer) -> None:
    """The shown view is compute(state), agrees with the closed form, and the artists show it."""
    assert_one_line(explorer.error)
    view = explorer.view
    if explorer.error is not None:
        assert explorer.error in html.unescape(explorer.message.value)
        return
    state = explorer.state
    assert explorer.message.value == ""
    assert (view.model, view.method) == (state["model"], state["method"])
    assert explorer.compute(**state) == view, "compute() is not a pure function of the controls"
    count = closed_form(state["model"], state["method"], **state["hp"])
    assert (view.trainable, view.total) == (count.trainable, count.total)
    assert 0 <= view.trainable <= view.total and view.total > 0
    assert 0 <= view.percent <= 100
    assert len(view.sweep_x) == len(view.sweep_y) and view.sweep_x == sorted(view.sweep_x)
    assert all(y >= 0 for y in view.sweep_y)
    if view.sweep_name is not None and state["hp"][view.sweep_name] >= 1:
        assert view.current_x == state["hp"][view.sweep_name]
    xs, ys = explorer.sweep_line.get_data()
    assert list(xs) == view.sweep_x and list(ys) == view.sweep_y
    assert human(view.trainable) in explorer.ax_sweep.get_title()
    assert [name for name, _ in view.comparison] == [m.name for m in explorer.methods]
    for bar, (name, percent) in zip(explorer.bars, view.comparison, strict=True):
        if math.isfinite(percent) and percent > 0:
            assert bar.get_width() == pytest.approx(percent), name
        if name == view.method:
            assert percent == pytest.approx(view.percent), "the comparison bar disagrees with the sweep panel"
    check_params(explorer)  # every artist against the closed form, limits contain the data


@contextmanager
def fresh(explorer_class, *args, **kwargs):
    """A new explorer per example (hypothesis replays an example; state left over would change it)."""
    explorer = explorer_class(*args, **kwargs)
    try:
        yield explorer
    finally:
        plt.close(explorer.fig)


def test_method_explorer_fuzz() -> None:
    @FUZZ
    @given(data=st.data())
    def fuzz(counter: Counter, data: st.DataObject) -> None:
        counter()
        # A few methods per explorer, drawn: one with all ~50 took ~6 s to build and lay out per example (its
        # comparison panel has a bar each), 10 CPU minutes at 100 examples. Across a run's examples most methods are
        # shown, and the compute() steps draw from all of them.
        shown = data.draw(st.lists(st.sampled_from(METHODS), max_size=5, unique=True), label="methods shown")
        shown = ["lora", *(m for m in shown if m != "lora")]
        with fresh(MethodExplorer, shown, models=MODELS, model="llama-2-7b", method="lora") as explorer:
            steps(counter, data, explorer)

    run_counted("MethodExplorer", fuzz)


def steps(counter: Counter, data: st.DataObject, explorer: MethodExplorer) -> None:
    for _ in range(data.draw(st.integers(1, 6), label="steps")):
        action = data.draw(st.sampled_from(["model", "method", "control", "targets", "compute"]), label="action")
        previous = explorer.view
        if action == "model":
            explorer.model_control.value = data.draw(st.sampled_from(MODELS), label="model")
        elif action == "method":
            explorer.method_control.value = data.draw(st.sampled_from(explorer.method_control.options),
                                                      label="method")
        elif action == "control":
            simple = {k: c for k, c in explorer.hp_controls.items() if not hasattr(c, "boxes")}
            if not simple:
                continue
            name = data.draw(st.sampled_from(sorted(simple)), label="control")
            simple[name].value = _slider_value(data, simple[name])
        elif action == "targets":
            boxes = [b for c in explorer.hp_controls.values() if hasattr(c, "boxes") for b in c.boxes]
            if not boxes:
                continue
            box = data.draw(st.sampled_from(boxes), label="target box")
            box.value = not box.value
        else:
            method = data.draw(st.sampled_from(METHODS), label="compute method")
            specs = get_method(method).hyperparams
            chosen = data.draw(st.lists(st.sampled_from(specs), max_size=4, unique_by=lambda h: h.name),
                               label="hps") if specs else []
            hp = {h.name: data.draw(WILD if data.draw(st.integers(0, 2), label="wild?") == 0 else plausible(h),
                                    label=h.name) for h in chosen}
            if data.draw(st.integers(0, 9), label="unknown hp?") == 0:
                hp[data.draw(st.text(min_size=1, max_size=8), label="unknown name")] = 1
            model = data.draw(st.sampled_from(MODELS), label="compute model")
            if data.draw(st.integers(0, 9), label="unknown model?") == 0:
                model = data.draw(st.text(max_size=10), label="model name")
            if data.draw(st.integers(0, 9), label="unknown method?") == 0:
                method = data.draw(st.text(max_size=10), label="method name")
            try:
                view = explorer.compute(model=model, method=method, hp=hp)
            except SurveyError as error:
                assert_one_line(str(error))
                counter.event("compute() refused")
            else:
                counter.event("compute() valid")
                count = closed_form(model, method, **hp)
                assert (view.trainable, view.total) == (count.trainable, count.total)
            continue
        if explorer.error is not None:
            assert explorer.view is previous, "an invalid setting replaced the last valid plot"
        counter.event("widget error shown" if explorer.error else "widget valid")
        _check_params_view(explorer)
        if data.draw(st.booleans(), label="compare frames"):  # a reused frame equals a full render
            counter.event("reused frame" if check_frame(explorer) else "frame rendered")


def _memory_explorer_class():
    try:
        from survey_utils.widgets.memory import MemoryExplorer
    except ImportError as error:  # the memory view is written in parallel; the test joins when it lands
        pytest.fail(f"survey_utils.widgets.memory is not importable: {error}")
    return MemoryExplorer


def _check_memory_view(explorer) -> None:
    assert_one_line(explorer.error)
    if explorer.error is not None:
        assert explorer.error in html.unescape(explorer.message.value)
        return
    view = explorer.view
    state = explorer.state
    fresh = explorer.compute(**state)
    assert fresh.estimate.total == view.estimate.total and fresh.totals == view.totals
    result = view.estimate
    assert result.total > 0 and result.weights > 0
    assert all(v >= 0 for v in view.terms.values()), view.terms
    assert len(view.seq_lens) == len(view.fixed) == len(view.growing) == len(view.totals) > 0
    assert view.seq_lens == sorted(view.seq_lens)
    assert all(max(f, g) <= t for f, g, t in zip(view.fixed, view.growing, view.totals, strict=True))
    assert all(g >= 0 for g in view.growing), "activations + logits must not be negative"
    if view.crossover is not None:
        assert view.crossover in view.seq_lens
    xs, ys = explorer.lines["totals"].get_data()
    assert list(xs) == view.seq_lens
    assert list(ys) == pytest.approx([t / 2**30 for t in view.totals])
    assert list(explorer.current.get_xdata()) == [state["seq_len"]] * 2
    check_memory(explorer)  # every artist against the memory model's own terms, limits contain the data


MEMORY_WILD = {
    "batch_size": st.one_of(st.integers(-5, 0), st.integers(1, 4096), st.integers(10**6, 10**12),
                            st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.none()),
    "seq_len": st.one_of(st.integers(-5, 0), st.integers(1, 10**6), st.integers(10**7, 10**12),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.none()),
    "dtype": st.one_of(st.sampled_from(["bf16", "fp16", "fp32", "fp8", "int8", "", "BF16"]), st.none()),
    "optimizer": st.one_of(st.sampled_from(["adamw", "adamw8bit", "sgd", "adafactor", "adam", "lion", ""]),
                           st.none()),
    "gradient_checkpointing": st.one_of(st.booleans(), st.none(), st.integers(-1, 2)),
    "rank": st.one_of(st.integers(-3, 0), st.integers(1, 512), st.integers(10**6, 10**12),
                      st.floats(allow_nan=True, allow_infinity=True), st.none()),
}


def test_memory_explorer_fuzz() -> None:
    explorer_class = _memory_explorer_class()

    @FUZZ
    @given(data=st.data())
    def fuzz(counter: Counter, data: st.DataObject) -> None:
        counter()
        with fresh(explorer_class) as explorer:
            memory_steps(counter, data, explorer)

    run_counted("MemoryExplorer", fuzz)


def memory_steps(counter: Counter, data: st.DataObject, explorer) -> None:
    controls = explorer.controls
    for _ in range(data.draw(st.integers(1, 5), label="steps")):
        name = data.draw(st.sampled_from(sorted(controls) + ["compute"]), label="control")
        previous = explorer.view
        if name == "compute":
            state = {**explorer.state, "simulate": False}
            for key in data.draw(st.lists(st.sampled_from(sorted(MEMORY_WILD)), max_size=3, unique=True),
                                 label="wild keys"):
                state[key] = data.draw(MEMORY_WILD[key], label=key)
            if data.draw(st.booleans(), label="wild model"):
                state["model"] = data.draw(st.text(max_size=10), label="model name")
            if data.draw(st.booleans(), label="wild method"):
                state["method"] = data.draw(st.text(max_size=10), label="method name")
            try:
                view = explorer.compute(**state)
            except SurveyError as error:
                assert_one_line(str(error))
                counter.event("compute() refused")
            else:
                counter.event("compute() valid")
                assert view.estimate.total > 0
            continue
        if name == "simulate":
            continue  # the fake-tensor step takes seconds per 7B model: tests/memory covers it
        controls[name].value = _slider_value(data, controls[name])
        if explorer.error is not None:
            assert explorer.view is previous, "an invalid setting replaced the last valid plot"
        counter.event("widget error shown" if explorer.error else "widget valid")
        _check_memory_view(explorer)
        if data.draw(st.booleans(), label="compare frames"):
            counter.event("reused frame" if check_frame(explorer) else "frame rendered")


# What the fuzz found, pinned: a non-finite number for an integer hyper-parameter must be a one-line
# SurveyError in the explorer's compute (and so in every widget built on the registry), not an
# OverflowError or a ValueError from int(). One test per value, over every integer hyper-parameter.
def _outcomes_other_than_survey_error(model: str, types: tuple[str, ...], value: float,
                                      accepting_is_wrong: bool) -> list[str]:
    """Give ``value`` to every hyper-parameter of these types of every method; list what is not a
    one-line SurveyError (and, when ``accepting_is_wrong``, every setting that was accepted)."""
    escaped = []
    with fresh(MethodExplorer, ["lora"], models=MODELS, model=model) as explorer:
        for method in list_methods():
            for hp in (h for h in method.hyperparams if h.type in types):
                try:
                    explorer.compute(model=model, method=method.name, hp={hp.name: value})
                except SurveyError as error:
                    assert_one_line(str(error))
                except Exception as error:  # noqa: BLE001 - the point is to list what escapes
                    escaped.append(f"compute(model={model!r}, method={method.name!r}, hp={{{hp.name!r}: "
                                   f"{value}}}) -> {type(error).__name__}: {error}")
                else:
                    if accepting_is_wrong:
                        escaped.append(f"{method.name} {hp.name}={value} was accepted")
    return escaped


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_compute_refuses_non_finite_integers(value: float) -> None:
    escaped = _outcomes_other_than_survey_error("llama-2-7b", ("int",), value, accepting_is_wrong=True)
    assert not escaped, f"{len(escaped)} non-SurveyError outcomes:\n" + "\n".join(escaped)


# Also found by the fuzz: a number where a list hyper-parameter is expected (target_modules,
# layers_to_transform) must be a SurveyError, not "TypeError: 'float' object is not iterable".
@pytest.mark.parametrize("value", [0.0, 1.5], ids=["0.0", "1.5"])
def test_compute_refuses_numbers_for_lists(value: float) -> None:
    escaped = _outcomes_other_than_survey_error("tiny-gpt2", ("targets", "int_list", "str_list"), value,
                                                accepting_is_wrong=False)
    assert not escaped, f"{len(escaped)} non-SurveyError outcomes:\n" + "\n".join(escaped)
