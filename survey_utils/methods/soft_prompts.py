r"""Soft prompts: the method trains vectors that the frozen model reads as extra positions (chapter 02).

Instead of changing weights, these methods add positions to the sequence the transformer sees:

- **prompt tuning** and **P-tuning** prepend :math:`n` trainable vectors to the input embeddings, so the
  sequence grows from :math:`L` to :math:`n + L` positions in every layer (queries, keys and activations);
- **prefix tuning** and **P-tuning v2** prepend :math:`n` trainable key and value vectors to the attention
  of every layer: queries stay at :math:`L` positions, keys and values grow to :math:`n + L`;
- **LLaMA-Adapter** adds ``adapter_len`` key/value positions to the top layers through a separate,
  zero-gated softmax, so the real tokens keep their positions.

Xu et al. 2023 and Wang et al. 2024 put prompt and prefix tuning in the "soft prompt" group of the additive
family; Lialin et al. 2023 in the "soft prompts" region of additive methods (``data/catalogue.csv``).

Implementation: ``apply`` freezes the model, attaches the trainable module as ``model.prompt_encoder`` (the
base model's parameter names are untouched, so counting attributes them exactly) and registers a forward
pre-hook on the model that, on every call, prepends the prompt to ``inputs_embeds`` or passes the
prefixes as a ``past_key_values`` cache, and extends ``attention_mask`` (and ``labels``/``token_type_ids``)
by :math:`n` positions, as HF peft 0.21 does. Logits therefore cover the :math:`n` virtual positions too
(peft's convention); forward passes only, not ``generate``. The modules and hooks live in
``layers/prompts.py``, imported inside ``apply``: this file, with every closed form, loads without torch.

Conventions, where they differ from peft's defaults (chapter 02 says so and ``tests/methods/
test_soft_prompts.py`` pins both numbers):

- encoder-decoder (T5): one table of :math:`n` prompt vectors, read by the encoder. peft's
  ``SEQ_2_SEQ_LM`` default (``num_transformer_submodules=2``) creates :math:`2n` rows and only feeds the
  first :math:`n` to the model; our ``peft_config`` sets ``num_transformer_submodules=1``;
- prefixes on T5 go to the decoder's self-attention only (T5's encoder stack drops any cache), one
  key/value pair per decoder block;
- prompt width is the input-embedding width (OPT-350m projects 512 -> 1024), prefix width is the key/value
  width ``num_kv_heads * head_dim`` (grouped-query attention, T5-3B's 32 x 128); ``peft_config`` passes both
  as ``token_dim`` so that peft builds the same shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from survey_utils.architecture import layout
from survey_utils.errors import SurveyError
from survey_utils.methods.common import freeze, model_label
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, register, saves_nothing

if TYPE_CHECKING:  # typing only: the layers (and torch) are imported inside ``apply``
    import torch
    from torch import nn
    from transformers import PretrainedConfig

ADAPTION_MODEL_TYPES = ("llama", "mistral")  # the llama-like decoders peft's adaption prompt implements


# --- shapes, from the config alone ----------------------------------------------------------------------
def embedding_width(config: PretrainedConfig) -> int:
    """Width of the input token embeddings (the vectors a prompt must match)."""
    shape = layout(config)
    width = next((m.out_features for m in shape.modules if m.kind == "embedding" and m.in_features == shape.vocab_size),
                 None)
    if width is None:  # CPM-Ant's input table adds prompt rows, Moshi's has one row more: none has vocab_size rows
        raise SurveyError(f"{model_label(config)}: no embedding table has vocab_size={shape.vocab_size} rows, so the "
                          "width a soft prompt must match is unknown")
    return width


def kv_width(config: PretrainedConfig) -> int:
    """Width of one position's key (or value): ``num_kv_heads * head_dim`` (GQA-aware)."""
    shape = layout(config)
    return shape.num_kv_heads * shape.head_dim


def prefix_layers(config: PretrainedConfig) -> int:
    """Attention layers that take a key/value prefix: every block, or T5's decoder blocks."""
    shape = layout(config)
    if shape.is_encoder_decoder:
        return int(getattr(config, "num_decoder_layers", None) or config.num_layers)
    return shape.num_layers


