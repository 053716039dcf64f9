"""Multi-task methods (chapter 08): peft parity with several tasks, per-task cost, one-line refusals, memory.

The registry matrix already counts every method three ways over the zoo; here: what a multi-task method adds
beyond it (task ids, the cost of one more task, peft parity with more than one task).
"""

from __future__ import annotations

import pytest
import torch

from survey_utils.counting import apply_method
from survey_utils.errors import SurveyError
from survey_utils.memory.closed_form import estimate
from survey_utils.memory.simulation import simulate
from survey_utils.methods import list_methods
from survey_utils.parity import parity
from survey_utils.zoo import build_model, load_config

pytestmark = pytest.mark.filterwarnings("ignore")
TASKED = [m for m in list_methods() if m.takes_task_ids]
MULTI = [m for m in list_methods() if m.tasks_hp is not None]


def test_the_family_is_registered_with_its_task_fields() -> None:
    assert {m.family for m in MULTI} == {"multi_task"}
    assert len(TASKED) >= 2
    for method in MULTI:
        assert method.chapter == "08_multi_task" and method.tasks_hp in method.defaults()


@pytest.mark.parametrize("method", [m for m in TASKED if m.peft_config is not None], ids=lambda m: m.name)
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-t5"])
def test_peft_parity_with_three_tasks(method, model: str) -> None:
    """Three tasks, two examples of different tasks per batch: ours == peft's, where peft's forward runs."""
    settings = {method.tasks_hp: 3}
    try:
        method.resolve(load_config(model), **settings)
    except SurveyError:
        pytest.skip(f"{method.name} does not apply to {model}")
    try:
        report = parity(model, method, **settings)
    except (ValueError, TypeError) as error:  # peft's own forward fails (see the method's notes)
        assert model in ("tiny-bert", "tiny-t5"), f"{method.name} on {model}: {error}"
        pytest.skip(f"peft's {method.name} forward fails on {model}: {str(error)[:80]}")
    assert report.ok, report


@pytest.mark.parametrize("method", MULTI, ids=lambda m: m.name)
def test_each_added_task_costs_the_same(method) -> None:
    """Parameters added (trained, plus frozen where a task's module is trained beforehand: AdapterFusion's adapters,
    LoRAHub's modules) grow by the same amount with every task."""
    config = load_config("tiny-llama")
    counts = [method.added_params(config, **method.resolve(config, **{method.tasks_hp: t})) for t in (1, 2, 3, 10)]
    per_task = counts[1] - counts[0]
    assert per_task > 0 and counts[2] - counts[1] == per_task and counts[3] - counts[0] == 9 * per_task


def _tasked_model(method, tasks: int = 3):
    model = build_model("tiny-llama", seed=0)
    return apply_method(model, method, **{method.tasks_hp: tasks})


@pytest.mark.parametrize("method", TASKED, ids=lambda m: m.name)
def test_task_ids_route_examples_and_bad_ids_are_one_line(method) -> None:
    model = _tasked_model(method).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [model(input_ids=ids, task_ids=torch.tensor([k])).logits for k in range(3)]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    both = torch.cat([ids, ids])
    with torch.no_grad():
        joint = model(input_ids=both, task_ids=torch.tensor([2, 0])).logits
    assert torch.allclose(joint[0], outs[2][0], atol=1e-5) and torch.allclose(joint[1], outs[0][0], atol=1e-5)
    for bad, fragment in ((torch.tensor([3]), "task id 3 is out of range: this model serves 3 tasks"),
                          (torch.tensor([-1]), "task id -1 is out of range"),
                          (None, "task_ids must be passed"),
                          (torch.tensor([0, 1]), "task_ids has 2 entries for a batch of 1")):
        with pytest.raises(SurveyError, match=fragment) as info:
            model(input_ids=ids, task_ids=bad)
        assert "\n" not in str(info.value)


def test_poly_refuses_conv1d_and_splits_that_do_not_divide() -> None:
    from survey_utils.methods import get_method

    poly = get_method("poly")
    with pytest.raises(SurveyError, match="poly adapts linear modules"):
        poly.resolve(load_config("tiny-gpt2"))
    with pytest.raises(SurveyError, match="n_splits=3 does not divide"):
        poly.resolve(load_config("tiny-llama"), n_splits=3)
    with pytest.raises(SurveyError, match="n_skills=65 is above its maximum 64"):
        poly.resolve(load_config("tiny-llama"), n_skills=65)


