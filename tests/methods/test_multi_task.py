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
    ("tiny-llama", "attempt", {}),
    ("tiny-bert", "attempt", {"num_sources": 3, "num_virtual_tokens": 20}),
    ("tiny-llama", "xlora", {}),
    ("tiny-gpt2", "xlora", {"num_adapters": 4, "layerwise_scalings": True}),
    ("tiny-llama", "lorahub", {}),  # gradient-free: both sides model a forward-only step (Method.gradient_free)
])
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
    if "attempt" in cost:  # a new target task costs ATTEMPT its prompt and attention module, X-LoRA its classifier
        from survey_utils.experiments.ch08_multi_task import SETTINGS, STEPS_PER_TASK

        for name in ("attempt", "xlora"):
            assert cost[name]["params per added task"] == get_method_by_name(name).count(config, **SETTINGS[name])
            assert cost[name]["steps on the new task"] == STEPS_PER_TASK
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


# --- ATTEMPT: attention over frozen source prompts and the target prompt ------------------------------------------
def _attempt(**hp):
    return apply_method(build_model("tiny-llama", seed=0), "attempt", **{"num_virtual_tokens": 4, **hp})


def test_attempt_attends_per_example_and_its_weights_are_a_distribution() -> None:
    """Weights over [sources..., target] sum to one for every example and depend on the example's input."""
    from survey_utils.methods.layers.multi_task import load_attempt_sources

    model = _attempt(num_sources=3).eval()
    width = model.prompt_encoder.embedding.weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    assert load_attempt_sources(model, [torch.randn(4, width, generator=generator) for _ in range(3)]) == 3
    pooled = torch.randn(5, width, generator=generator) * 10
    weights = model.prompt_encoder.attention(pooled)
    assert weights.shape == (5, 4) and torch.allclose(weights.sum(-1), torch.ones(5))
    assert not torch.allclose(weights[0], weights[1])
    ids = torch.randint(0, 200, (2, 7), generator=generator)
    with torch.no_grad():
        model(input_ids=ids)
        assert torch.equal(model.prompt_encoder.pooled, model.get_input_embeddings()(ids).max(dim=1).values)


def test_attempt_with_zero_sources_is_a_scaled_target_prompt() -> None:
    """Sources all zero (before any is loaded): P = P_target + a_target P_target, the target alone, rescaled."""
    model = _attempt(num_sources=2, temperature=1.0)
    encoder = model.prompt_encoder
    encoder.pooled = torch.randn(3, encoder.embedding.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prompts = encoder(3)
        a_target = encoder.attention(encoder.pooled)[:, -1]
    target = encoder.embedding.weight
    torch.testing.assert_close(prompts, (1 + a_target)[:, None, None] * target)
    assert 0 < float(a_target.min()) and float(a_target.max()) < 1  # the zero sources still take some weight


def test_attempt_trains_the_target_and_g_only_and_its_count_ignores_the_sources() -> None:
    from survey_utils.methods import get_method

    model = _attempt(num_sources=3)
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters() if p.requires_grad}
    assert grads == {"prompt_encoder.embedding.weight": True, "prompt_encoder.attn_W_down": True,
                     "prompt_encoder.attn_W_up": True}
    assert model.prompt_encoder.attempt_sources.grad is None
    config = load_config("tiny-llama")
    attempt = get_method("attempt")
    assert len({attempt.count(config, num_sources=t) for t in (1, 6, 20)}) == 1
    n, d, r = 100, 128, 100  # the defaults (authors' prefix_dim and G's width) on tiny-llama's width
    assert attempt.count(config) == n * d + 2 * r * d
    assert attempt.frozen_added_params(config, **attempt.resolve(config)) == 6 * n * d


def test_attempt_loads_sources_and_refuses_bad_settings_in_one_line() -> None:
    from survey_utils.methods import get_method
    from survey_utils.methods.layers.multi_task import load_attempt_sources

    model = _attempt(num_sources=2)
    width = model.prompt_encoder.embedding.weight.shape[1]
    first, second = torch.ones(4, width), torch.full((4, width), 2.0)
    load_attempt_sources(model, [first, second])
    assert torch.equal(model.prompt_encoder.embedding.weight.detach(), first)  # the target starts at source 0
    for call, fragment in ((lambda: load_attempt_sources(model, [first]), "1 source prompts for 2 sources"),
                           (lambda: load_attempt_sources(model, [first, torch.ones(5, width)]),
                            r"source prompt 1 has shape \(5, 128\)"),
                           (lambda: load_attempt_sources(build_model("tiny-llama"), [first]), "apply attempt first")):
        with pytest.raises(SurveyError, match=fragment) as info:
            call()
        assert "\n" not in str(info.value)
    attempt, config = get_method("attempt"), load_config("tiny-llama")
    for bad, fragment in (({"num_sources": 0}, "num_sources=0 is below its minimum 1"),
                          ({"attn_dim": 0}, "attn_dim=0 is below its minimum 1"),
                          ({"temperature": 0.0}, "temperature=0.0 must be positive"),
                          ({"num_virtual_tokens": 512}, "do not fit tiny-llama's context of 512")):
        with pytest.raises(SurveyError, match=fragment) as info:
            attempt.resolve(config, **bad)
        assert "\n" not in str(info.value)


