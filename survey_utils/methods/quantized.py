"""Quantized PEFT: a frozen base stored in 4 bits, adapters trained in 16 (chapter 06).

Wang et al. 2024 make quantization PEFT a family of its own (QLoRA, QA-LoRA, LoftQ, ...); Xu et al. 2023 list
QLoRA among LoRA's derivatives for quantization adaption; Lialin et al. 2023 (March 2023) predates both. The methods here compose LoRA's parts (its layer, its memory terms, its peft
mapping) with the NF4 storage of :mod:`survey_utils.quantization`; the layers live in
``methods/layers/quantized.py`` and are imported inside ``apply`` (the registry loads without torch).

Counting. A 4-bit base weight of ``d_out x d_in`` elements is counted as ``d_out * d_in`` parameters, as peft
counts bitsandbytes models; bitsandbytes stores it in ``d_out * d_in / 2`` bytes (``Params4bit.numel()`` is
that packed count). Chapter 06 prints both.
"""

from __future__ import annotations

from typing import Any

from survey_utils.architecture import layout
from survey_utils.errors import SurveyError
from survey_utils.methods.common import adapt_targets, freeze, target_specs
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, register
from survey_utils.methods.reparameterized import LORA, lora_memory_terms

LINEAR = ("linear",)
"""NF4 replaces ``nn.Linear`` only: GPT-2's transposed Conv1D is refused (one line naming it)."""

QUANT_HPS = (
    HyperParam("blocksize", "int", 64, "weights per absmax block of the NF4 base (QLoRA: 64)", minimum=1),
    HyperParam("bnb_4bit_use_double_quant", "bool", False,
               "quantize the absmax constants to 8 bits, 256 per block (transformers' BitsAndBytesConfig "
               "default: False; QLoRA's runs: True)"),
)
LORA_HPS = tuple(hp for hp in LORA.hyperparams if hp.name != "target_modules") + (
    HyperParam("target_modules", "targets", None,
               "module names (or one regex) to adapt; None takes every linear layer of the blocks (QLoRA's "
               "'all linear layers', peft's 'all-linear')", nullable=True),
)


def all_linear(config: Any) -> dict[str, list[str]]:
    """QLoRA's default targets: every linear layer inside the blocks (peft's ``all-linear``; the head is left)."""
    return {"target_modules": layout(config).linear_names()}


def _targets(config: Any, hp: dict[str, Any]) -> dict[str, Any]:
    targets = {k: hp[k] for k in ("target_modules", "layers_to_transform", "layers_pattern")}
    if targets["target_modules"] is None:
        targets.update(all_linear(config))
    return targets


def _specs(config: Any, method: str, hp: dict[str, Any]) -> list:
    return target_specs(config, method, _targets(config, hp), LINEAR)


def check_quantizable(method: str):
    """A ``validate``: targets exist and are ``nn.Linear``; each weight splits into whole blocks; LoRA's rules."""

    def validate(config: Any, blocksize: int, **hp: Any) -> None:
        LORA.validate(config, **{k: hp[k] for k in ("target_modules", "layers_to_transform", "layers_pattern")})
        for spec in _specs(config, method, hp):
            if (spec.in_features * spec.out_features) % blocksize:
                raise SurveyError(f"blocksize={blocksize} does not divide {spec.name}'s "
                                  f"{spec.out_features}x{spec.in_features} weight")
        if hp.get("loftq_iter", 1) < 1:
            raise SurveyError(f"loftq_iter={hp['loftq_iter']} must be at least 1")

    return validate


def _lora_args(hp: dict[str, Any]) -> tuple:
    return hp["r"], hp["lora_alpha"], hp["lora_dropout"], hp["use_rslora"], hp["blocksize"], \
        hp["bnb_4bit_use_double_quant"]


# --- QLoRA ------------------------------------------------------------------------------------------------

def apply_qlora(model: Any, **hp: Any) -> Any:
    r"""Freeze ``model``, store each target linear layer in NF4 and add LoRA around it (QLoRA):
    :math:`h = \mathrm{dequant}(W_0^{\text{NF4}})x + \frac{\alpha}{r}BAx`, B = 0 at initialisation
    (Dettmers et al. 2023, arXiv:2305.14314)."""
    from survey_utils.methods.layers.quantized import QLoRALinear

    freeze(model)
    adapt_targets(model, "qlora", _targets(model.config, hp), lambda base: QLoRALinear(base, *_lora_args(hp)), LINEAR)
    return model


def qlora_trainable_params(config: Any, r: int, **hp: Any) -> int:
    r""":math:`\sum_{W} r\,(d_\text{in} + d_\text{out})` over every linear layer of the blocks: LoRA's count."""
    return sum(r * (m.in_features + m.out_features) for m in _specs(config, "qlora", hp))


def qlora_peft_config(config: Any, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
                      **hp: Any) -> Any:
    """peft's ``LoraConfig`` on the same targets (peft adds LoRA to a bitsandbytes ``Linear4bit`` the same way)."""
    from peft import LoraConfig

    targets = _targets(config, hp)
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, **targets)


