r"""The nn.Module layers and forward hooks of the soft-prompt methods (chapter 02); registered in
``methods/soft_prompts.py``.

- :class:`PromptEmbedding` (prompt tuning) and :class:`PromptEncoder` (P-tuning) make the n vectors that
  :func:`_prompt_pre_hook` prepends to the input embeddings;
- :class:`PrefixEncoder` (prefix tuning, P-tuning v2) makes the n key/value pairs per layer that
  :func:`_prefix_pre_hook` passes as a ``past_key_values`` cache;
- :func:`_adaption_hook` adds LLaMA-Adapter's zero-gated prompt attention to an attention module's output.

:func:`install_soft_prompt` attaches an encoder as ``model.prompt_encoder`` with its pre-hook;
:func:`remove_soft_prompt` takes it off again. Only the methods' ``apply`` functions (and output parity's
``peft_state_sync``) import this module.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from survey_utils.errors import SurveyError
from survey_utils.methods.common import freeze, new_parameter
from survey_utils.methods.soft_prompts import _like, check_context


def _factory(like: torch.Tensor) -> dict[str, Any]:
    return {"device": like.device, "dtype": like.dtype}


# --- prompt tuning and P-tuning: vectors prepended to the input ------------------------------------------
class PromptEmbedding(nn.Module):
    r"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): :math:`[P; E(x)]`, :math:`P \in \mathbb{R}^{n\times d}`.

    The only trainable tensor is ``embedding.weight`` (n x d). Init (``prompt_tuning_init``): ``RANDOM``
    draws :math:`\mathcal{U}(-0.5, 0.5)` (the paper's random init), ``SAMPLE_VOCAB`` copies n random rows
    of the vocabulary, ``TEXT`` copies the embeddings of a tokenised text, repeated or cut to n tokens.
    """

    def __init__(self, num_virtual_tokens: int, word_embeddings: nn.Embedding, init: str = "RANDOM",
                 token_ids: list[int] | None = None) -> None:
        super().__init__()
        like = word_embeddings.weight
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, like.shape[1], **_factory(like))
        if like.device.type == "meta":
            return
        with torch.no_grad():
            if init == "RANDOM":
                nn.init.uniform_(self.embedding.weight, -0.5, 0.5)
            else:
                if init == "SAMPLE_VOCAB":
                    token_ids = torch.randint(0, like.shape[0], (num_virtual_tokens,)).tolist()
                ids = (list(token_ids or []) * num_virtual_tokens)[:num_virtual_tokens]
                if not ids:
                    raise SurveyError("prompt_tuning_init=TEXT needs a non-empty prompt_tuning_init_text")
                self.embedding.weight.copy_(like[torch.tensor(ids, device=like.device)])

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embedding.weight.unsqueeze(0).expand(batch_size, -1, -1)


class PromptEncoder(nn.Module):
    r"""P-tuning (Liu et al. 2021, arXiv:2103.10385): :math:`P = \mathrm{head}(E_p)`, prepended to the input.

    ``embedding`` (n x d) is re-parameterised by a prompt encoder: ``MLP`` is
    Linear(d,e)-ReLU-Linear(e,e)-ReLU-Linear(e,d); ``LSTM`` is a bidirectional LSTM (hidden e,
    ``encoder_num_layers`` layers) then Linear(2e,2e)-ReLU-Linear(2e,d). Default PyTorch inits; the
    encoder can be dropped after training by storing its output (n x d), as for prompt tuning.
    """

    def __init__(self, num_virtual_tokens: int, like: torch.Tensor, encoder_reparameterization_type: str,
                 encoder_hidden_size: int, encoder_num_layers: int, encoder_dropout: float) -> None:
        super().__init__()
        d, e, f = like.shape[1], encoder_hidden_size, _factory(like)
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder_type = encoder_reparameterization_type
        self.embedding = nn.Embedding(num_virtual_tokens, d, **f)
        if self.encoder_type == "LSTM":
            dropout = encoder_dropout if encoder_num_layers > 1 else 0.0  # torch applies it between layers only
            self.lstm_head = nn.LSTM(d, e, num_layers=encoder_num_layers, dropout=dropout,
                                     bidirectional=True, batch_first=True, **f)
            self.mlp_head = nn.Sequential(nn.Linear(2 * e, 2 * e, **f), nn.ReLU(), nn.Linear(2 * e, d, **f))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, e, **f), nn.ReLU(), nn.Linear(e, e, **f), nn.ReLU(),
                                          nn.Linear(e, d, **f))

    def forward(self, batch_size: int) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x)[0]
        return self.mlp_head(x).expand(batch_size, -1, -1)