@pytest.mark.parametrize(("model", "method", "hp"), [
    ("tiny-llama", "poly", {}),
    ("tiny-llama", "mpt", {}),
    ("tiny-bert", "poly", {"n_skills": 8}),
    ("tiny-llama", "moelora", {}),
    ("tiny-llama", "adapter_fusion", {}),
    ("tiny-bert", "adapter_fusion", {"num_sources": 4}),
])  # not LoRAHub: the simulation runs a backward pass, and LoRAHub's gradient-free search never does
def test_estimate_within_five_percent_of_the_simulation(model: str, method: str, hp: dict) -> None:
    est = estimate(model, method, hp, device="cpu", batch_size=2, seq_len=128)
    sim = simulate(model, method, hp, batch_size=2, seq_len=128)
    assert abs(est.total - sim.peak) / sim.peak < 0.05


# --- chapter 08's tiny multi-task setting and its results (survey_utils/experiments/ch08_multi_task.py) -------
def test_tasks_are_deterministic_and_follow_their_rules() -> None:
    from survey_utils.experiments.ch08_multi_task import FIRST_TOKEN, TASKS, make_task

    for task in TASKS:
        x, y = make_task(task, 64, seed=0)
        again, _ = make_task(task, 64, seed=0)
        assert torch.equal(x, again) and int(y.min()) >= 0 and int(y.max()) <= 3
    x, y = make_task("sum", 64)
    assert torch.equal(y, (x[:, 0] + x[:, -1] - 2 * FIRST_TOKEN) % 4)
    with pytest.raises(SurveyError, match="task 'copy' is not one of first, last, sum, max"):
        make_task("copy", 4)


def test_results_csv_says_how_it_was_made_and_the_plot_shows_it() -> None:
    from survey_utils.experiments.ch08_multi_task import (
        COLUMNS,
        RESULTS_PATH,
        load_results,
        per_task_cost,
        plot_results,
    )

    rows = load_results()
    assert RESULTS_PATH.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert {r["command"] for r in rows} == {"python -m survey_utils.experiments.ch08_multi_task"}
    config = load_config("tiny-llama")
    for row in rows:  # the counts in the CSV are the closed forms
        method = get_method_by_name(row["method"])
        hp = dict(item.split("=") for item in row["settings"].split())
        hp = {k: method.hyperparam(k).parse(v) for k, v in hp.items()}
        if method.tasks_hp and method.tasks_hp not in hp:  # the task-indexed methods serve all four tasks
            hp[method.tasks_hp] = 4
        assert int(row["trainable_params"]) == method.count(config, **hp)
    cost = {r["method"]: r for r in per_task_cost(rows)}
    assert cost["lora"]["params per added task"] > cost["poly"]["params per added task"]
    if "adapter_fusion" in cost:  # a new target task costs its own fusion layer; LoRAHub's costs N weights
        from survey_utils.experiments.ch08_multi_task import SEARCH_BUDGET, SETTINGS

        fusion = get_method_by_name("adapter_fusion").count(config, **SETTINGS["adapter_fusion"])
        assert cost["adapter_fusion"]["params per added task"] == fusion
        assert cost["lorahub"]["params per added task"] == SETTINGS["lorahub"]["num_sources"]
        assert cost["lorahub"]["steps on the new task"] == SEARCH_BUDGET
    fig = plot_results(rows)
    heights = sorted(p.get_height() for p in fig.axes[0].patches)
    assert heights == sorted(float(r["eval_accuracy"]) for r in rows)


def get_method_by_name(name: str):
    from survey_utils.methods import get_method

    return get_method(name)


# --- AdapterFusion, MOELoRA, LoRAHub: what their layers do beyond the count ------------------------------------
def _trained_pfeiffer(seed: int):
    """A tiny-llama with Pfeiffer adapters whose up-projections are non-zero (a stand-in for a trained adapter)."""
    model = apply_method(build_model("tiny-llama", seed=0), "pfeiffer")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def test_fusion_of_one_adapter_is_that_adapter_and_attends_over_several() -> None:
    """N = 1: softmax over one adapter is 1 and V = I (+1e-6), so fusion reproduces the adapter's model;
    N = 2: the fusion's weights are a distribution over the two adapters at every position."""
    from survey_utils.methods.layers.multi_task import AdapterFusionLayer, load_fusion_sources

    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    source = _trained_pfeiffer(1)
    fused = apply_method(build_model("tiny-llama", seed=0), "adapter_fusion", num_sources=1).eval()
    assert load_fusion_sources(fused, [source]) > 0
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-3, rtol=1e-3)
    two = apply_method(build_model("tiny-llama", seed=0), "adapter_fusion", num_sources=2).eval()
    load_fusion_sources(two, [source, _trained_pfeiffer(2)])
    layer = next(m for m in two.modules() if isinstance(m, AdapterFusionLayer))
    _, weights = layer.attention(torch.randn(3, 5, layer.fusion_query.shape[0]))
    assert weights.shape == (3, 5, 2) and torch.allclose(weights.sum(-1), torch.ones(3, 5))
    trainable = {n for n, p in two.named_parameters() if p.requires_grad}
    assert trainable and all(".fusion_" in n for n in trainable)


