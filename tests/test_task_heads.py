"""Task heads (issue 12, item 5): the layout builds the head the config's class names, the head trains beside the
method as peft's task-type models train it (modules_to_save), and peft's printed total holds it twice."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from survey_utils.architecture import layout
from survey_utils.cli import main
from survey_utils.counting import closed_form, count, peft_model, three_way
from survey_utils.errors import SurveyError
from survey_utils.memory import estimate
from survey_utils.zoo import build_model, config_path, load_config


def head_config(tmp_path: Path, name: str, architecture: str, **fields: object) -> str:
    """A copy of the zoo's config ``name`` whose class is ``architecture`` (with ``fields`` set), as a path."""
    raw = json.loads(config_path(name).read_text(encoding="utf-8"))
    raw["architectures"] = [architecture]
    raw.update(fields)
    path = tmp_path / f"{name}-{architecture}.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return str(path)


# (zoo config, class, the modules peft wraps in ModulesToSaveWrapper)
HEADS = [
    ("tiny-bert", "BertForSequenceClassification", ("classifier",)),
    ("tiny-bert", "BertForTokenClassification", ("classifier",)),
    ("tiny-bert", "BertForQuestionAnswering", ("qa_outputs",)),
    ("roberta-base", "RobertaForSequenceClassification", ("classifier",)),
    ("roberta-base", "RobertaForQuestionAnswering", ("qa_outputs",)),
    ("tiny-gpt2", "GPT2ForSequenceClassification", ("score",)),
    ("tiny-gpt2", "GPT2ForTokenClassification", ("classifier",)),
    ("tiny-gpt2", "GPT2ForQuestionAnswering", ("qa_outputs",)),
    ("tiny-llama", "LlamaForSequenceClassification", ("score",)),
    ("tiny-llama", "LlamaForTokenClassification", ("score",)),
    ("tiny-llama", "LlamaForQuestionAnswering", ("qa_outputs",)),
    ("qwen2.5-0.5b", "Qwen2ForSequenceClassification", ("score",)),
    ("opt-350m", "OPTForSequenceClassification", ("score",)),
    ("opt-350m", "OPTForQuestionAnswering", ("qa_outputs",)),
    ("bloom-560m", "BloomForTokenClassification", ("classifier",)),
    ("tiny-t5", "T5ForSequenceClassification", ()),  # classification_head: neither classifier nor score
    ("tiny-t5", "T5ForTokenClassification", ("classifier",)),
    ("tiny-t5", "T5ForQuestionAnswering", ("qa_outputs",)),
    ("qwen3-0.6b", "Qwen3ForSequenceClassification", ("score",)),  # the generic layout
]


@pytest.mark.parametrize(("name", "architecture", "head"), HEADS, ids=[h[1] for h in HEADS])
def test_the_layout_builds_the_head_the_class_names(tmp_path: Path, name: str, architecture: str,
                                                    head: tuple[str, ...]) -> None:
    config = load_config(head_config(tmp_path, name, architecture, num_labels=3))
    shape = layout(config)
    built = {n: p.numel() for n, p in build_model(config, device="meta").named_parameters()}
    assert {f"{m.name}.{p}": n for m in shape.modules if not m.tied_to for p, n in m.params} == built
    assert shape.task_head == head
    assert shape.task_type == {"Seq": "SEQ_CLS", "Tok": "TOKEN_CLS", "Que": "QUESTION_ANS"}[
        architecture.split("For")[1][:3]]
    heads = [m for m in shape.modules if m.name.split(".")[0] in ("classifier", "score", "qa_outputs",
                                                                  "classification_head")]
    assert heads and all(m.component == "head" and m.layer is None for m in heads)
    assert not any(m.name == "lm_head" for m in shape.modules)  # the language-model head is gone