def check_context(config: PretrainedConfig, num_virtual_tokens: int, seq_len: int) -> None:
    """Raise a one-line :class:`SurveyError` when ``num_virtual_tokens + seq_len`` exceeds the context."""
    limit = layout(config).max_positions
    if limit is not None and num_virtual_tokens + seq_len > limit:
        raise SurveyError(
            f"{num_virtual_tokens} virtual tokens + {seq_len} input tokens = {num_virtual_tokens + seq_len} "
            f"positions do not fit {model_label(config)}'s context of {limit} positions"
        )


def peft_task_type(config: PretrainedConfig) -> str:
    """The peft task type whose prompt-learning forward matches ours for this architecture: a task-head model's own
    (:attr:`Layout.task_type`, whose peft model trains the head too), else by the architecture's shape."""
    if layout(config).task_type is not None:
        return layout(config).task_type
    if layout(config).is_encoder_decoder:
        return "SEQ_2_SEQ_LM"
    return "FEATURE_EXTRACTION" if config.model_type in ("bert", "roberta") else "CAUSAL_LM"


def _like(model: nn.Module) -> torch.Tensor:
    return model.get_input_embeddings().weight


# --- prompt tuning and P-tuning: vectors prepended to the input ------------------------------------------
def apply_prompt_tuning(model: nn.Module, num_virtual_tokens: int, prompt_tuning_init: str,
                        prompt_tuning_init_text: str | None, tokenizer_name_or_path: str | None,
                        **_: Any) -> nn.Module:
    """Freeze ``model`` and prepend ``num_virtual_tokens`` trainable input vectors."""
    from survey_utils.methods.layers.prompts import PromptEmbedding, install_soft_prompt

    token_ids = None
    if prompt_tuning_init == "TEXT" and _like(model).device.type != "meta":
        token_ids = _tokenize(prompt_tuning_init_text, tokenizer_name_or_path)
    encoder = PromptEmbedding(num_virtual_tokens, model.get_input_embeddings(), prompt_tuning_init, token_ids)
    return install_soft_prompt(model, encoder)


def _tokenize(text: str | None, tokenizer: str | None) -> list[int]:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer)(text)["input_ids"]
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0][:120]
        raise SurveyError(f"tokenizer_name_or_path={tokenizer!r} could not be loaded ({reason})") from None


def apply_p_tuning(model: nn.Module, num_virtual_tokens: int, encoder_reparameterization_type: str,
                   encoder_hidden_size: int, encoder_num_layers: int, encoder_dropout: float,
                   **_: Any) -> nn.Module:
    """Freeze ``model`` and prepend the output of a trainable prompt encoder."""
    from survey_utils.methods.layers.prompts import PromptEncoder, install_soft_prompt

    encoder = PromptEncoder(num_virtual_tokens, _like(model), encoder_reparameterization_type,
                            encoder_hidden_size or embedding_width(model.config), encoder_num_layers,
                            encoder_dropout)
    return install_soft_prompt(model, encoder)


def prompt_tuning_params(config: PretrainedConfig, num_virtual_tokens: int, **_: Any) -> int:
    r""":math:`n\,d_\text{emb}`: one table of virtual token embeddings."""
    return num_virtual_tokens * embedding_width(config)


def p_tuning_params(config: PretrainedConfig, num_virtual_tokens: int, encoder_reparameterization_type: str,
                    encoder_hidden_size: int, encoder_num_layers: int, **_: Any) -> int:
    r""":math:`n d + \text{MLP}(d{\to}e{\to}e{\to}d)`, or :math:`n d + \text{BiLSTM}_k(d, e) + \text{MLP}(2e{\to}2e{\to}d)`."""
    d = embedding_width(config)
    e = encoder_hidden_size or d
    if encoder_reparameterization_type == "MLP":
        return num_virtual_tokens * d + (d * e + e) + (e * e + e) + (e * d + d)
    lstm = sum(2 * (4 * e * ((d if layer == 0 else 2 * e) + e) + 8 * e) for layer in range(encoder_num_layers))
    return num_virtual_tokens * d + lstm + (2 * e * 2 * e + 2 * e) + (2 * e * d + d)