def test_fusing_adapters_from_another_model_is_one_line() -> None:
    from survey_utils.methods.layers.multi_task import load_fusion_sources

    fused = apply_method(build_model("tiny-llama", seed=0), "adapter_fusion", num_sources=1)
    other = apply_method(build_model("tiny-llama", seed=0), "pfeiffer", reduction_factor=8.0)
    with pytest.raises(SurveyError, match=r"source 0's .* has shape .* adapters trained on a different model") as info:
        load_fusion_sources(fused, [other])
    assert "\n" not in str(info.value)
    with pytest.raises(SurveyError, match="source 0 has no adapter at"):
        load_fusion_sources(fused, [build_model("tiny-llama", seed=0)])
    with pytest.raises(SurveyError, match="2 source models for 1 fused adapters"):
        load_fusion_sources(fused, [other, other])


def test_moelora_gates_are_distributions_and_r_must_split() -> None:
    from survey_utils.methods import get_method
    from survey_utils.methods.layers.multi_task import MoELoRALinear

    model = apply_method(build_model("tiny-llama", seed=0), "moelora", n_tasks=3, num_experts=4)
    layer = next(m for m in model.modules() if isinstance(m, MoELoRALinear))
    gate = layer.gate(torch.tensor([0, 1, 2]))
    assert gate.shape == (3, 4) and torch.allclose(gate.sum(-1), torch.ones(3))
    assert not torch.allclose(gate[0], gate[1])  # tasks route differently from the start
    with pytest.raises(SurveyError, match="r=8 does not split over num_experts=3"):
        get_method("moelora").resolve(load_config("tiny-llama"), num_experts=3)
    with pytest.raises(SurveyError, match="num_experts=65 is above its maximum 64"):
        get_method("moelora").resolve(load_config("tiny-llama"), num_experts=65)


def test_lorahub_shares_one_weight_vector_merges_and_its_search_finds_a_known_optimum() -> None:
    from survey_utils.methods.common import merge
    from survey_utils.methods.layers.multi_task import LoraHubLinear, search_weights

    model = apply_method(build_model("tiny-llama", seed=0), "lorahub", num_sources=3).eval()
    layers = [m for m in model.modules() if isinstance(m, LoraHubLinear)]
    assert len({id(m.lorahub_weights) for m in layers}) == 1 and len(layers) > 1
    with torch.no_grad():
        for layer in layers:
            layer.lorahub_B.normal_(0, 0.1)
        layers[0].lorahub_weights.copy_(torch.tensor([0.5, -1.0, 0.25]))
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        composed = model(input_ids=ids).logits
        merged = merge(model)(input_ids=ids).logits
    torch.testing.assert_close(merged, composed, atol=1e-4, rtol=1e-4)
    target = torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64)
    best, value = search_weights(lambda w: float(((w - target) ** 2).sum()), 3, budget=300, seed=0)
    assert value < 1e-3 and torch.allclose(best, target, atol=0.05)
    again, _ = search_weights(lambda w: float(((w - target) ** 2).sum()), 3, budget=300, seed=0)
    assert torch.equal(best, again)


def test_spot_transfers_the_most_similar_source_prompt_and_refuses_other_shapes() -> None:
    from survey_utils.methods.layers.multi_task import prompt_similarity, transfer_prompt

    model = apply_method(build_model("tiny-llama", seed=0), "spot", num_virtual_tokens=4)
    width = model.prompt_encoder.embedding.weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    sources = [torch.randn(4, width, generator=generator) for _ in range(3)]
    probe = sources[1] + 0.1 * torch.randn(4, width, generator=generator)  # task 1's prompt, slightly moved
    similarities = [prompt_similarity(s, probe) for s in sources]
    assert max(range(3), key=similarities.__getitem__) == 1
    assert transfer_prompt(model, sources, probe) == 1
    assert torch.equal(model.prompt_encoder.embedding.weight.detach(), sources[1])
    with pytest.raises(SurveyError, match=r"source prompt 2 has shape \(5, .*trained on another model") as info:
        transfer_prompt(model, [sources[0], sources[1], torch.zeros(5, width)], probe)
    assert "\n" not in str(info.value)


def test_lorahub_refuses_modules_of_another_shape_in_one_line() -> None:
    from survey_utils.methods.layers.multi_task import load_lorahub_sources

    hub = apply_method(build_model("tiny-llama", seed=0), "lorahub", num_sources=1)
    other_rank = apply_method(build_model("tiny-llama", seed=0), "lora", r=4)
    with pytest.raises(SurveyError, match="source 0's LoRA at .* another model or rank") as info:
        load_lorahub_sources(hub, [other_rank])
    assert "\n" not in str(info.value)
    same = apply_method(build_model("tiny-llama", seed=0), "lora", r=8, lora_alpha=8.0)
    assert load_lorahub_sources(hub, [same]) > 0
