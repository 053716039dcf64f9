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


# transformers keeps these modules in full precision (``_keep_in_fp32_modules``; T5 casts the FFN's input to
# ``wo.weight.dtype``, which for a quantized weight would be its integer codes), and bitsandbytes leaves them
# unquantized: so do we, by refusing them as targets in one line.
KEEP_IN_FULL_PRECISION = {"t5": ("wo",), "mt5": ("wo",)}


def _refuse_full_precision_modules(config: Any, specs: list[Any]) -> None:
    kept = KEEP_IN_FULL_PRECISION.get(config.model_type, ())
    for spec in specs:
        if spec.short_name in kept:
            raise SurveyError(f"{spec.name}: {config.model_type} keeps '{spec.short_name}' in full precision "
                              "(transformers' _keep_in_fp32_modules); leave it out of target_modules")


def check_quantizable(method: str):
    """A ``validate``: targets exist and are ``nn.Linear``; each weight splits into whole blocks; LoRA's rules."""

    def validate(config: Any, blocksize: int, **hp: Any) -> None:
        LORA.validate(config, **{k: hp[k] for k in ("target_modules", "layers_to_transform", "layers_pattern")})
        _refuse_full_precision_modules(config, _specs(config, method, hp))
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
            # bitsandbytes' own pure-torch dequantization (its AVX512 CPU kernel errs where blocks cross rows),
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


# --- QA-LoRA ----------------------------------------------------------------------------------------------

def _check_groups(method: str):
    """A ``validate``: LoRA's target rules, ``nn.Linear`` targets, and ``group_size`` dividing each d_in."""

    def validate(config: Any, **hp: Any) -> None:
        LORA.validate(config, **{k: hp[k] for k in ("target_modules", "layers_to_transform", "layers_pattern")})
        _refuse_full_precision_modules(config, _specs(config, method, hp))
        for spec in _specs(config, method, hp):
            group = hp.get("group_size", spec.in_features)
            if spec.in_features % group:
                raise SurveyError(f"group_size={group} does not divide {spec.name}'s {spec.in_features} inputs")

    return validate


BITS_HP = HyperParam("bits", "int", 4, "bits of the integer base (4 or 8)", choices=(4, 8))
TARGETS_ALL = tuple(hp for hp in LORA_HPS if hp.name in ("target_modules", "layers_to_transform", "layers_pattern"))


def apply_qa_lora(model: Any, r: int, lora_alpha: float, group_size: int, bits: int, **hp: Any) -> Any:
    r"""Freeze ``model``; quantize each target linear layer group-wise (min-max, ``bits``, groups of L =
    ``group_size`` inputs) and add LoRA on the group-averaged input:
    :math:`h = \tilde W x + \frac{\alpha}{r} B A\,\mathrm{pool}_L(x)`, B = 0 at initialisation
    (Xu et al. 2023, arXiv:2309.14717). Merging changes only the group offsets."""
    from survey_utils.methods.layers.quantized import QALoRALinear

    freeze(model)
    adapt_targets(model, "qa_lora", _targets(model.config, hp),
                  lambda base: QALoRALinear(base, r, lora_alpha, group_size, bits), LINEAR)
    return model


def qa_lora_trainable_params(config: Any, r: int, group_size: int, **hp: Any) -> int:
    r""":math:`\sum_W r\,(d_\text{in}/L + d_\text{out})`: A sees one pooled feature per group of L inputs."""
    return sum(r * (m.in_features // group_size + m.out_features) for m in _specs(config, "qa_lora", hp))


def qa_lora_memory_terms(config: Any, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                         r: int, group_size: int, **hp: Any) -> dict[str, int]:
    """Each target's pooled input (``t x d_in/L``) and ``pool(x) A`` (``t x r``) are saved for A's and B's
    gradients; the full input is saved by the base's own matmul only when the input needs a gradient,
    which the backbone's activations already count."""
    t = batch_size * seq_len
    specs = _specs(config, "qa_lora", hp)
    return {"pooled inputs (d_in / L)": sum(adapter_bytes * t * (s.in_features // group_size) for s in specs),
            "pool(x) A (rank r)": len(specs) * adapter_bytes * t * r}


register(Method(
    name="qa_lora",
    title="QA-LoRA",
    paper="Xu et al. 2023, QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models (ICLR 2024)",
    arxiv_id="2309.14717",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang="quantization", lialin=NOT_PLACED),
    chapter="06_quantized_memory_efficient",
    hyperparams=(
        HyperParam("r", "int", 8, "rank of the update B A (LoRA's default)", minimum=1),
        HyperParam("lora_alpha", "float", 8.0, "scale numerator: the update is multiplied by alpha / r", minimum=0),
        HyperParam("group_size", "int", 32, "L: input columns sharing a scale and offset, and pooled into one "
                   "feature of A's input (QA-LoRA's experiments: 32)", minimum=1),
        BITS_HP,
        *TARGETS_ALL,
    ),
    apply=apply_qa_lora,
    trainable_params=qa_lora_trainable_params,
    memory_terms=qa_lora_memory_terms,
    validate=_check_groups("qa_lora"),
    default_targets=all_linear,
    param_prefixes=("lora_",),
    mergeable=True,
    base_quantization="int8",
    notes="Not in peft. The memory model knows nf4 and int8 storage only; a 4-bit group-wise base is counted "
          "as int8 (an over-estimate).",
))


# --- PEQA -------------------------------------------------------------------------------------------------

def apply_peqa(model: Any, bits: int, **hp: Any) -> Any:
    r"""Freeze ``model``; quantize each target linear layer per output channel to ``bits``-bit integers and
    train only the scales: :math:`h = (s \odot (\bar W - z))x + b` (Kim et al. 2023, arXiv:2305.14152)."""
    from survey_utils.methods.layers.quantized import PEQALinear

    freeze(model)
    adapt_targets(model, "peqa", _targets(model.config, hp), lambda base: PEQALinear(base, bits), LINEAR)
    return model


def peqa_trainable_params(config: Any, **hp: Any) -> int:
    r""":math:`\sum_W d_\text{out}`: one scale per output channel of each quantized layer."""
    return sum(m.out_features for m in _specs(config, "peqa", hp))


def peqa_memory_terms(config: Any, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                      **hp: Any) -> dict[str, int]:
    """The scale's gradient needs each target's input (once per distinct input, as LoRA's) and the matmul's
    output against the integer weight (``t x d_out``)."""
    t = batch_size * seq_len
    specs = _specs(config, "peqa", hp)
    inputs = {s.input_key: act_bytes * t * s.in_features for s in specs}
    return {"target inputs": sum(inputs.values()),
            "(W - z) x (d_out)": sum(act_bytes * t * s.out_features for s in specs)}


register(Method(
    name="peqa",
    title="PEQA",
    paper="Kim et al. 2023, Memory-Efficient Fine-Tuning of Compressed Large Language Models via sub-4-bit "
          "Integer Quantization (NeurIPS 2023)",
    arxiv_id="2305.14152",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang="quantization", lialin=NOT_PLACED),
    chapter="06_quantized_memory_efficient",
    hyperparams=(BITS_HP, *TARGETS_ALL),
    apply=apply_peqa,
    trainable_params=peqa_trainable_params,
    memory_terms=peqa_memory_terms,
    validate=_check_groups("peqa"),
    default_targets=all_linear,
    param_prefixes=("peqa_",),
    mergeable=True,
    base_quantization="int8",
    notes="Not in peft. Per-channel min-max scales with integer zero points; the memory model counts the "
          "integer base as int8 (an over-estimate at 4 bits).",
))