# --- prefix tuning and P-tuning v2: key/value vectors prepended in every layer --------------------------
def apply_prefix_tuning(model: nn.Module, num_virtual_tokens: int, prefix_projection: bool,
                        encoder_hidden_size: int, **_: Any) -> nn.Module:
    """Freeze ``model`` and give every (decoder) attention layer n trainable key/value positions."""
    from survey_utils.methods.layers.prompts import PrefixEncoder, install_soft_prompt

    shape = layout(model.config)
    encoder = PrefixEncoder(num_virtual_tokens, prefix_layers(model.config), shape.num_kv_heads, shape.head_dim,
                            prefix_projection, encoder_hidden_size or kv_width(model.config), _like(model))
    return install_soft_prompt(model, encoder)


def prefix_tuning_params(config: PretrainedConfig, num_virtual_tokens: int, prefix_projection: bool,
                         encoder_hidden_size: int, **_: Any) -> int:
    r""":math:`n\cdot 2Lt`; with the MLP :math:`n t + (t e + e) + (e\cdot 2Lt + 2Lt)`, :math:`t` = key/value width."""
    t, two_l = kv_width(config), 2 * prefix_layers(config)
    if not prefix_projection:
        return num_virtual_tokens * two_l * t
    e = encoder_hidden_size or t
    return num_virtual_tokens * t + (t * e + e) + (e * two_l * t + two_l * t)


# --- LLaMA-Adapter: zero-gated adaption prompts in the top layers ---------------------------------------
def apply_llama_adapter(model: nn.Module, adapter_len: int, adapter_layers: int, **_: Any) -> nn.Module:
    r"""LLaMA-Adapter (Zhang et al. 2023, arXiv:2303.16199) on the top ``adapter_layers`` blocks.

    Each adapted attention gets a prompt :math:`P \in \mathbb{R}^{K\times h}` (N(0,1) init), projected by the
    frozen ``k_proj``/``v_proj``, and a gate :math:`g` initialised at zero, so the model is unchanged at
    init: :math:`o = \mathrm{attn}(x) + W_o\,g\,\mathrm{softmax}(q P_K^\top/\sqrt{d_h}) P_V`. One scalar gate
    per layer (peft's choice; the paper gates per head).
    """
    from survey_utils.methods.layers.prompts import install_adaption_prompt

    freeze(model)
    layers = model.model.layers
    for block in list(layers)[len(layers) - adapter_layers:]:
        install_adaption_prompt(block.self_attn, adapter_len)
    return model


def llama_adapter_params(config: PretrainedConfig, adapter_len: int, adapter_layers: int, **_: Any) -> int:
    r""":math:`L_a\,(K h + 1)`: a K x h prompt and one gate in each of the top :math:`L_a` layers."""
    return adapter_layers * (adapter_len * layout(config).hidden_size + 1)


def validate_llama_adapter(config: PretrainedConfig, adapter_len: int, adapter_layers: int, **_: Any) -> None:
    if config.model_type not in ADAPTION_MODEL_TYPES:
        raise SurveyError(f"llama_adapter needs a llama-like decoder ({', '.join(ADAPTION_MODEL_TYPES)}); "
                          f"{model_label(config)} is '{config.model_type}'")
    blocks = layout(config).num_layers
    if adapter_layers > blocks:
        raise SurveyError(f"adapter_layers={adapter_layers} is more than {model_label(config)}'s {blocks} layers")


def llama_adapter_peft_config(config: PretrainedConfig, adapter_len: int, adapter_layers: int, **_: Any) -> Any:
    from peft import AdaptionPromptConfig

    return AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=adapter_len, adapter_layers=adapter_layers)


# --- validation, positions, peft configs ----------------------------------------------------------------
def validate_prompt(config: PretrainedConfig, num_virtual_tokens: int, **hp: Any) -> None:
    """The prompt alone must leave room for at least one real token."""
    check_context(config, num_virtual_tokens, 1)
    if hp.get("prompt_tuning_init") == "TEXT" and not (hp.get("prompt_tuning_init_text")
                                                         and hp.get("tokenizer_name_or_path")):
        raise SurveyError("prompt_tuning_init=TEXT needs prompt_tuning_init_text and tokenizer_name_or_path")