def _keywords(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    if len(args) > 1:
        raise SurveyError(f"pass the model's inputs by keyword with a soft prompt ({len(args)} positional given)")
    return {**kwargs, "input_ids": args[0]} if args else dict(kwargs)


def _prompt_pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Prepend the prompt to the (encoder) input and widen the masks by n positions."""
    kwargs = _keywords(args, kwargs)
    if kwargs.get("position_ids") is not None:
        raise SurveyError("position_ids cannot be passed with a prompt: the prompt takes positions 0..n-1")
    encoder = model.prompt_encoder
    n = encoder.num_virtual_tokens
    embeds = kwargs.pop("inputs_embeds", None)
    input_ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(input_ids)
    batch, length = embeds.shape[:2]
    check_context(model.config, n, length)
    kwargs["inputs_embeds"] = torch.cat([encoder(batch).to(embeds.dtype), embeds], dim=1)
    if kwargs.get("attention_mask") is not None:
        mask = kwargs["attention_mask"]
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    if not getattr(model.config, "is_encoder_decoder", False):  # T5: the decoder side is untouched
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
    return (), kwargs


# --- prefix tuning and P-tuning v2: key/value vectors prepended in every layer --------------------------
class PrefixEncoder(nn.Module):
    r"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): in layer :math:`l`,
    :math:`\mathrm{softmax}\big(q\,[P^l_K; K]^\top/\sqrt{d_h}\big)\,[P^l_V; V]`.

    With ``prefix_projection`` the :math:`L\cdot 2` prefixes of width :math:`t` (the key/value width) are
    :math:`P = \mathrm{MLP}(E)`, :math:`E \in \mathbb{R}^{n\times t}`, MLP = Linear(t,e)-tanh-Linear(e, 2Lt):
    the reparameterisation that stabilises training. :meth:`fold` stores the MLP's output as a plain
    (n x 2Lt) table and drops the MLP: same outputs, only the prefixes remain. Without it (P-tuning v2's deep
    prompts), the table is trained directly. Default PyTorch inits (``nn.Embedding``: N(0, 1)).
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_heads: int, head_dim: int,
                 prefix_projection: bool, encoder_hidden_size: int, like: torch.Tensor) -> None:
        super().__init__()
        self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
        self.num_heads, self.head_dim = num_heads, head_dim
        self.prefix_projection = prefix_projection
        t, f = num_heads * head_dim, _factory(like)
        if prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, t, **f)
            self.transform = nn.Sequential(nn.Linear(t, encoder_hidden_size, **f), nn.Tanh(),
                                           nn.Linear(encoder_hidden_size, num_layers * 2 * t, **f))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, num_layers * 2 * t, **f)

    def prefixes(self) -> torch.Tensor:
        """All prefixes, (n, 2L t): for layer l, key at block 2l and value at block 2l + 1."""
        weight = self.embedding.weight
        return self.transform(weight) if self.prefix_projection else weight

    @torch.no_grad()
    def fold(self) -> None:
        """Replace embedding + MLP by the prefixes they produce (after training; outputs unchanged)."""
        if not self.prefix_projection:
            return
        table = self.prefixes().detach().clone()
        del self.transform
        self.embedding = nn.Embedding(table.shape[0], table.shape[1], device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.prefix_projection = False

    def cache_pairs(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n, layers, heads, hd = self.num_virtual_tokens, self.num_layers, self.num_heads, self.head_dim
        kv = self.prefixes().to(dtype).view(n, 2 * layers, heads, hd).permute(1, 2, 0, 3)  # (2L, H, n, hd)
        kv = kv.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]


def _prefix_pre_hook(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """Pass the prefixes as a fresh ``past_key_values`` cache; widen the masks and shift position ids."""
    kwargs = _keywords(args, kwargs)
    encoder = model.prompt_encoder
    n = encoder.num_virtual_tokens
    if kwargs.get("past_key_values") is not None:
        raise SurveyError("past_key_values cannot be passed with prefix tuning: the prefixes are the cache")
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    side = ("decoder_input_ids", "decoder_inputs_embeds", "labels") if enc_dec else ("input_ids", "inputs_embeds")
    ref = next((kwargs[k] for k in side if kwargs.get(k) is not None), None)
    if ref is None:
        raise SurveyError(f"prefix tuning needs one of {', '.join(side)} to size the prefixes")
    batch, length = ref.shape[:2]
    check_context(model.config, n, length)
    pairs = encoder.cache_pairs(batch, _like(model).dtype)
    if enc_dec:
        cache: Any = EncoderDecoderCache(DynamicCache(pairs), DynamicCache())
        mask_key = "decoder_attention_mask"
    else:
        cache = DynamicCache(pairs)
        mask_key = "attention_mask"
    kwargs["past_key_values"] = cache
    if kwargs.get(mask_key) is not None:
        mask = kwargs[mask_key]
        kwargs[mask_key] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n
    return (), kwargs


# --- installing and removing a soft prompt --------------------------------------------------------------
def install_soft_prompt(model: nn.Module, encoder: nn.Module) -> nn.Module:
    """Freeze ``model``, attach ``encoder`` as ``model.prompt_encoder`` and register the forward pre-hook that
    feeds it: :func:`_prefix_pre_hook` for a :class:`PrefixEncoder`, :func:`_prompt_pre_hook` otherwise."""
    freeze(model)
    if hasattr(model, "prompt_encoder"):
        raise SurveyError("the model already has a soft prompt; apply one soft-prompt method per model")
    hook = _prefix_pre_hook if isinstance(encoder, PrefixEncoder) else _prompt_pre_hook
    model.prompt_encoder = encoder
    model._soft_prompt_hook = model.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def remove_soft_prompt(model: nn.Module) -> nn.Module:
    """Detach the prompt: the model is the base model again (its weights were never touched)."""
    model._soft_prompt_hook.remove()
    del model.prompt_encoder
    del model._soft_prompt_hook
    return model


# --- LLaMA-Adapter: zero-gated adaption prompts in the top layers ---------------------------------------
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _adaption_hook(attn: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    r"""Add :math:`g\,\mathrm{softmax}(q P_K^\top/\sqrt{d_h})\,P_V` (then ``o_proj``) to the attention output."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    out, *rest = output
    batch, length, _ = hidden.shape
    heads, hd = attn.config.num_attention_heads, attn.head_dim
    prompt = attn.adaption_prompt  # (1, K, h)
    keys = attn.k_proj(prompt).view(1, prompt.shape[1], -1, hd).transpose(1, 2)
    values = attn.v_proj(prompt).view(1, prompt.shape[1], -1, hd).transpose(1, 2)
    groups = heads // keys.shape[1]  # grouped-query attention: each key/value head serves `groups` queries
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    query = attn.q_proj(hidden).view(batch, length, heads, hd).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
    scores = query @ keys.transpose(2, 3).to(query.dtype) / math.sqrt(hd)
    probs = attn.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    mixed = (probs @ values.to(query.dtype)).transpose(1, 2).reshape(batch, length, -1)
    return (out + attn.o_proj(mixed), *rest)


def install_adaption_prompt(attn: nn.Module, adapter_len: int) -> None:
    """Give one attention module a trainable prompt (1 x K x h, N(0,1)), a gate at zero and
    :func:`_adaption_hook` (LLaMA-Adapter; ``apply_llama_adapter`` holds the equation)."""
    like = attn.q_proj.weight
    attn.adaption_prompt = new_parameter((1, adapter_len, like.shape[1]), like, nn.init.normal_)
    attn.adaption_gate = new_parameter((1,), like, nn.init.zeros_)
    attn.register_forward_hook(_adaption_hook, with_kwargs=True)
