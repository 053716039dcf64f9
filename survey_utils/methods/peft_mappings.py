"""Snapshots of HF peft's per-architecture default targets, so that closed forms never import peft.

Importing peft costs seconds (it imports torch and transformers); (IA)^3's count with
``target_modules=None`` needs only these two tables. They are generated from the installed peft by
:func:`render` (``python -m survey_utils.methods.peft_mappings > survey_utils/methods/peft_mappings.py``
rewrites this file) and ``tests/methods/test_registry.py`` checks that they still equal peft's.
"""

from __future__ import annotations

PEFT_VERSION = "0.21.2"

# peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
IA3_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "t5": ("k", "v", "wo"),
    "mt5": ("k", "v", "wi_1"),
    "gpt2": ("c_attn", "mlp.c_proj"),
    "bloom": ("query_key_value", "mlp.dense_4h_to_h"),
    "roberta": ("key", "value", "output.dense"),
    "opt": ("q_proj", "k_proj", "fc2"),
    "gptj": ("q_proj", "v_proj", "fc_out"),
    "gpt_neox": ("query_key_value", "dense_4h_to_h"),
    "gpt_neo": ("q_proj", "v_proj", "c_proj"),
    "bart": ("q_proj", "v_proj", "fc2"),
    "gpt_bigcode": ("c_attn", "mlp.c_proj"),
    "llama": ("k_proj", "v_proj", "down_proj"),
    "llama4": ("q_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "bert": ("key", "value", "output.dense"),
    "deberta-v2": ("key_proj", "value_proj", "output.dense"),
    "deberta": ("in_proj", "output.dense"),
    "RefinedWebModel": ("query_key_value", "dense_4h_to_h"),
    "RefinedWeb": ("query_key_value", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense_4h_to_h"),
    "phi": ("q_proj", "v_proj", "fc2"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "gemma3_text": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
    "qwen3": ("q_proj", "v_proj", "down_proj"),
}

# peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
IA3_FEEDFORWARD_MODULES: dict[str, tuple[str, ...]] = {
    "t5": ("wo",),
    "mt5": (),
    "gpt2": ("mlp.c_proj",),
    "bloom": ("mlp.dense_4h_to_h",),
    "roberta": ("output.dense",),
    "opt": ("fc2",),
    "gptj": ("fc_out",),
    "gpt_neox": ("dense_4h_to_h",),
    "gpt_neo": ("c_proj",),
    "bart": ("fc2",),
    "gpt_bigcode": ("mlp.c_proj",),
    "llama": ("down_proj",),
    "llama4": ("down_proj",),
    "mistral": ("down_proj",),
    "mixtral": ("w2",),
    "bert": ("output.dense",),
    "deberta-v2": ("output.dense",),
    "deberta": ("output.dense",),
    "RefinedWeb": ("dense_4h_to_h",),
    "RefinedWebModel": ("dense_4h_to_h",),
    "falcon": ("dense_4h_to_h",),
    "phi": ("fc2",),
    "gemma": ("down_proj",),
    "gemma2": ("down_proj",),
    "gemma3_text": ("down_proj",),
    "qwen2": ("down_proj",),
    "qwen3": ("down_proj",),
}

_TABLES = {
    "IA3_TARGET_MODULES": "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    "IA3_FEEDFORWARD_MODULES": "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
}


def from_peft() -> dict[str, dict[str, tuple[str, ...]]]:
    """The installed peft's tables, by the name they have here (imports peft: seconds)."""
    from peft.utils import constants

    return {ours: {model: tuple(names) for model, names in getattr(constants, theirs).items()}
            for ours, theirs in _TABLES.items()}


def render() -> str:
    """This module's source, with the tables and the version taken from the installed peft."""
    import inspect
    import sys

    import peft

    source = inspect.getsource(sys.modules[__name__])
    head, _, _ = source.partition('PEFT_VERSION = "')
    _, _, tail = source.partition("_TABLES = {")
    lines = [f'PEFT_VERSION = "{peft.__version__}"', ""]
    for ours, table in from_peft().items():
        lines.append(f"# peft.utils.constants.{_TABLES[ours]}")
        lines.append(f"{ours}: dict[str, tuple[str, ...]] = {{")
        lines += [f"    {model!r}: {names!r}," for model, names in table.items()]
        lines += ["}", ""]
    return head + "\n".join(lines).replace("'", '"') + "\n_TABLES = {" + tail


if __name__ == "__main__":
    print(render(), end="")