def virtual_positions(config: PretrainedConfig, num_virtual_tokens: int, **_: Any) -> int:
    """Prompt methods: n more positions everywhere. Prefix methods: n more key/value positions in each
    prefixed layer (queries unchanged), and the real tokens' positions start at n; both count n here."""
    return num_virtual_tokens


def prefix_memory_sites(config: PretrainedConfig, **_: Any) -> list[Any]:
    """Where the prefixes' gradients enter (``Method.gradient_sites``, read by the memory estimate):
    the key/value projections of every prefixed attention (T5: the decoder's self-attention)."""
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    names = ("k_proj", "v_proj", "c_attn", "key", "value", "k", "v", "query_key_value")
    return [m for m in layout(config).modules if m.component == "attention" and m.short_name in names
            and (not enc_dec or (m.name.startswith("decoder.") and ".SelfAttention." in m.name))]


def llama_adapter_memory_sites(config: PretrainedConfig, adapter_layers: int, **_: Any) -> list[Any]:
    """The adapted layers' attention outputs, where the gated prompt branch joins (memory estimate)."""
    shape = layout(config)
    return [m for m in shape.modules if m.short_name == "o_proj" and m.layer is not None
            and m.layer >= shape.num_layers - adapter_layers]


def llama_adapter_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                               adapter_bytes: int, adapter_len: int, adapter_layers: int, **_: Any) -> dict[str, int]:
    """Saved per adapted layer: the rotated queries (for the prompt keys' gradient), the fp32 softmax over
    the K prompt positions, its cast and its gated copy."""
    shape = layout(config)
    probs = batch_size * shape.num_heads * seq_len * adapter_len
    query = act_bytes * batch_size * seq_len * shape.num_heads * shape.head_dim
    return {"adaption queries and scores": adapter_layers * (query + 4 * probs + 2 * act_bytes * probs)}




def _prompt_learning_common(config: PretrainedConfig, num_virtual_tokens: int) -> dict[str, Any]:
    return {"task_type": peft_task_type(config), "num_virtual_tokens": num_virtual_tokens,
            "num_transformer_submodules": 1}


def prompt_tuning_peft_config(config: PretrainedConfig, num_virtual_tokens: int, prompt_tuning_init: str,
                              prompt_tuning_init_text: str | None, tokenizer_name_or_path: str | None,
                              **_: Any) -> Any:
    from peft import PromptTuningConfig

    # peft reads num_layers and num_attention_heads from the model config for every prompt-learning method and stops
    # where a config names them otherwise (MPT's n_heads, T5Gemma's sub-configs); prompt tuning uses neither, so the
    # layout's values stand in for them (a user of peft on those models passes them by hand).
    shape = layout(config)
    return PromptTuningConfig(**_prompt_learning_common(config, num_virtual_tokens),
                              num_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                              token_dim=embedding_width(config), prompt_tuning_init=prompt_tuning_init,
                              prompt_tuning_init_text=prompt_tuning_init_text,
                              tokenizer_name_or_path=tokenizer_name_or_path)


def p_tuning_peft_config(config: PretrainedConfig, num_virtual_tokens: int, encoder_reparameterization_type: str,
                         encoder_hidden_size: int, encoder_num_layers: int, encoder_dropout: float,
                         **_: Any) -> Any:
    from peft import PromptEncoderConfig

    if encoder_reparameterization_type == "MLP":
        # The MLP ignores encoder_num_layers; peft 0.21.2 crashes (AttributeError) on any value but its default 2.
        encoder_num_layers = 2
    return PromptEncoderConfig(**_prompt_learning_common(config, num_virtual_tokens),
                               token_dim=embedding_width(config),
                               encoder_reparameterization_type=encoder_reparameterization_type,
                               encoder_hidden_size=encoder_hidden_size or embedding_width(config),
                               encoder_num_layers=encoder_num_layers,
                               encoder_dropout=encoder_dropout)


