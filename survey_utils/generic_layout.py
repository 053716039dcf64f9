"""The layout of any architecture transformers builds, read from the model built on the ``meta`` device.

The nine hand-written layouts in :mod:`survey_utils.architecture` are closed forms a chapter teaches (chapter 00's
block formula). Every other model type gets its layout here: transformers builds the model from the config on
``meta`` (no memory, no weights), and each module that owns parameters becomes a :class:`ModuleSpec` with its
real name, kind, parameter shapes, block index and tied weights. Exact by construction: the layout's total is
``sum(p.numel() for p in model.parameters())``. :func:`survey_utils.architecture.layout` caches the answer per
config content, so a repeat costs nothing. Fused projections (falcon's ``query_key_value``, phi3's ``qkv_proj``
and ``gate_up_proj``) are linears with their real shapes; mixture-of-experts blocks give their router, their
routed experts (one fused 3-D tensor per projection in transformers 5) and their shared experts, tagged in
:attr:`ModuleSpec.moe`, so :meth:`Layout.active_params` can say what one token uses.

This path imports torch and transformers (it builds on ``meta``); the hand families never take it.
"""

from __future__ import annotations

import copy
import re
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import Layout, ModuleSpec, task_of, with_task_head
from survey_utils.errors import SurveyError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

# Path segments that put a module in the attention or the MLP of its block (transformers' names per family).
_ATTENTION_SEGMENTS = re.compile(r"(attn|attention|selfattention|encdecattention|cross_attn|self_attention|"
                                 r"mixer|time_mix)", re.IGNORECASE)
_MLP_SEGMENTS = re.compile(r"(mlp|ffn|feed_forward|densereludense|experts?|moe|intermediate|output|fc\d|"
                           r"channel_mix)", re.IGNORECASE)