def test_the_head_has_num_labels_outputs(tmp_path: Path) -> None:
    shape = layout(load_config(head_config(tmp_path, "roberta-base", "RobertaForSequenceClassification",
                                           num_labels=7)))
    sizes = {m.name: dict(m.params) for m in shape.modules if m.name.startswith("classifier")}
    assert sizes == {"classifier.dense": {"weight": 768 * 768, "bias": 768},
                     "classifier.out_proj": {"weight": 768 * 7, "bias": 7}}
    assert shape.task_head_numel == 768 * 768 + 768 + 768 * 7 + 7


# Three ways: closed form == our built model == peft, with peft's task type passed (issue 12: LoRA, prompt tuning and
# (IA)^3 on a hand layout of each kind and one generic-layout type).
PARITY = [("tiny-bert", "BertForSequenceClassification"), ("tiny-llama", "LlamaForSequenceClassification"),
          ("tiny-gpt2", "GPT2ForTokenClassification"), ("qwen3-0.6b", "Qwen3ForSequenceClassification")]


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "ia3"])
@pytest.mark.parametrize(("name", "architecture"), PARITY, ids=[p[1] for p in PARITY])
def test_three_way_agreement_with_the_head_trained(tmp_path: Path, name: str, architecture: str,
                                                   method: str) -> None:
    config = load_config(head_config(tmp_path, name, architecture, num_labels=4))
    row = three_way(config, method)
    assert row["match"], row
    shape = layout(config)
    head = shape.task_head_numel
    assert head > 0
    # The method's own parameters do not depend on the head: ours = the language model's count + the whole head.
    assert row["formula"] == closed_form(load_config(name), method).trainable + head
    formula = closed_form(config, method)
    assert formula.head_trainable == head and formula.by_component["head"][0] == head


def test_the_head_by_hand(tmp_path: Path) -> None:
    # LlamaForSequenceClassification's score is Linear(128, 4, bias=False); LoRA r=8 on q (128 -> 128) and v
    # (128 -> 64, two kv heads of 32) in 4 blocks: 4 x 8 x ((128 + 128) + (128 + 64)).
    config = load_config(head_config(tmp_path, "tiny-llama", "LlamaForSequenceClassification", num_labels=4))
    assert closed_form(config, "lora", r=8).trainable == 4 * 8 * (256 + 192) + 128 * 4