def prefix_tuning_peft_config(config: PretrainedConfig, num_virtual_tokens: int, prefix_projection: bool,
                              encoder_hidden_size: int, **_: Any) -> Any:
    """peft's default for T5 is ``num_transformer_submodules=2`` (needed by its seq2seq cache path)."""
    from peft import PrefixTuningConfig

    shape = layout(config)
    return PrefixTuningConfig(task_type=peft_task_type(config), num_virtual_tokens=num_virtual_tokens,
                              prefix_projection=prefix_projection,
                              encoder_hidden_size=encoder_hidden_size or kv_width(config),
                              token_dim=kv_width(config), num_attention_heads=shape.num_kv_heads,
                              num_layers=prefix_layers(config))


def load_prompt_from_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Copy peft's prompt table (and encoder) into ours (``Method.peft_state_sync``); returns tensors copied.

    For T5 prefixes peft feeds decoder layer i the blocks (4i, 4i+1) mod 2L of its table (half of the
    table is never read); those blocks are copied into our layer i.
    """
    import torch

    from survey_utils.methods.layers.prompts import PrefixEncoder

    state = theirs.prompt_encoder["default"]
    with torch.no_grad():
        if layout(ours.config).is_encoder_decoder and isinstance(ours.prompt_encoder, PrefixEncoder):
            ours.prompt_encoder.load_state_dict(state.state_dict())
            ours.prompt_encoder.fold()
            layers, width = prefix_layers(ours.config), kv_width(ours.config)
            table = state.transform(state.embedding.weight) if state.prefix_projection else state.embedding.weight
            blocks = [b % (2 * layers) for i in range(layers) for b in (4 * i, 4 * i + 1)]
            n = ours.prompt_encoder.num_virtual_tokens
            ours.prompt_encoder.embedding.weight.copy_(table.view(n, 2 * layers, width)[:, blocks].reshape(n, -1))
        else:
            ours.prompt_encoder.load_state_dict(state.state_dict())
    return len(state.state_dict())


def load_adaption_from_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Open peft's zero-initialised gates (0.7, so that the prompts matter) and copy its adaption prompts
    and gates into ours (``Method.peft_state_sync``); returns tensors copied."""
    import torch

    copied = 0
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "adaption_" in name:
                if name.endswith("adaption_gate"):
                    parameter.fill_(0.7)
                ours.get_parameter(name.replace("base_model.model.", "", 1)).copy_(parameter)
                copied += 1
    return copied


# --- registration ---------------------------------------------------------------------------------------
N_TOKENS = HyperParam("num_virtual_tokens", "int", 20, "n: virtual tokens (prompt length)", minimum=1)
# peft's defaults: encoder_hidden_size=None (P-tuning: the embedding width; prefix tuning has no default and
# needs one with the MLP, so None takes the key/value width there) and prefix_projection=False. Chapter 02
# passes the papers' settings (Li & Liang's MLP, e=512) explicitly.
ENCODER_SIZE = HyperParam("encoder_hidden_size", "int", None,
                          "hidden width e of the reparameterisation network; None: the embedding width "
                          "(P-tuning, peft's default) or the key/value width (prefix tuning's MLP)",
                          minimum=1, nullable=True)
SOFT = Taxonomy(xu="additive / soft prompt-based", wang="additive / soft prompt", lialin="A:soft_prompts")
PREFIX_HPS = (N_TOKENS, HyperParam("prefix_projection", "bool", False,
                                   "train the prefixes through an MLP (Li & Liang's reparameterisation; "
                                   "peft's default: off)"),
              ENCODER_SIZE)

register(Method(
    name="prompt_tuning", title="Prompt tuning",
    paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning (EMNLP 2021)",
    arxiv_id="2104.08691", taxonomy=SOFT, chapter="02_additive_soft_prompts",
    hyperparams=(N_TOKENS,
                 HyperParam("prompt_tuning_init", "str", "RANDOM", "initialisation of the prompt",
                            choices=("RANDOM", "SAMPLE_VOCAB", "TEXT")),
                 HyperParam("prompt_tuning_init_text", "str", None, "text whose embeddings start the prompt (TEXT)",
                            nullable=True),
                 HyperParam("tokenizer_name_or_path", "str", None, "tokenizer for the init text (TEXT)",
                            nullable=True)),
    apply=apply_prompt_tuning, trainable_params=prompt_tuning_params, peft_config=prompt_tuning_peft_config,
    validate=validate_prompt, extra_positions=virtual_positions, param_prefixes=("prompt_encoder",),
    memory_terms=saves_nothing, peft_state_sync=load_prompt_from_peft,
))

