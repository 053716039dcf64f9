"""Fuzz the prompt-length explorer: random control values and wild compute() states; nothing escapes but
a one-line message, and an invalid state keeps the last valid plot."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from survey_utils.errors import SurveyError
from survey_utils.widgets.prompts import PromptLengthExplorer
from survey_utils.zoo import list_models
from tests.fuzz._settings import FUZZ, Counter, run_counted
from tests.widgets.plot_truth import check_frame, check_prompts

WILD = st.one_of(st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                 st.none(), st.text(max_size=4))


def test_prompt_length_explorer_fuzz() -> None:
    explorer = PromptLengthExplorer(model="tiny-llama")

    @FUZZ
    @given(data=st.data())
    def fuzz(counter: Counter, data: st.DataObject) -> None:
        counter()
        for _ in range(data.draw(st.integers(1, 3), label="steps")):
            previous = explorer.view
            name = data.draw(st.sampled_from(["model", "num_virtual_tokens", "seq_len", "batch_size",
                                              "prefix_projection", "compute"]), label="control")
            if name == "compute":
                state = dict(explorer.state)
                key = data.draw(st.sampled_from(["num_virtual_tokens", "seq_len", "batch_size", "model"]))
                state[key] = data.draw(WILD if key != "model" else st.text(max_size=12), label=key)
                try:
                    view = explorer.compute(**state)
                except SurveyError as error:
                    assert "\n" not in str(error)
                    counter.event("compute() refused")
                else:
                    assert view.n in view.lengths
                    counter.event("compute() valid")
                continue
            control = explorer.controls[name]
            if name == "model":
                control.value = data.draw(st.sampled_from(list_models()), label="model")
            elif name == "prefix_projection":
                control.value = data.draw(st.booleans(), label="mlp")
            else:
                control.value = data.draw(st.integers(control.min - 5, control.max + 5), label=name)
            # drawn whatever the outcome: the explorer lives across examples, so which branch runs is not a
            # function of this example's draws alone, and hypothesis needs the same draws on replay
            compare = data.draw(st.booleans(), label="compare frames")
            if explorer.error is not None:
                assert "\n" not in explorer.error and explorer.view is previous
                counter.event("widget error shown")
            else:
                view = explorer.view
                shown = explorer.markers["prompt_tuning"][0].get_ydata()[0]
                expected = view.trainable["prompt_tuning"][view.lengths.index(view.n)]
                assert (math.isnan(shown) and math.isnan(expected)) or shown == expected
                check_prompts(explorer)  # every line against the count and the memory model, limits contain it
                counter.event("widget valid")
                if compare:  # a reused frame equals a full render
                    counter.event("reused frame" if check_frame(explorer) else "frame rendered")

    run_counted("PromptLengthExplorer", fuzz)