# --- X-LoRA: frozen LoRA experts mixed per token by a classifier on the first pass's hidden states -----------------
XLORA_VARIANTS = [{}, {"num_adapters": 3, "layerwise_scalings": True, "xlora_depth": 3, "xlora_size": 16,
                       "top_k_lora": 2, "softmax_temperature": 0.5},
                  {"num_adapters": 3, "use_trainable_adapters": True, "enable_softmax": False,
                   "enable_softmax_topk": True, "global_scaling_weight": 0.7, "target_modules": ["q_proj", "o_proj"]}]


@pytest.mark.parametrize("hp", XLORA_VARIANTS, ids=["defaults", "layerwise-deep-topk", "trainable-experts"])
def test_xlora_counts_three_ways_and_outputs_equal_peft(hp: dict, tmp_path) -> None:
    """peft's XLoraModel over LoRA experts saved with peft: closed form == our model == peft's trainable and total
    counts, and, its classifier and experts copied into ours, the same logits (float64, tiny-llama)."""
    from survey_utils.counting import closed_form, count_parameters
    from survey_utils.methods.multi_task import load_xlora_from_peft, peft_xlora_model, save_lora_experts

    adapters = save_lora_experts("tiny-llama", str(tmp_path), **hp)
    theirs = peft_xlora_model("tiny-llama", adapters, dtype=torch.float64, **hp).eval()
    ours = apply_method(build_model("tiny-llama", seed=0, dtype=torch.float64), "xlora", **hp).eval()
    formula, built = closed_form("tiny-llama", "xlora", **hp), count_parameters(ours)
    assert (formula.trainable, formula.total) == (built.trainable, built.total) == theirs.get_nb_trainable_parameters()
    assert load_xlora_from_peft(ours, theirs) > 0
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, reference = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = build_model("tiny-llama", seed=0, dtype=torch.float64).eval()(input_ids=ids).logits
    assert (mine - reference).abs().max() < 1e-10
    assert (mine - base).abs().max() > 1e-3  # the experts (B drawn non-zero) change the model
    scalings = theirs.base_model.get_latest_scalings()
    torch.testing.assert_close(ours.xlora_context.scalings, scalings)


def test_chapter_08s_xlora_check_reports_peft_counts_and_outputs() -> None:
    from survey_utils.experiments.ch08_multi_task import xlora_against_peft

    row = xlora_against_peft(num_adapters=3)
    assert row["match"] and row["peft"] == row["formula"] and row["peft_total"] == row["total"]
    assert row["copied"] > 0 and row["max_diff"] < 1e-10


def test_peft_xlora_cannot_load_experts_outside_a_model_dot_backbone(tmp_path) -> None:
    """peft 0.21.2 rewrites every saved expert key to ``model.model.<...>`` (Llama's layout): GPT-2 (``transformer``)
    and BERT (``bert``) experts come back as unexpected keys, so its X-LoRA parity runs on tiny-llama only."""
    from survey_utils.methods.multi_task import peft_xlora_model, save_lora_experts

    for model in ("tiny-gpt2", "tiny-bert"):
        adapters = save_lora_experts(model, str(tmp_path / model))
        with pytest.raises(ValueError, match="Got unexpected keys"):
            peft_xlora_model(model, adapters)


def test_xlora_with_one_expert_is_that_lora_and_scalings_are_per_token_distributions() -> None:
    """N = 1 with softmax: every scaling is 1, so X-LoRA over a LoRA model's modules is that LoRA model; with several
    experts each token's scalings sum to one in every layer, and the first pass reads the base model (value 0)."""
    from survey_utils.methods.layers.multi_task import load_xlora_experts

    lora = apply_method(build_model("tiny-llama", seed=0), "lora").eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in lora.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    one = apply_method(build_model("tiny-llama", seed=0), "xlora", num_adapters=1).eval()
    assert load_xlora_experts(one, [lora]) > 0
    ids = torch.randint(0, 200, (2, 7), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(one(input_ids=ids).logits, lora(input_ids=ids).logits)
    three = apply_method(build_model("tiny-llama", seed=0), "xlora", num_adapters=3, layerwise_scalings=True).eval()
    load_xlora_experts(three, [lora, lora, lora])
    with torch.no_grad():
        three(input_ids=ids)
    scalings = three.xlora_context.scalings
    assert scalings.shape == (2, 7, 8, 3) and torch.allclose(scalings.sum(-1), torch.ones(2, 7, 8))
    with pytest.raises(SurveyError, match="2 source models for 3 X-LoRA experts"):
        load_xlora_experts(three, [lora, lora])
    with pytest.raises(SurveyError, match="source 0's LoRA at .* another model or rank"):
        load_xlora_experts(one, [apply_method(build_model("tiny-llama", seed=0), "lora", r=4)])


def test_xlora_refuses_bad_settings_in_one_line() -> None:
    from survey_utils.methods import get_method

    xlora, llama = get_method("xlora"), load_config("tiny-llama")
    for config, bad, fragment in ((llama, {"num_adapters": 0}, "num_adapters=0 is below its minimum 1"),
                                  (llama, {"r": 0}, "r=0 is below its minimum 1"),
                                  (llama, {"top_k_lora": 3}, "top_k_lora=3 is more than num_adapters=2"),
                                  (llama, {"softmax_temperature": 0.0}, "softmax_temperature=0.0 must be positive"),
                                  (load_config("tiny-t5"), {}, "tiny-t5 is encoder-decoder")):
        with pytest.raises(SurveyError, match=fragment) as info:
            xlora.resolve(config, **bad)
        assert "\n" not in str(info.value)
    model = apply_method(build_model("tiny-llama", seed=0), xlora)
    with pytest.raises(SurveyError, match="X-LoRA needs input_ids or inputs_embeds"):
        model(attention_mask=torch.ones(1, 3))