register(Method(
    name="p_tuning", title="P-tuning",
    paper="Liu et al. 2021, GPT Understands, Too (AI Open 2023)",
    arxiv_id="2103.10385",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang="additive / soft prompt", lialin=NOT_PLACED),
    chapter="02_additive_soft_prompts",
    hyperparams=(N_TOKENS,
                 HyperParam("encoder_reparameterization_type", "str", "MLP", "prompt encoder network",
                            choices=("MLP", "LSTM")),
                 ENCODER_SIZE,
                 HyperParam("encoder_num_layers", "int", 2, "LSTM layers (LSTM encoder only)", minimum=1,
                            maximum=4),
                 HyperParam("encoder_dropout", "float", 0.0, "dropout between LSTM layers", minimum=0,
                            maximum=0.99)),
    apply=apply_p_tuning, trainable_params=p_tuning_params, peft_config=p_tuning_peft_config,
    validate=validate_prompt, extra_positions=virtual_positions, param_prefixes=("prompt_encoder",),
    memory_terms=saves_nothing, peft_state_sync=load_prompt_from_peft,
))

register(Method(
    name="prefix_tuning", title="Prefix tuning",
    paper="Li & Liang 2021, Prefix-Tuning: Optimizing Continuous Prompts for Generation (ACL 2021)",
    arxiv_id="2101.00190", taxonomy=SOFT, chapter="02_additive_soft_prompts",
    hyperparams=PREFIX_HPS,
    apply=apply_prefix_tuning, trainable_params=prefix_tuning_params, peft_config=prefix_tuning_peft_config,
    validate=validate_prompt, extra_positions=virtual_positions, param_prefixes=("prompt_encoder",),
    memory_terms=saves_nothing, peft_state_sync=load_prompt_from_peft,
    key_value_positions=True, gradient_sites=prefix_memory_sites,
))

register(Method(
    name="p_tuning_v2", title="P-tuning v2 (deep prompt tuning)",
    paper="Liu et al. 2022, P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across "
          "Scales and Tasks (ACL 2022)",
    arxiv_id="2110.07602",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED),
    chapter="02_additive_soft_prompts",
    hyperparams=(N_TOKENS, HyperParam("prefix_projection", "bool", False,
                                      "reparameterise through an MLP (optional in P-tuning v2)"), ENCODER_SIZE),
    apply=apply_prefix_tuning, trainable_params=prefix_tuning_params, peft_config=prefix_tuning_peft_config,
    validate=validate_prompt, extra_positions=virtual_positions, param_prefixes=("prompt_encoder",),
    memory_terms=saves_nothing, peft_state_sync=load_prompt_from_peft,
    key_value_positions=True, gradient_sites=prefix_memory_sites,
    notes="deep prompts in every layer = prefix tuning without the MLP by default (peft: PrefixTuningConfig)",
))

register(Method(
    name="llama_adapter", title="LLaMA-Adapter (adaption prompts)",
    paper="Zhang et al. 2023, LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init "
          "Attention (ICLR 2024)",
    arxiv_id="2303.16199",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED),
    chapter="02_additive_soft_prompts",
    hyperparams=(HyperParam("adapter_len", "int", 10, "K: adaption prompt length per layer (paper: 10)",
                            minimum=1),
                 HyperParam("adapter_layers", "int", 30, "top layers that get a prompt (paper: 30 of LLaMA-7B's 32)",
                            minimum=1)),
    apply=apply_llama_adapter, trainable_params=llama_adapter_params, peft_config=llama_adapter_peft_config,
    validate=validate_llama_adapter, param_prefixes=("adaption_",),
    memory_terms=llama_adapter_memory_terms, gradient_sites=llama_adapter_memory_sites,
    peft_state_sync=load_adaption_from_peft,
    notes="extra key positions only inside the adapted layers' separate softmax; no position is added",
))