_BLOCK_LISTS = ("layers", "layer", "h", "block", "blocks")
# Config fields naming the routed experts and how many each token picks, across transformers' MoE configs.
_EXPERT_FIELDS = ("num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "num_selected_experts", "top_k")


def generic_layout(config: PretrainedConfig) -> Layout:
    """The :class:`Layout` of the model transformers builds from ``config`` (built on ``meta``)."""
    experts, top_k = moe_sizes(config)
    model = build_on_meta(config)
    modules = tuple(_modules(model, config))
    blocks = [m.layer for m in modules if m.layer is not None]
    text = _text_config(config)
    hidden = _first(text, ("hidden_size", "d_model", "n_embd", "dim")) or _embedding_width(model)
    heads = _first(text, ("num_attention_heads", "n_head", "num_heads")) or 0
    kv_heads = _first(text, ("num_key_value_heads", "num_kv_heads", "n_head_kv")) or (
        1 if getattr(text, "multi_query", False) else heads)
    head_dim = _first(text, ("head_dim", "d_kv")) or (hidden // heads if heads else 0)
    inter = _first(text, ("intermediate_size", "d_ff", "ffn_dim", "n_inner", "ffn_hidden_size")) or 4 * hidden
    shape = Layout(
        config.model_type, modules, hidden, max(blocks, default=-1) + 1, heads, kv_heads, head_dim,
        _first(text, ("vocab_size",)) or 0, inter, _first(text, ("max_position_embeddings", "n_positions")),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
        default_lora_targets=default_lora_targets(config.model_type, modules),
        num_experts=experts, experts_per_token=top_k, output_embeddings=_output_embeddings(model),
    )
    shape = with_task_head(shape, config)  # a task-head class: peft's task type and its modules_to_save
    if len(_TRANSPOSED) > 512:
        _TRANSPOSED.clear()
    _TRANSPOSED[id(shape)] = (shape, frozenset(name for name, module in model.named_modules()
                                               if getattr(module, "is_transposed", False) is True))
    return shape


def moe_sizes(config: PretrainedConfig) -> tuple[int, int]:
    """``(routed experts, experts per token)`` from a MoE config, ``(0, 0)`` for a dense one; a top-k larger than
    the experts is refused in one line naming the field."""
    text = _text_config(config)
    experts_field = next((f for f in _EXPERT_FIELDS if (_first(text, (f,)) or 0) > 0), None)
    k_field = next((f for f in _TOP_K_FIELDS if _integer(text, f) is not None), None)
    if experts_field is None or k_field is None:
        return 0, 0
    experts, top_k = getattr(text, experts_field), getattr(text, k_field)
    if not 1 <= top_k <= experts:
        raise SurveyError(f"config '{_label(config)}': {k_field}={top_k} must be between 1 and "
                          f"{experts_field}={experts}")
    return experts, top_k


def model_class_for(config: PretrainedConfig) -> type:
    """The class named first in ``architectures`` when transformers has it, else the causal-LM, seq2seq-LM or
    base-model auto class registered for the model type (a task-head class transformers lacks is refused: its head
    is what the count is asked for)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    name = (getattr(config, "architectures", None) or [None])[0]
    if name and isinstance(getattr(transformers, name, None), type):
        return getattr(transformers, name)
    if task_of(config) is not None:  # a task head must be built as named, never replaced by the language model
        raise SurveyError(f"config '{_label(config)}': architectures names '{name}', which transformers has not "
                          f"for model type '{config.model_type}'")
    for mapping in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
                    auto.MODEL_MAPPING_NAMES):
        cls = mapping.get(config.model_type)
        if isinstance(cls, str) and isinstance(getattr(transformers, cls, None), type):
            return getattr(transformers, cls)
    raise SurveyError(f"config '{_label(config)}': transformers has no model class for model type "
                      f"'{config.model_type}'" + (f" (architectures names '{name}')" if name else ""))


def build_on_meta(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on torch's ``meta`` device (shapes only; a copy of the config, left untouched)."""
    import warnings

    import torch
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from survey_utils.zoo import to_transformers_config

    config = to_transformers_config(config)  # a zoo snapshot's light config (survey_utils.snapshots) replays as real
    cls = model_class_for(config)
    try:
        # unset_fake_temporarily: a layout first asked for inside the simulation's FakeTensorMode must still be
        # read from a plain meta build (some models make meta tensors the fake mode refuses, e.g. Gemma-2).
        with warnings.catch_warnings(), unset_fake_temporarily(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return cls(copy.deepcopy(config))
    except SurveyError:
        raise
    except Exception as error:  # noqa: BLE001 - a bad config fails inside the model's __init__ in many ways
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise SurveyError(f"config '{_label(config)}': transformers cannot build {cls.__name__} from it: "
                          f"{reason}") from None


def default_lora_targets(model_type: str, modules: tuple[ModuleSpec, ...]) -> tuple[str, ...]:
    """peft's default LoRA targets for the model type (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
    else the attention's query and value projections where they have recognisable names, else none."""
    defaults = peft_default_lora_targets()
    if model_type in defaults:
        return tuple(defaults[model_type])
    names = {m.short_name for m in modules if m.kind == "linear" and m.component == "attention"}
    for pair in (("q_proj", "v_proj"), ("query", "value"), ("q", "v"), ("wq", "wv")):
        if set(pair) <= names:
            return pair
    return ()


_PEFT_LORA_DEFAULTS = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"


@lru_cache(maxsize=1)
def peft_default_lora_targets() -> dict[str, list[str]]:
    """The installed peft's ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``, read from its source
    (``peft/utils/constants.py``, where it is one dict literal) without importing peft: importing peft imports
    bitsandbytes, which compiles kernels with ``torch.compile``, about 2.5 s of the first count of a config that no
    snapshot holds (``benchmarks/moe_count_speed.py``). Where the assignment is not a literal (another peft), peft is
    imported and its constant returned: the same answer, slower. ``tests/test_generic_layout.py`` checks the two
    agree."""
    import ast
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("peft")  # locates the package without running its __init__
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    source = Path(folders[0]) / "utils" / "constants.py" if folders else None
    if source is not None and source.is_file():
        for node in ast.parse(source.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [_PEFT_LORA_DEFAULTS]:
                try:
                    return ast.literal_eval(node.value)
                except ValueError:
                    break
    from peft.utils import constants

    return dict(getattr(constants, _PEFT_LORA_DEFAULTS))


def _modules(model: nn.Module, config: PretrainedConfig):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    owner: dict[int, str] = {}  # parameter id -> the first module that holds it
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owner.setdefault(id(parameter), name.rpartition(".")[0])
    encoder_blocks = _encoder_blocks(model, config)
    names = {name for name, _ in model.named_modules()}
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not name or not own:
            if not name and own:
                yield _spec("model", module, own, "other", encoder_blocks, owner, names)
            continue
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, Conv1D):
            kind = "conv1d"
        elif isinstance(module, nn.Embedding):
            kind = "embedding"
        elif "norm" in type(module).__name__.lower():
            kind = "norm"
        elif [p for p, _ in own] == ["bias"]:
            kind = "bias"
        else:
            kind = "other"
        yield _spec(name, module, own, kind, encoder_blocks, owner, names)


def _spec(name: str, module: Any, own: list, kind: str, encoder_blocks: int, owner: dict[int, str],
          names: set[str]) -> ModuleSpec:
    first_owner = owner[id(own[0][1])]
    tied_to = first_owner if first_owner != name and all(owner[id(p)] != name for _, p in own) else None
    if tied_to is None:  # partly tied (XLNet's lm_loss.weight, RoBERTa-like decoder.bias): list only its own
        own = [(p, param) for p, param in own if owner[id(param)] == name]
    params = tuple((p, param.numel()) for p, param in own)
    shapes = tuple(tuple(param.shape) for _, param in own)
    layer = _block_index(name, encoder_blocks)
    if kind == "linear":
        fan_in, fan_out = module.in_features, module.out_features
    elif kind == "conv1d":
        fan_in, fan_out = module.weight.shape
    elif kind == "embedding":
        fan_in, fan_out = module.num_embeddings, module.embedding_dim
    elif kind == "norm":
        fan_in = fan_out = shapes[0][-1] if shapes[0] else 0
    else:
        fan_in = fan_out = 0
    return ModuleSpec(name, kind, _component(name, kind, layer), params, int(fan_in), int(fan_out), layer,
                      tied_to, shapes=shapes, moe=_moe_role(name, names))


def _component(name: str, kind: str, layer: int | None) -> str:
    segments = name.split(".")
    if kind == "norm":
        return "norms"
    if layer is None:
        if kind == "embedding" or "embed" in name or segments[-1] == "project_in":
            return "embeddings"
        return "head"
    in_block = segments[_block_position(segments) + 2:]
    if any(_ATTENTION_SEGMENTS.search(s) for s in in_block[:-1]) or (
            kind == "embedding" and "relative_attention" in name):
        return "attention"
    if any(_MLP_SEGMENTS.search(s) for s in in_block):
        return "mlp"
    return "attention" if _ATTENTION_SEGMENTS.search(segments[-1]) or kind == "embedding" else "mlp"


def _block_position(segments: list[str]) -> int:
    for i in range(len(segments) - 1):
        if segments[i] in _BLOCK_LISTS and segments[i + 1].isdigit():
            return i
    return -2


def _block_index(name: str, encoder_blocks: int) -> int | None:
    segments = name.split(".")
    i = _block_position(segments)
    if i < 0:
        return None
    index = int(segments[i + 1])
    return index + encoder_blocks if "decoder" in segments[:i] and encoder_blocks else index


def _encoder_blocks(model: nn.Module, config: PretrainedConfig) -> int:
    """Blocks of the encoder of an encoder-decoder model: the decoder's block indices follow them (as T5's
    hand layout numbers them)."""
    if not getattr(config, "is_encoder_decoder", False):
        return 0
    indices = {_block_index(n, 0) for n, _ in model.named_modules() if "encoder" in n.split(".")[:2]}
    return max((i for i in indices if i is not None), default=-1) + 1


def _moe_role(name: str, names: set[str]) -> str | None:
    """``shared`` (a shared expert, or its gate), ``routed`` (the routed experts), ``router`` (a module named
    gate/router beside them), else None."""
    segments = name.split(".")
    if any(s.startswith("shared_expert") for s in segments):
        return "shared"
    if "experts" in segments:
        return "routed"
    if segments[-1] in ("gate", "router") and f"{name.rpartition('.')[0]}.experts" in names:
        return "router"
    return None


def _output_embeddings(model: nn.Module) -> str | None:
    """The name of the module ``get_output_embeddings()`` returns (None when there is none)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None \
        else None


def _text_config(config: Any) -> Any:
    """The text part of a composite config; the config itself when it has none or several (MusicGen's text
    encoder and decoder: transformers refuses to choose, and the sizes below are only descriptive)."""
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:
        return config


def _integer(config: Any, name: str) -> int | None:
    try:
        value = getattr(config, name, None)
    except Exception:  # noqa: BLE001 - per-layer configs (Gemma-4) refuse a global read of a per-layer size
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _first(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = _integer(config, name)
        if value is not None and value > 0:
            return value
    return None


def _embedding_width(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(getattr(embeddings, "embedding_dim", 0) or 0)


def _label(config: Any) -> str:
    return getattr(config, "name_or_path", "") or config.model_type


def transposed_modules(layout: Layout) -> frozenset[str]:
    """Names of the modules whose 3-D expert tensors are stored ``(experts, d_in, d_out)``: transformers marks them
    ``is_transposed`` (its ``use_experts_implementation``), and peft's ``ParamWrapper`` reads the flag to tell
    ``d_in`` from ``d_out``. Recorded while :func:`generic_layout` builds the model (empty for a hand layout, which
    has no 3-D tensors); counting never needs it, only what a LoRA on such a tensor saves for backward."""
    hit = _TRANSPOSED.get(id(layout))
    return hit[1] if hit is not None and hit[0] is layout else frozenset()


def remember_transposed(layout: Layout, names: frozenset[str]) -> None:
    """Record :func:`transposed_modules` for a layout made without a build (a stored snapshot,
    :mod:`survey_utils.snapshots`)."""
    if len(_TRANSPOSED) > 512:
        _TRANSPOSED.clear()
    _TRANSPOSED[id(layout)] = (layout, frozenset(names))


# id(layout) -> (layout, names): a layout is immutable and cached by architecture.layout, so the identity check
# keeps a recycled id from answering for another layout.
_TRANSPOSED: dict[int, tuple[Layout, frozenset[str]]] = {}