def qlora_memory_terms(config: Any, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                       **hp: Any) -> dict[str, int]:
    """LoRA's saved tensors on every target (each input once, ``x A``). The dequantized weight is a transient
    of one layer at a time (recomputed in backward, never saved), so it adds no term."""
    return lora_memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes,
                             **{**hp, **_targets(config, hp)})


def qlora_largest_tensor(config: Any, r: int, **hp: Any) -> int:
    """The biggest of A and B over the targets."""
    return max(r * max(m.in_features, m.out_features) for m in _specs(config, "qlora", hp))


def nf4_peft_fixup(wrapped: Any) -> None:
    """Give peft's model bitsandbytes' NF4 base at the defaults (blocks of 64, no double quantization): each
    base weight of a peft LoRA layer becomes what bitsandbytes' ``Linear4bit`` computes with
    (``quantize_4bit``, then its dequantization). Nothing to do on ``meta`` (counts only). With double
    quantization the two differ by up to 2e-4 in tiny-llama's logits: bitsandbytes' CPU kernel rounds a few
    absmax codes to the farther neighbour (``tests/test_quantization.py``)."""
    import torch
    from bitsandbytes import functional as bnb_f
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    for module in wrapped.modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "lora_A") or base.weight.is_meta:
            continue
        with torch.no_grad():
            weight = base.weight
            packed, state = bnb_f.quantize_4bit(weight.float(), blocksize=64, quant_type="nf4",
                                                compress_statistics=False)
            absmax = state.absmax
            # bitsandbytes' own pure-torch dequantization (its CPU C kernel errs where blocks cross rows),
            # unwrapped from the torch.compile it is decorated with (seconds of compiling per shape)
            weight.copy_(_dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, state.code, 64,
                                                              weight.shape, torch.float32).to(weight.dtype))


QLORA = register(Method(
    name="qlora",
    title="QLoRA",
    paper="Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs (NeurIPS 2023)",
    arxiv_id="2305.14314",
    taxonomy=Taxonomy(xu="reparameterized / LoRA derivatives / quantization adaption", wang="quantization",
                      lialin=NOT_PLACED),
    chapter="06_quantized_memory_efficient",
    hyperparams=(*LORA_HPS, *QUANT_HPS),
    apply=apply_qlora,
    trainable_params=qlora_trainable_params,
    peft_config=qlora_peft_config,
    memory_terms=qlora_memory_terms,
    validate=check_quantizable("qlora"),
    default_targets=all_linear,
    largest_trainable_tensor=qlora_largest_tensor,
    param_prefixes=("lora_",),
    peft_param_map=LORA.peft_param_map,
    peft_fixup=nf4_peft_fixup,
    base_quantization="nf4",
    notes="peft: LoraConfig on a model loaded with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
          "bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16); merging re-quantizes (rounds).",
))


# --- LoftQ ------------------------------------------------------------------------------------------------

def apply_loftq(model: Any, loftq_iter: int, **hp: Any) -> Any:
    r"""QLoRA with LoftQ's initialisation (Li et al. 2024, arXiv:2310.08659): ``loftq_iter`` rounds of
    :math:`Q_t = q_N(W - A_{t-1}B_{t-1}^\top)`, :math:`A_tB_t^\top = \mathrm{SVD}_r(W - Q_t)`, so that
    :math:`Q + \frac{\alpha}{r}BA` starts closer to W than :math:`q_N(W)`."""
    from survey_utils.methods.layers.quantized import LoftQLinear

    freeze(model)
    adapt_targets(model, "loftq", _targets(model.config, hp),
                  lambda base: LoftQLinear(base, *_lora_args(hp), loftq_iter=loftq_iter), LINEAR)
    return model


def loftq_trainable_params(config: Any, r: int, **hp: Any) -> int:
    r""":math:`\sum_{W} r\,(d_\text{in} + d_\text{out})`: QLoRA's count (LoftQ changes the initial values only)."""
    return sum(r * (m.in_features + m.out_features) for m in _specs(config, "loftq", hp))


def loftq_peft_config(config: Any, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool,
                      loftq_iter: int, **hp: Any) -> Any:
    """peft's ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=...))``."""
    from peft import LoftQConfig, LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                      init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=loftq_iter),
                      **_targets(config, hp))


register(Method(
    name="loftq",
    title="LoftQ",
    paper="Li et al. 2024, LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models (ICLR 2024)",
    arxiv_id="2310.08659",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang="quantization", lialin=NOT_PLACED),
    chapter="06_quantized_memory_efficient",
    hyperparams=(*LORA_HPS, *QUANT_HPS,
                 HyperParam("loftq_iter", "int", 1, "alternating quantization / SVD steps (peft's LoftQConfig "
                            "default)", minimum=1)),
    apply=apply_loftq,
    trainable_params=loftq_trainable_params,
    memory_terms=qlora_memory_terms,
    validate=check_quantizable("loftq"),
    default_targets=all_linear,
    largest_trainable_tensor=qlora_largest_tensor,
    param_prefixes=("lora_",),
    base_quantization="nf4",
    notes="peft runs LoftQ on an unquantized model and keeps the residual W - scaling*BA in full precision "
          "(to be quantized when loaded in 4 bits), a different model from ours, which stores Q_T in NF4: no output parity; "
          "chapter 06 compares the two initialisations' errors instead (loftq_peft_config builds peft's).",
))
