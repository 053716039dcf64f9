"""Every module of a transformer, with its exact parameter shapes, derived from the config alone.

This is what makes parameter counts closed-form: the layout of a 405B model is a list of a few thousand
:class:`ModuleSpec` rows computed by arithmetic on its config, in milliseconds, with no model built. The
module names are the ones transformers gives the built model, so the same target-matching rule selects
the same modules here and in the built model, and tests check the layout against ``named_parameters()``
for every model of the zoo. Chapter 00 explains where the parameters of a transformer go.

Hand-written families: Llama-like decoders (llama, mistral, qwen2), GPT-2, BERT and RoBERTa, T5, OPT, BLOOM.
Every other model type transformers builds gets :func:`survey_utils.generic_layout.generic_layout`, read from
the model built on ``meta`` (it imports torch; the hand families never do).

Task heads: a config whose ``architectures`` names a ``...ForSequenceClassification``, ``...ForTokenClassification``
or ``...ForQuestionAnswering`` class gets that head in its layout (``num_labels`` outputs), and
:attr:`Layout.task_type` / :attr:`Layout.task_head` say which peft task type it is and which modules peft's
task-type model puts in ``modules_to_save`` (trained whole, beside the method). Chapter 00, "Task heads".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from survey_utils.errors import SurveyError

if TYPE_CHECKING:  # typing only: the layout is arithmetic on the config and never needs transformers
    from transformers import PretrainedConfig

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head", "method")

# Stages of a block, in forward order (:attr:`ModuleSpec.stage`). A trainable module at stage x makes every later
# stage save for backward (the memory model's recipes, survey_utils.memory.activations, tag their tensors with them).
INPUT = -math.inf
ATTN_NORM, ATTN_IN, ATTN_CORE, ATTN_OUT, ATTN_POST = 0.0, 1.0, 2.0, 3.0, 4.0
CROSS_NORM, CROSS_IN, CROSS_CORE, CROSS_OUT, CROSS_POST = 4.2, 4.4, 4.5, 4.6, 4.8
MLP_NORM, MLP_IN, MLP_ACT, MLP_OUT, MLP_POST = 5.0, 6.0, 7.0, 8.0, 9.0
# Short names of the linears whose output closes the attention / the MLP (transformers' names per family).
ATTN_OUT_NAMES = ("o_proj", "o", "c_proj", "dense", "out_proj")
MLP_OUT_NAMES = ("down_proj", "c_proj", "wo", "fc2", "dense_4h_to_h")


@dataclass(frozen=True)
class ModuleSpec:
    """One module that owns parameters.

    ``kind`` is ``linear`` (nn.Linear), ``conv1d`` (GPT-2's transposed Conv1D), ``embedding``, ``norm``
    or ``bias`` (a bare parameter such as a tied decoder's bias). ``params`` maps each parameter's
    name to its number of elements; a tied module (``tied_to`` set) owns no parameters of its own.
    """

    name: str
    kind: str
    component: str
    params: tuple[tuple[str, int], ...]
    in_features: int = 0
    out_features: int = 0
    layer: int | None = None
    tied_to: str | None = None
    # Filled by the generic layout (survey_utils.generic_layout) only: each parameter's shape, in ``params``
    # order, and the module's part in a mixture of experts (``router``, ``routed``, ``shared`` or None).
    shapes: tuple[tuple[int, ...], ...] = ()
    moe: str | None = None

    @property
    def has_bias(self) -> bool:
        return any(p == "bias" for p, _ in self.params)

    @property
    def numel(self) -> int:
        return 0 if self.tied_to else sum(n for _, n in self.params)

    @property
    def short_name(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def stage(self) -> float:
        """The stage of its block at which this module sits (its output joins the block's computation there):
        one of the stage constants below, :data:`INPUT` outside the attention and MLP linears. The memory model
        (chapter 00) saves a block's tensors from the lowest trainable stage on; methods read it too."""
        cross = ".EncDecAttention." in self.name
        if self.component == "attention" and self.kind in ("linear", "conv1d"):
            out = self.short_name in ATTN_OUT_NAMES
            if cross:
                return CROSS_OUT if out else CROSS_IN
            return ATTN_OUT if out else ATTN_IN
        if self.component == "mlp" and self.kind in ("linear", "conv1d"):
            out = self.short_name in MLP_OUT_NAMES or self.name.endswith("output.dense")
            return MLP_OUT if out else MLP_IN
        return INPUT

    @property
    def input_key(self) -> tuple[str, str]:
        """Which tensor this module reads: modules with equal keys read one tensor, which autograd saves
        once however many of them use it. q/k/v read the attention's input, gate/up the MLP's input, and
        the cross-attention keys and values of every decoder block read the one encoder output. The memory
        estimate and every method's ``memory_terms`` group saved inputs by this key (chapter 00)."""
        parent, _, short = self.name.rpartition(".")
        if ".EncDecAttention." in self.name and short in _CROSS_KV:
            return ("encoder output", "kv")
        if short in _ATTENTION_INPUTS:
            return (parent, "attention input")
        if short in _MLP_INPUTS:
            return (parent, "mlp input")
        return (parent, short)


# Linear layers that read the same tensor as their siblings (transformers' names per family).
_ATTENTION_INPUTS = frozenset({"q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v"})
_MLP_INPUTS = frozenset({"gate_proj", "up_proj", "wi_0", "wi_1"})
_CROSS_KV = frozenset({"k", "v"})


@dataclass(frozen=True)
class Layout:
    """The modules of a model and the facts about its shape that methods need."""

    family: str
    modules: tuple[ModuleSpec, ...]
    hidden_size: int
    num_layers: int  # transformer blocks in total (encoder + decoder for T5)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    max_positions: int | None
    is_encoder_decoder: bool = False
    default_lora_targets: tuple[str, ...] = field(default=())
    num_experts: int = 0  # routed experts per MoE block (0: a dense model)
    experts_per_token: int = 0  # top-k: routed experts each token uses
    # The module transformers' get_output_embeddings() returns (peft's all-linear leaves it out): recorded by the
    # generic layout (None: the model has none); "" for the hand layouts, whose head targeting.output_head finds.
    output_embeddings: str | None = ""
    # A task-head class (architectures names ...ForSequenceClassification, ...ForTokenClassification,
    # ...ForQuestionAnswering): peft's task type for it (SEQ_CLS, TOKEN_CLS, QUESTION_ANS; None for any other class)
    # and the modules peft's task-type model wraps in ModulesToSaveWrapper (trained whole; :func:`task_head_modules`).
    task_type: str | None = None
    task_head: tuple[str, ...] = ()

    @cached_property
    def total(self) -> int:
        return sum(m.numel for m in self.modules)

    @cached_property
    def active_params(self) -> int:
        """Parameters one token uses: everything but the routed experts it does not pick. Routers and shared
        experts always run; of each block's routed experts, top-k of n do (``k/n`` of their parameters, exact:
        every expert has the same shape). Equals :attr:`total` for a dense model."""
        routed = sum(m.numel for m in self.modules if m.moe == "routed")
        if not routed:
            return self.total
        if routed % self.num_experts:
            raise SurveyError(f"{self.family}: routed expert parameters ({routed}) are not a multiple of "
                              f"{self.num_experts} experts")
        return self.total - routed + routed // self.num_experts * self.experts_per_token

    @cached_property
    def by_component(self) -> dict[str, int]:
        totals = dict.fromkeys(COMPONENTS[:-1], 0)
        for module in self.modules:
            totals[module.component] += module.numel
        return totals

    @cached_property
    def task_head_params(self) -> tuple[tuple[ModuleSpec, str], ...]:
        """``(module, parameter name)`` of every parameter inside :attr:`task_head` (tied ones left out: they are
        counted where they are owned)."""
        return tuple((m, p) for m in self.modules if not m.tied_to and in_task_head(m.name, self.task_head)
                     for p, _ in m.params)

    @cached_property
    def task_head_numel(self) -> int:
        """Parameters of the task head: what peft's ``ModulesToSaveWrapper`` copies (and so holds twice)."""
        return sum(dict(m.params)[p] for m, p in self.task_head_params)

    def linear_modules(self) -> list[ModuleSpec]:
        return [m for m in self.modules if m.kind in ("linear", "conv1d")]

    def linear_names(self) -> list[str]:
        """Distinct short names of the linear modules inside transformer blocks, in model order."""
        seen: dict[str, None] = {}
        for module in self.linear_modules():
            if module.layer is not None:
                seen.setdefault(module.short_name, None)
        return list(seen)


def total_params(config: PretrainedConfig) -> int:
    """Exact number of parameters of the model built from ``config`` (tied weights counted once)."""
    return layout(config).total


def params_by_component(config: PretrainedConfig) -> dict[str, int]:
    """Parameters per component (embeddings, attention, mlp, norms, head), from the config alone."""
    return dict(layout(config).by_component)


def layout(config: PretrainedConfig) -> Layout:
    """The :class:`Layout` of the model the config describes: the hand-written closed form for the families
    chapter 00 teaches (no torch), the generic layout read from a ``meta`` build for every other model type."""
    builder = _BUILDERS.get(config.model_type)
    if builder is None:  # any other model type: a zoo snapshot's stored layout, else the meta build (imports torch)
        builder = _stored_or_generic_layout
    else:
        _check_sizes(config)
    # Configs are unhashable. The zoo's shared configs are read-only: the same object hits the identity cache.
    # Any other config can change after its layout was asked for (a copy with an edited field), so it is looked
    # up by content, which an equal config built elsewhere also hits.
    from survey_utils.zoo import read_only

    frozen = read_only(config)
    hit = _BY_ID.get(id(config)) if frozen else None
    if hit is not None and hit[0] is config:
        return hit[1]
    key = config.to_json_string(use_diff=False)
    if key not in _CACHE:
        check_task(config)
        if len(_CACHE) >= 256:
            # Both caches go together: an identity entry kept past its content entry would answer a zoo config with
            # another object than an equal config gets from the content cache (tests/test_generic_layout.py).
            _CACHE.clear()
            _BY_ID.clear()
        _CACHE[key] = with_task_head(builder(config), config)
    if frozen:
        if len(_BY_ID) >= 256:
            _BY_ID.clear()
        _BY_ID[id(config)] = (config, _CACHE[key])
    return _CACHE[key]


def _stored_or_generic_layout(config: PretrainedConfig) -> Layout:
    from survey_utils.snapshots import stored_layout

    stored = stored_layout(config)  # None for a config that is not an unchanged zoo snapshot
    if stored is not None:
        return stored
    from survey_utils.generic_layout import generic_layout

    return generic_layout(config)


# ----------------------------------------------------------------------------------------------- task heads

# peft 0.21.2, peft_model.py: each task-type model adds these names to the config's ``modules_to_save`` before it
# wraps the model (PeftModelForSequenceClassification.__init__ and PeftModelForTokenClassification.__init__:
# ``classifier_module_names = ["classifier", "score"]``; PeftModelForQuestionAnswering.__init__:
# ``qa_module_names = ["qa_outputs"]``). Keyed by the suffix of the transformers class that builds the head.
TASK_HEADS: dict[str, tuple[str, tuple[str, ...]]] = {
    "ForSequenceClassification": ("SEQ_CLS", ("classifier", "score")),
    "ForTokenClassification": ("TOKEN_CLS", ("classifier", "score")),
    "ForQuestionAnswering": ("QUESTION_ANS", ("qa_outputs",)),
}


def architecture_name(config: Any) -> str:
    """The class named first in the config's ``architectures`` ("" when none)."""
    return str((getattr(config, "architectures", None) or [""])[0] or "")


def task_of(config: Any) -> tuple[str, tuple[str, ...]] | None:
    """``(peft task type, names peft adds to modules_to_save)`` when ``architectures`` names a task-head class
    (:data:`TASK_HEADS`), else None: a causal-LM, masked-LM or seq2seq class trains no head of its own."""
    name = architecture_name(config)
    return next((task for suffix, task in TASK_HEADS.items() if name.endswith(suffix)), None)


def task_head_modules(names: Iterable[str], saved: Iterable[str]) -> tuple[str, ...]:
    """The modules peft wraps in ``ModulesToSaveWrapper`` for ``modules_to_save=saved``, from the model's module
    names in model order (parents before children).

    peft 0.21.2, utils/other.py, ``_set_trainable``: a module is wrapped when its name ends with one of the names
    (``key.endswith(target_key)``, a plain string suffix, so ``pre_classifier`` ends with ``classifier`` too); a
    wrapped module's children are inside its copy, so only the outermost match counts."""
    saved = tuple(saved)
    found: list[str] = []
    for name in names:
        if any(name.endswith(s) for s in saved) and not any(in_task_head(name, (f,)) for f in found):
            found.append(name)
    return tuple(found)


def in_task_head(name: str, task_head: Iterable[str]) -> bool:
    """Whether the module called ``name`` is one of ``task_head`` or inside one."""
    return any(name == h or name.startswith(f"{h}.") for h in task_head)


def excluded_from_targets(name: str, shape: Layout) -> bool:
    """peft never adapts a module of ``modules_to_save`` (peft 0.21.2, tuners/tuners_utils.py,
    ``check_target_module_exists``: excluded when ``re.match(rf"(^|.*\\.){m}($|\\..*)", key)``, a whole path segment
    equal to a saved name): a task head trains whole, so no method's target can sit in it."""
    task = TASK_HEADS_BY_TYPE.get(shape.task_type or "")
    return task is not None and any(m in name.split(".") for m in task)


TASK_HEADS_BY_TYPE: dict[str, tuple[str, ...]] = {t: saved for t, saved in TASK_HEADS.values()}


def with_task_head(shape: Layout, config: Any) -> Layout:
    """``shape`` with :attr:`Layout.task_type` and :attr:`Layout.task_head` filled from the config's class (the same
    object when they already are: the generic layout's bookkeeping is keyed by the layout's identity)."""
    task = task_of(config)
    if task is None:
        return shape
    names: dict[str, None] = {}
    for module in shape.modules:  # every enclosing module too: RoBERTa's `classifier` owns no parameter itself
        parts = module.name.split(".")
        for i in range(1, len(parts) + 1):
            names.setdefault(".".join(parts[:i]), None)
    head = task_head_modules(names, task[1])
    if (shape.task_type, shape.task_head) == (task[0], head):
        return shape
    return replace(shape, task_type=task[0], task_head=head)


def check_task(config: Any) -> None:
    """Refuse, in one line naming the value, a task-head class transformers lacks for the model type
    (``OPTForTokenClassification``) and a ``num_labels`` below 1 (the head has one output per label)."""
    task = task_of(config)
    if task is None:
        return
    name, label = architecture_name(config), getattr(config, "name_or_path", "") or config.model_type
    from survey_utils.zoo import has_model_class

    if not has_model_class(config, name):
        raise SurveyError(f"config '{label}': architectures names '{name}', which transformers has not for model "
                          f"type '{config.model_type}'")
    labels = getattr(config, "num_labels", None)
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < 1:
        raise SurveyError(f"config '{label}': num_labels={labels!r} must be a positive integer ({name} has one "
                          "output per label)")


def with_num_labels(config: Any, value: Any) -> Any:
    """A copy of ``config`` with ``num_labels`` set (``--set num_labels=N`` on the command line): refused in one
    line unless ``architectures`` names a task-head class and ``value`` is a positive integer."""
    import copy

    label = getattr(config, "name_or_path", "") or config.model_type
    try:
        labels = int(str(value).strip())
    except ValueError:
        labels = None
    if labels is None or labels < 1 or isinstance(value, bool):
        shown = repr(value) if labels is None or isinstance(value, bool) else labels
        raise SurveyError(f"num_labels={shown} must be a positive integer")
    if task_of(config) is None:
        raise SurveyError(f"num_labels={labels} needs a task head, but config '{label}' names "
                          f"'{architecture_name(config) or config.model_type}' (a ...ForSequenceClassification, "
                          "...ForTokenClassification or ...ForQuestionAnswering class has one)")
    edited = copy.deepcopy(config)
    edited.num_labels = labels
    return edited


def task_head_trainable(shape: Layout, whole_model: bool,
                        unfrozen: Iterable[tuple[ModuleSpec, str]] = ()) -> int:
    """Task-head parameters that train beside a method's own: the whole head (peft's task-type models put it in
    ``modules_to_save``), less what the method already trains there (``unfrozen``: its ``unfrozen_params``), and
    nothing when the method trains the whole model (the head is then simply part of it)."""
    if whole_model or not shape.task_head:
        return 0
    already = {(m.name, p) for m, p in unfrozen}
    return sum(dict(m.params)[p] for m, p in shape.task_head_params if (m.name, p) not in already)


def train_task_head(model: Any, whole_model: bool = False) -> int:
    """Make the task head of a built model trainable after a method froze it (what peft's ``modules_to_save`` does,
    without the copy); returns the parameters unfrozen. A no-op for a model without a task head."""
    config = getattr(model, "config", None)
    if whole_model or config is None:
        return 0
    heads = layout(config).task_head
    unfrozen = 0
    for name, module in model.named_modules():
        if any(name == h or name.endswith(f".{h}") for h in heads):
            for parameter in module.parameters():
                if not parameter.requires_grad:
                    parameter.requires_grad_(True)
                    unfrozen += parameter.numel()
    return unfrozen


# The size fields of the supported families; every one present must be a positive integer.
_SIZE_FIELDS = ("hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
                "num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "intermediate_size", "d_ff",
                "d_kv", "ffn_dim", "vocab_size", "head_dim", "word_embed_proj_dim", "max_position_embeddings",
                "n_positions")


def _check_sizes(config: PretrainedConfig) -> None:
    label = getattr(config, "name_or_path", "") or config.model_type
    for name in _SIZE_FIELDS:
        value = getattr(config, name, None)
        if value is None and name in ("head_dim", "num_key_value_heads", "n_positions", "max_position_embeddings"):
            continue
        if value is None and not hasattr(config, name):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SurveyError(f"config '{label}': {name}={value!r} must be a positive integer")
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if config.model_type != "t5" and not getattr(config, "head_dim", None) and hidden and heads and hidden % heads:
        raise SurveyError(f"config '{label}': hidden_size={hidden} is not divisible by num_attention_heads={heads}")


_CACHE: dict[str, Layout] = {}
_BY_ID: dict[int, tuple[PretrainedConfig, Layout]] = {}


def _linear(name: str, fan_in: int, fan_out: int, bias: bool, component: str, layer: int | None,
            kind: str = "linear", tied_to: str | None = None) -> ModuleSpec:
    params = [("weight", fan_in * fan_out)] + ([("bias", fan_out)] if bias else [])
    return ModuleSpec(name, kind, component, tuple(params), fan_in, fan_out, layer, tied_to)


def _norm(name: str, width: int, bias: bool, layer: int | None = None, affine: bool = True) -> ModuleSpec:
    params = ([("weight", width)] + ([("bias", width)] if bias else [])) if affine else []
    return ModuleSpec(name, "norm", "norms", tuple(params), width, width, layer)


def _embedding(name: str, rows: int, width: int, tied_to: str | None = None) -> ModuleSpec:
    return ModuleSpec(name, "embedding", "embeddings", (("weight", rows * width),), rows, width, None, tied_to)


def _head(name: str, fan_in: int, fan_out: int, bias: bool) -> ModuleSpec:
    return _linear(name, fan_in, fan_out, bias, "head", None)


def _task_type(config: PretrainedConfig) -> str | None:
    task = task_of(config)
    return task[0] if task else None


def _decoder_task_head(config: PretrainedConfig, width: int, score_bias: bool, token: str,
                       token_bias: bool) -> Iterator[ModuleSpec]:
    """The head transformers puts on a decoder for a task (GPT-2, OPT, BLOOM, and the generic
    ``GenericFor...`` classes of Llama, Mistral, Qwen2 in modeling_layers.py): ``score`` (``num_labels`` outputs)
    for sequence classification, ``token`` for token classification, ``qa_outputs`` (two outputs: start and end)
    for question answering."""
    task = _task_type(config)
    if task == "SEQ_CLS":
        yield _head("score", width, config.num_labels, score_bias)
    elif task == "TOKEN_CLS":
        yield _head(token, width, config.num_labels, token_bias)
    elif task == "QUESTION_ANS":
        yield _head("qa_outputs", width, 2, True)


# transformers 5.23, modeling_llama.py and modeling_qwen2.py: their ForQuestionAnswering classes set
# ``base_model_prefix = "transformer"`` ("For BC"), so the decoder sits under `transformer`; Mistral's keeps `model`.
_QA_UNDER_TRANSFORMER = frozenset({"llama", "qwen2"})


def _llama_like(config: PretrainedConfig) -> Layout:
    h, n_layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = config.intermediate_size
    qkv_bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    top = "transformer" if (config.model_type in _QA_UNDER_TRANSFORMER
                            and _task_type(config) == "QUESTION_ANS") else "model"

    def modules() -> Iterator[ModuleSpec]:
        yield _embedding(f"{top}.embed_tokens", config.vocab_size, h)
        for i in range(n_layers):
            p = f"{top}.layers.{i}"
            yield _linear(f"{p}.self_attn.q_proj", h, heads * head_dim, qkv_bias, "attention", i)
            yield _linear(f"{p}.self_attn.k_proj", h, kv_heads * head_dim, qkv_bias, "attention", i)
            yield _linear(f"{p}.self_attn.v_proj", h, kv_heads * head_dim, qkv_bias, "attention", i)
            yield _linear(f"{p}.self_attn.o_proj", heads * head_dim, h, o_bias, "attention", i)
            yield _linear(f"{p}.mlp.gate_proj", h, inter, mlp_bias, "mlp", i)
            yield _linear(f"{p}.mlp.up_proj", h, inter, mlp_bias, "mlp", i)
            yield _linear(f"{p}.mlp.down_proj", inter, h, mlp_bias, "mlp", i)
            yield _norm(f"{p}.input_layernorm", h, bias=False, layer=i)
            yield _norm(f"{p}.post_attention_layernorm", h, bias=False, layer=i)
        yield _norm(f"{top}.norm", h, bias=False)
        if _task_type(config):  # GenericForTokenClassification: score's bias is token_classification_bias
            yield from _decoder_task_head(config, h, False, "score",
                                          bool(getattr(config, "token_classification_bias", True)))
            return
        yield _linear("lm_head", h, config.vocab_size, False, "head", None,
                      tied_to="model.embed_tokens" if tied else None)

    return Layout(config.model_type, tuple(modules()), h, n_layers, heads, kv_heads, head_dim,
                  config.vocab_size, inter, getattr(config, "max_position_embeddings", None),
                  default_lora_targets=("q_proj", "v_proj"), output_embeddings=_output_head(config))


def _gpt2(config: PretrainedConfig) -> Layout:
    h, n_layers, heads = config.n_embd, config.n_layer, config.n_head
    inner = config.n_inner or 4 * h

    def modules() -> Iterator[ModuleSpec]:
        yield _embedding("transformer.wte", config.vocab_size, h)
        yield _embedding("transformer.wpe", config.n_positions, h)
        for i in range(n_layers):
            p = f"transformer.h.{i}"
            yield _norm(f"{p}.ln_1", h, bias=True, layer=i)
            yield _linear(f"{p}.attn.c_attn", h, 3 * h, True, "attention", i, kind="conv1d")
            yield _linear(f"{p}.attn.c_proj", h, h, True, "attention", i, kind="conv1d")
            yield _norm(f"{p}.ln_2", h, bias=True, layer=i)
            yield _linear(f"{p}.mlp.c_fc", h, inner, True, "mlp", i, kind="conv1d")
            yield _linear(f"{p}.mlp.c_proj", inner, h, True, "mlp", i, kind="conv1d")
        yield _norm("transformer.ln_f", h, bias=True)
        if _task_type(config):
            yield from _decoder_task_head(config, h, False, "classifier", True)
            return
        yield _linear("lm_head", h, config.vocab_size, False, "head", None, tied_to="transformer.wte")

    return Layout("gpt2", tuple(modules()), h, n_layers, heads, heads, h // heads, config.vocab_size,
                  inner, config.n_positions, default_lora_targets=("c_attn",), output_embeddings=_output_head(config))


def _bert_like(config: PretrainedConfig) -> Layout:
    h, n_layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    inter = config.intermediate_size
    base = "roberta" if config.model_type == "roberta" else "bert"
    arch = (config.architectures or [""])[0]
    # the causal-LM classes (BertLMHeadModel, RobertaForCausalLM) carry the masked-LM head and no pooler too
    masked_lm = arch.endswith(("ForMaskedLM", "LMHeadModel", "ForCausalLM"))

    def modules() -> Iterator[ModuleSpec]:
        e = f"{base}.embeddings"
        yield _embedding(f"{e}.word_embeddings", config.vocab_size, h)
        yield _embedding(f"{e}.position_embeddings", config.max_position_embeddings, h)
        yield _embedding(f"{e}.token_type_embeddings", config.type_vocab_size, h)
        yield _norm(f"{e}.LayerNorm", h, bias=True)
        for i in range(n_layers):
            p = f"{base}.encoder.layer.{i}"
            for name in ("query", "key", "value"):
                yield _linear(f"{p}.attention.self.{name}", h, h, True, "attention", i)
            yield _linear(f"{p}.attention.output.dense", h, h, True, "attention", i)
            yield _norm(f"{p}.attention.output.LayerNorm", h, bias=True, layer=i)
            yield _linear(f"{p}.intermediate.dense", h, inter, True, "mlp", i)
            yield _linear(f"{p}.output.dense", inter, h, True, "mlp", i)
            yield _norm(f"{p}.output.LayerNorm", h, bias=True, layer=i)
        task = _task_type(config)
        if task is not None:  # BertFor.../RobertaFor...: only BERT's sequence classifier keeps the pooler
            if task == "SEQ_CLS" and base == "bert":
                yield _linear(f"{base}.pooler.dense", h, h, True, "head", None)
                yield _head("classifier", h, config.num_labels, True)
            elif task == "SEQ_CLS":  # RobertaClassificationHead: dense, tanh, out_proj on the <s> token
                yield _head("classifier.dense", h, h, True)
                yield _head("classifier.out_proj", h, config.num_labels, True)
            else:  # token classification, question answering: one linear with num_labels outputs
                yield _head("classifier" if task == "TOKEN_CLS" else "qa_outputs", h, config.num_labels, True)
            return
        if not masked_lm:
            yield _linear(f"{base}.pooler.dense", h, h, True, "head", None)
            return
        head = "cls.predictions" if base == "bert" else "lm_head"
        transform = f"{head}.transform" if base == "bert" else head
        yield _linear(f"{transform}.dense", h, h, True, "head", None)
        yield _norm(f"{transform}.{'LayerNorm' if base == 'bert' else 'layer_norm'}", h, bias=True)
        yield ModuleSpec(head, "bias", "head", (("bias", config.vocab_size),))
        yield _linear(f"{head}.decoder", h, config.vocab_size, False, "head", None,
                      tied_to=f"{e}.word_embeddings")

    return Layout(config.model_type, tuple(modules()), h, n_layers, heads, heads, h // heads,
                  config.vocab_size, inter, config.max_position_embeddings,
                  default_lora_targets=("query", "value"), output_embeddings=_output_head(config))


def _t5(config: PretrainedConfig) -> Layout:
    d, inner = config.d_model, config.num_heads * config.d_kv
    ff, heads = config.d_ff, config.num_heads
    n_enc = config.num_layers
    n_dec = getattr(config, "num_decoder_layers", None) or n_enc
    gated = bool(getattr(config, "is_gated_act", False))
    tied = bool(getattr(config, "tie_word_embeddings", True))

    def attention(prefix: str, layer: int, relative_bias: bool) -> Iterator[ModuleSpec]:
        for name in ("q", "k", "v"):
            yield _linear(f"{prefix}.{name}", d, inner, False, "attention", layer)
        yield _linear(f"{prefix}.o", inner, d, False, "attention", layer)
        if relative_bias:
            yield ModuleSpec(f"{prefix}.relative_attention_bias", "embedding", "attention",
                             (("weight", config.relative_attention_num_buckets * heads),),
                             config.relative_attention_num_buckets, heads, layer)

    def feed_forward(prefix: str, layer: int) -> Iterator[ModuleSpec]:
        if gated:
            yield _linear(f"{prefix}.wi_0", d, ff, False, "mlp", layer)
            yield _linear(f"{prefix}.wi_1", d, ff, False, "mlp", layer)
        else:
            yield _linear(f"{prefix}.wi", d, ff, False, "mlp", layer)
        yield _linear(f"{prefix}.wo", ff, d, False, "mlp", layer)

    # T5ForSequenceClassification and T5ForTokenClassification keep the stacks under `transformer` (a T5Model, a
    # T5EncoderModel: no decoder); T5ForQuestionAnswering and the language model hold them at the top.
    task = _task_type(config)
    top = "transformer." if task in ("SEQ_CLS", "TOKEN_CLS") else ""
    decoder = task != "TOKEN_CLS"
    if not decoder:
        n_dec = 0

    def modules() -> Iterator[ModuleSpec]:
        yield _embedding(f"{top}shared", config.vocab_size, d)
        yield _embedding(f"{top}encoder.embed_tokens", config.vocab_size, d, tied_to=f"{top}shared")
        for i in range(n_enc):
            p = f"{top}encoder.block.{i}.layer"
            yield from attention(f"{p}.0.SelfAttention", i, relative_bias=i == 0)
            yield _norm(f"{p}.0.layer_norm", d, bias=False, layer=i)
            yield from feed_forward(f"{p}.1.DenseReluDense", i)
            yield _norm(f"{p}.1.layer_norm", d, bias=False, layer=i)
        yield _norm(f"{top}encoder.final_layer_norm", d, bias=False)
        if decoder:
            yield _embedding(f"{top}decoder.embed_tokens", config.vocab_size, d, tied_to=f"{top}shared")
        for j in range(n_dec):
            i = n_enc + j
            p = f"{top}decoder.block.{j}.layer"
            yield from attention(f"{p}.0.SelfAttention", i, relative_bias=j == 0)
            yield _norm(f"{p}.0.layer_norm", d, bias=False, layer=i)
            yield from attention(f"{p}.1.EncDecAttention", i, relative_bias=False)
            yield _norm(f"{p}.1.layer_norm", d, bias=False, layer=i)
            yield from feed_forward(f"{p}.2.DenseReluDense", i)
            yield _norm(f"{p}.2.layer_norm", d, bias=False, layer=i)
        if decoder:
            yield _norm(f"{top}decoder.final_layer_norm", d, bias=False)
        if task == "SEQ_CLS":  # T5ClassificationHead: dense, tanh, out_proj on the decoder's last EOS state
            yield _head("classification_head.dense", d, d, True)
            yield _head("classification_head.out_proj", d, config.num_labels, True)
        elif task is not None:  # token classification, question answering: num_labels outputs
            yield _head("classifier" if task == "TOKEN_CLS" else "qa_outputs", d, config.num_labels, True)
        else:
            yield _linear("lm_head", d, config.vocab_size, False, "head", None, tied_to="shared" if tied else None)

    return Layout("t5", tuple(modules()), d, n_enc + n_dec, heads, heads, config.d_kv, config.vocab_size,
                  ff, getattr(config, "n_positions", None), is_encoder_decoder=decoder,
                  default_lora_targets=("q", "v"), output_embeddings=_output_head(config))


def _opt(config: PretrainedConfig) -> Layout:
    h, n_layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    proj = config.word_embed_proj_dim
    bias = bool(getattr(config, "enable_bias", True))
    affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
    final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
    tied = bool(getattr(config, "tie_word_embeddings", True))

    def modules() -> Iterator[ModuleSpec]:
        p = "model.decoder"
        yield _embedding(f"{p}.embed_tokens", config.vocab_size, proj)
        yield _embedding(f"{p}.embed_positions", config.max_position_embeddings + 2, h)
        if proj != h:
            yield _linear(f"{p}.project_out", h, proj, False, "head", None)
            yield _linear(f"{p}.project_in", proj, h, False, "embeddings", None)
        if final_norm:
            yield _norm(f"{p}.final_layer_norm", h, bias=True, affine=affine)
        for i in range(n_layers):
            q = f"{p}.layers.{i}"
            for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
                yield _linear(f"{q}.self_attn.{name}", h, h, bias, "attention", i)
            yield _norm(f"{q}.self_attn_layer_norm", h, bias=True, layer=i, affine=affine)
            yield _linear(f"{q}.fc1", h, config.ffn_dim, bias, "mlp", i)
            yield _linear(f"{q}.fc2", config.ffn_dim, h, bias, "mlp", i)
            yield _norm(f"{q}.final_layer_norm", h, bias=True, layer=i, affine=affine)
        if _task_type(config):  # transformers has no OPTForTokenClassification (check_task refuses it)
            yield from _decoder_task_head(config, proj, False, "classifier", True)
            return
        yield _linear("lm_head", proj, config.vocab_size, False, "head", None,
                      tied_to=f"{p}.embed_tokens" if tied else None)

    return Layout("opt", tuple(modules()), h, n_layers, heads, heads, h // heads, config.vocab_size,
                  config.ffn_dim, config.max_position_embeddings, default_lora_targets=("q_proj", "v_proj"),
                  output_embeddings=_output_head(config))


def _bloom(config: PretrainedConfig) -> Layout:
    h, n_layers, heads = config.hidden_size, config.n_layer, config.n_head

    def modules() -> Iterator[ModuleSpec]:
        yield _embedding("transformer.word_embeddings", config.vocab_size, h)
        yield _norm("transformer.word_embeddings_layernorm", h, bias=True)
        for i in range(n_layers):
            p = f"transformer.h.{i}"
            yield _norm(f"{p}.input_layernorm", h, bias=True, layer=i)
            yield _linear(f"{p}.self_attention.query_key_value", h, 3 * h, True, "attention", i)
            yield _linear(f"{p}.self_attention.dense", h, h, True, "attention", i)
            yield _norm(f"{p}.post_attention_layernorm", h, bias=True, layer=i)
            yield _linear(f"{p}.mlp.dense_h_to_4h", h, 4 * h, True, "mlp", i)
            yield _linear(f"{p}.mlp.dense_4h_to_h", 4 * h, h, True, "mlp", i)
        yield _norm("transformer.ln_f", h, bias=True)
        if _task_type(config):
            yield from _decoder_task_head(config, h, False, "classifier", True)
            return
        yield _linear("lm_head", h, config.vocab_size, False, "head", None,
                      tied_to="transformer.word_embeddings")

    # BLOOM uses ALiBi: no position table, so no maximum length is fixed by the weights.
    return Layout("bloom", tuple(modules()), h, n_layers, heads, heads, h // heads, config.vocab_size,
                  4 * h, getattr(config, "seq_length", None), default_lora_targets=("query_key_value",),
                  output_embeddings=_output_head(config))


def _output_head(config: PretrainedConfig) -> str | None:
    """A task-head class has no output embeddings (transformers' ``get_output_embeddings()`` returns its
    ``lm_head``, which it lacks): None. "" for the language-model classes, whose head targeting.output_head finds."""
    return None if _task_type(config) else ""


_BUILDERS = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "gpt2": _gpt2,
    "bert": _bert_like,
    "roberta": _bert_like,
    "t5": _t5,
    "opt": _opt,
    "bloom": _bloom,
}