@pytest.mark.parametrize(("name", "architecture"), PARITY[:3], ids=[p[1] for p in PARITY[:3]])
def test_peft_prints_the_head_twice(tmp_path: Path, name: str, architecture: str) -> None:
    config = load_config(head_config(tmp_path, name, architecture, num_labels=4))
    ours = closed_form(config, "lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft_model(build_model(config, device="meta"), "lora")
    trainable, printed = wrapped.get_nb_trainable_parameters()
    head = layout(config).task_head_numel
    assert trainable == ours.trainable
    assert printed == ours.total + head == ours.peft_total
    assert ours.peft_note() and f"{head:,}" in ours.peft_note()
    via_peft = count(config, "lora", "peft")
    assert (via_peft.trainable, via_peft.total, via_peft.peft_total) == (ours.trainable, ours.total, printed)


def test_full_fine_tuning_counts_the_head_once(tmp_path: Path) -> None:
    config = load_config(head_config(tmp_path, "tiny-bert", "BertForSequenceClassification"))
    result = closed_form(config, "full")
    assert result.trainable == result.total == layout(config).total
    assert result.head_trainable == 0 and result.peft_total is None and result.peft_note() is None


def test_all_linear_leaves_the_head_to_modules_to_save(tmp_path: Path) -> None:
    # peft excludes modules_to_save from the targets: BERT's pooler gets LoRA, its classifier trains whole.
    config = load_config(head_config(tmp_path, "tiny-bert", "BertForSequenceClassification", num_labels=2))
    row = three_way(config, "lora", target_modules="all-linear", r=2)
    assert row["match"], row
    adapted = [m for m in layout(config).linear_modules() if m.name != "classifier"]
    assert len(adapted) == 4 * 6 + 1  # six linears a block, and the pooler
    assert row["formula"] == sum(2 * (m.in_features + m.out_features) for m in adapted) + (128 + 1) * 2


def test_a_target_inside_the_head_is_left_to_modules_to_save(tmp_path: Path) -> None:
    config = load_config(head_config(tmp_path, "roberta-base", "RobertaForSequenceClassification", num_labels=2))
    row = three_way(config, "lora", target_modules=["dense"], r=2)  # matches classifier.dense too; peft skips it
    assert row["match"], row
    with pytest.raises(SurveyError, match="task head"):
        closed_form(config, "lora", target_modules=["out_proj"])


def test_output_parity_with_peft_on_a_classifier(tmp_path: Path) -> None:
    from survey_utils.parity import parity

    config = load_config(head_config(tmp_path, "tiny-bert", "BertForSequenceClassification", num_labels=3))
    report = parity(config, "lora", r=2)
    assert report.ok, report


def test_memory_holds_the_heads_gradients(tmp_path: Path) -> None:
    config = load_config(head_config(tmp_path, "tiny-llama", "LlamaForSequenceClassification", num_labels=4))
    with_head = estimate(config, "lora", batch_size=1, seq_len=16)
    assert with_head.trainable_params == closed_form(config, "lora").trainable
    assert any("task head" in line for line in with_head.assumptions)


# The command line: --set num_labels=N edits the config; bad input is one line and exit 2.
def test_set_num_labels_changes_the_count_by_the_head(tmp_path: Path, capsys) -> None:
    path = head_config(tmp_path, "tiny-bert", "BertForSequenceClassification")  # num_labels 2 by default
    results = {}
    for labels in (2, 5):
        assert main(["count", "--model", path, "--method", "lora", "--set", f"num_labels={labels}", "--json"]) == 0
        results[labels] = json.loads(capsys.readouterr().out)
    # the classifier is Linear(128, num_labels) with a bias: 3 more labels, 3 x 129 more parameters
    assert results[5]["trainable"] - results[2]["trainable"] == 3 * 129
    assert results[5]["total"] - results[2]["total"] == 3 * 129
    assert results[5]["task_type"] == "SEQ_CLS" and results[5]["task_head"] == ["classifier"]
    assert results[5]["peft_total"] == results[5]["total"] + 129 * 5  # the classifier's copy


def test_count_prints_both_totals_and_why(tmp_path: Path, capsys) -> None:
    path = head_config(tmp_path, "tiny-llama", "LlamaForSequenceClassification", num_labels=4)
    assert main(["count", "--model", path, "--method", "lora"]) == 0
    out = capsys.readouterr().out
    assert "task head" in out and "peft total" in out and "ModulesToSaveWrapper" in out


@pytest.mark.parametrize(("architecture", "settings", "fragment"), [
    ("BertForSequenceClassification", ["--set", "num_labels=0"], "num_labels=0"),
    ("BertForSequenceClassification", ["--set", "num_labels=-3"], "num_labels=-3"),
    ("BertForSequenceClassification", ["--set", "num_labels=many"], "num_labels='many'"),
    ("BertForMaskedLM", ["--set", "num_labels=3"], "num_labels=3 needs a task head"),
    ("OPTForTokenClassification", [], "OPTForTokenClassification"),
])
def test_bad_task_heads_are_one_line_and_exit_2(tmp_path: Path, capsys, architecture: str, settings: list[str],
                                                fragment: str) -> None:
    name = "opt-350m" if architecture.startswith("OPT") else "tiny-bert"
    path = head_config(tmp_path, name, architecture)
    assert main(["count", "--model", path, "--method", "lora", *settings]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err


def test_a_config_file_with_no_labels_is_one_line(tmp_path: Path, capsys) -> None:
    path = head_config(tmp_path, "tiny-llama", "LlamaForSequenceClassification", id2label={})
    assert main(["count", "--model", path, "--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_labels=0" in err
