"""Selective methods: train a chosen subset of the pretrained weights themselves, add nothing (chapter 03).

Xu et al. 2023 call the family *partial* fine-tuning (bias update, pretrained-weight masking, delta-weight
masking), Wang et al. 2024 *selective* PEFT (unstructured and structured masking), Lialin et al. 2023 put it in
the *selective* circle of their Venn diagram. Every method here unfreezes existing parameters
(``adds_parameters=False``): the model's total is unchanged, the update is the weights themselves, so
inference costs what the base model costs. What is selected is read from the layout alone, so the closed form,
the built model and the gradient sites all come from one function per method (:attr:`Method.unfrozen_params`).

This module imports no torch: ``apply`` only flips ``requires_grad`` on the parameters the layout names.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import ATTN_OUT, CROSS_OUT, ModuleSpec, layout
from survey_utils.errors import SurveyError
from survey_utils.methods.registry import NOT_PLACED, HyperParam, Method, Taxonomy, register, saves_nothing
from survey_utils.targeting import select

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

Selection = list[tuple[ModuleSpec, str]]
LINEAR_KINDS = ("linear", "conv1d")


def _label(config: PretrainedConfig) -> str:
    return str(getattr(config, "name_or_path", "") or config.model_type)


def selected_numel(selection: Selection) -> int:
    """Elements of the selected parameters (tied modules own none)."""
    sizes = {(spec.name, name): n for spec in (s for s, _ in selection) for name, n in spec.params}
    return sum(sizes[(spec.name, name)] for spec, name in selection if not spec.tied_to)


def unfreeze(model: nn.Module, selection: Selection) -> nn.Module:
    """Freeze every parameter, then make the selected ones trainable (no parameter is created or moved)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for spec, name in selection:
        getattr(model.get_submodule(spec.name), name).requires_grad_(True)
    return model


def _sites(config: PretrainedConfig, selection: Selection) -> list[ModuleSpec] | str:
    """Where gradients enter the backbone: the selected modules inside blocks, or the input when one of them
    sits before the first block (BERT's embedding LayerNorm): its output feeds every block."""
    shape = layout(config)
    first_block = next(i for i, m in enumerate(shape.modules) if m.layer is not None)
    before = {m.name for m in shape.modules[:first_block]}
    if any(spec.name in before for spec, _ in selection):
        return "input"
    return [spec for spec, _ in selection if spec.layer is not None]


def _largest(selection: Selection) -> int:
    return max(n for spec, name in selection for p, n in spec.params if p == name)


def _rms_weight_inputs(selection: Selection, t: int, act_bytes: int) -> int:
    r"""A bias-free norm (Llama's RMSNorm, T5's LayerNorm) computes :math:`\gamma \odot \hat x` as its own
    multiplication; when :math:`\gamma` trains, that product saves :math:`\hat x` (``t x width`` in the
    activation dtype). ``nn.LayerNorm`` (with a bias) saves its input and statistics whatever trains, which the
    backbone's recipe already counts."""
    return sum(act_bytes * t * spec.in_features for spec, name in selection
               if spec.kind == "norm" and name == "weight" and not spec.has_bias)


# --- BitFit -----------------------------------------------------------------------------------------------

def bitfit_selection(config: PretrainedConfig, bias_modules: Any = None, **_: Any) -> Selection:
    """Every bias of the model, or only those of ``bias_modules`` (peft's matching rule on module names)."""
    shape = layout(config)
    if bias_modules is None:
        chosen = [(m, "bias") for m in shape.modules if m.has_bias and not m.tied_to]
        if not chosen:
            raise SurveyError(f"{_label(config)} has no bias parameter (no linear layer or norm of "
                              f"{config.model_type} has one): BitFit has nothing to train")
        return chosen
    specs = select(shape, bias_modules, kinds=(*LINEAR_KINDS, "norm", "bias"), model_name=_label(config),
                   method="bitfit")
    chosen = [(m, "bias") for m in specs if m.has_bias and not m.tied_to]
    if not chosen:
        raise SurveyError(f"bias_modules={bias_modules!r}: these modules of {_label(config)} have no bias")
    return chosen


def apply_bitfit(model: nn.Module, bias_modules: Any = None) -> nn.Module:
    r"""BitFit (Ben Zaken, Ravfogel & Goldberg 2022, arXiv:2106.10199): train the bias terms only.

    .. math:: h = W_0 x + b, \qquad b \leftarrow b - \eta \nabla_b L, \quad W_0 \text{ frozen}

    Every parameter named ``bias`` trains (attention, MLP, norms, the masked-LM head's output bias); with
    ``bias_modules`` only those modules' biases (``["query", "value"]``: the query/value-bias variant the paper
    studies, which peft ships as BEFT with an added bias vector instead). No initialisation: the biases start
    at their pretrained values. The gradient of a bias is the sum of its output's gradient over the tokens, so
    it saves no tensor of its own for backward. Models without biases (Llama) are refused in one line.
    """
    return unfreeze(model, bitfit_selection(model.config, bias_modules))


def bitfit_trainable_params(config: PretrainedConfig, bias_modules: Any = None, **_: Any) -> int:
    r""":math:`\sum_{b \in \text{biases}} |b|`: the widths of the selected biases."""
    return selected_numel(bitfit_selection(config, bias_modules))


BITFIT = register(Method(
    name="bitfit",
    title="BitFit",
    paper="Ben Zaken, Ravfogel & Goldberg 2022, BitFit: Simple Parameter-efficient Fine-tuning for "
          "Transformer-based Masked Language-models (ACL 2022, short papers)",
    arxiv_id="2106.10199",
    taxonomy=Taxonomy(xu="partial / bias update", wang="selective / unstructured masking", lialin="S"),
    chapter="03_selective",
    hyperparams=(
        HyperParam("bias_modules", "targets", None,
                   "modules whose biases train (names or one regex); None: every bias of the model",
                   nullable=True),
    ),
    apply=apply_bitfit,
    trainable_params=bitfit_trainable_params,
    memory_terms=saves_nothing,
    validate=bitfit_selection,
    gradient_sites=lambda config, **hp: _sites(config, bitfit_selection(config, **hp)),
    largest_trainable_tensor=lambda config, **hp: _largest(bitfit_selection(config, **hp)),
    unfrozen_params=bitfit_selection,
    adds_parameters=False,
    mergeable=True,
    notes="peft has no BitFit (it never unfreezes base biases); its BEFT adds a zero-initialised bias vector to "
          "each target linear (default: the value projection), trainable count equal to ours on the same modules.",
))


# --- LN tuning --------------------------------------------------------------------------------------------

# peft 0.21.2, peft/utils/constants.py TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING, for the families
# of survey_utils.architecture (peft names none for BERT, RoBERTa and OPT: there every norm is the default).
PEFT_LN_TARGETS = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
}


def ln_targets(config: PretrainedConfig, target_modules: Any = None) -> Any:
    """The names ``target_modules=None`` stands for: peft's per-architecture list, else every norm's name."""
    if target_modules is not None:
        return target_modules
    if config.model_type in PEFT_LN_TARGETS:
        return list(PEFT_LN_TARGETS[config.model_type])
    return sorted({m.short_name for m in layout(config).modules if m.kind == "norm"})


def ln_selection(config: PretrainedConfig, target_modules: Any = None, **_: Any) -> Selection:
    """Every parameter of the target norm modules (weight and, where it has one, bias)."""
    shape = layout(config)
    if not any(m.kind == "norm" for m in shape.modules):
        raise SurveyError(f"{_label(config)} has no normalisation layer: LN tuning has nothing to train")
    specs = select(shape, ln_targets(config, target_modules), kinds=("norm",), model_name=_label(config),
                   method="ln_tuning")
    chosen = [(m, name) for m in specs for name, _ in m.params]
    if not chosen:
        raise SurveyError(f"the norms of {_label(config)} have no parameters (elementwise_affine=False): "
                          "LN tuning has nothing to train")
    return chosen


def apply_ln_tuning(model: nn.Module, target_modules: Any = None) -> nn.Module:
    r"""LN tuning (Qi et al. 2022, arXiv:2211.08682): train the normalisation layers' gain and bias only.

    .. math:: \mathrm{LN}(x) = \gamma \odot \frac{x - \mu}{\sigma} + \beta, \qquad
              \gamma, \beta \text{ trained}, \text{ every other weight frozen}

    (RMSNorm: :math:`\gamma \odot x / \mathrm{rms}(x)`, no :math:`\beta`.) The targets default to peft's
    per-architecture list (``LNTuningConfig``), every norm where peft has none. No initialisation: the norms
    start at their pretrained values. peft deep-copies each target norm and trains the copy; here the norm
    itself trains, so nothing is added (``peft_frozen_copies`` says how many more parameters peft holds).
    """
    return unfreeze(model, ln_selection(model.config, target_modules))


def ln_trainable_params(config: PretrainedConfig, target_modules: Any = None, **_: Any) -> int:
    r""":math:`\sum_{\text{target norms}} (|\gamma| + |\beta|)`."""
    return selected_numel(ln_selection(config, target_modules))


def ln_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                    target_modules: Any = None, **_: Any) -> dict[str, int]:
    """A trained RMS-style gain saves the normalised input it multiplies (``t x width`` per norm);
    ``nn.LayerNorm`` saves nothing beyond what the backbone already keeps."""
    saved = _rms_weight_inputs(ln_selection(config, target_modules), batch_size * seq_len, act_bytes)
    return {"normalised inputs of trained gains": saved} if saved else {}


def ln_peft_config(config: PretrainedConfig, target_modules: Any = None, **_: Any) -> Any:
    from peft import LNTuningConfig

    return LNTuningConfig(target_modules=ln_targets(config, target_modules))


def ln_state_sync(ours: Any, theirs: Any) -> int:
    """Give peft's trainable norm copies non-trivial values, then copy them into our norms (output parity)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if ".ln_tuning_layers.default." not in name:
                continue
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.05)
            target = name.removeprefix("base_model.model.").replace(".ln_tuning_layers.default.", ".")
            mine[target].copy_(parameter)
            copied += 1
    return copied


register(Method(
    name="ln_tuning",
    title="LN tuning",
    paper="Qi et al. 2022, Parameter-Efficient Tuning on Layer Normalization for Pre-trained Language Models "
          "(arXiv preprint)",
    arxiv_id="2211.08682",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin="S"),
    chapter="03_selective",
    hyperparams=(
        HyperParam("target_modules", "targets", None,
                   "norm modules to train (names or one regex); None: peft's list for the architecture, "
                   "else every norm", nullable=True),
    ),
    apply=apply_ln_tuning,
    trainable_params=ln_trainable_params,
    memory_terms=ln_memory_terms,
    peft_config=ln_peft_config,
    peft_state_sync=ln_state_sync,
    peft_frozen_copies=ln_trainable_params,
    validate=ln_selection,
    gradient_sites=lambda config, **hp: _sites(config, ln_selection(config, **hp)),
    largest_trainable_tensor=lambda config, **hp: _largest(ln_selection(config, **hp)),
    unfrozen_params=ln_selection,
    adds_parameters=False,
    mergeable=True,
    notes="peft: LNTuningConfig (a trainable deep copy of each target norm beside the frozen original).",
))


# --- Partial fine-tuning: the top blocks, or one component of them -----------------------------------------

COMPONENTS = ("block", "attention", "cross_attention", "mlp")


def _component_modules(config: PretrainedConfig, components: str) -> list[ModuleSpec]:
    shape = layout(config)
    inside = [m for m in shape.modules if m.layer is not None and m.params and not m.tied_to]
    if components == "block":
        return inside
    if components == "cross_attention":
        chosen = [m for m in inside if ".EncDecAttention." in m.name]
        if not chosen:
            raise SurveyError(f"components='cross_attention': {_label(config)} has no cross-attention "
                              "(only encoder-decoder models do)")
        return chosen
    return [m for m in inside if m.component == components]


def top_blocks(config: PretrainedConfig, top_k: int | None, components: str = "block") -> list[int]:
    """The ``top_k`` highest blocks (layout numbering: T5's decoder above its encoder) that hold the component;
    ``None``: the top quarter of them, rounded up."""
    blocks = sorted({m.layer for m in _component_modules(config, components)})
    k = math.ceil(len(blocks) / 4) if top_k is None else top_k
    if k > len(blocks):
        where = "" if components == "block" else f" with {components.replace('_', '-')}"
        raise SurveyError(f"top_k={k} is more than the {len(blocks)} blocks{where} of {_label(config)}")
    return blocks[len(blocks) - k:]


def partial_selection(config: PretrainedConfig, top_k: int | None = None, components: str = "block",
                      **_: Any) -> Selection:
    """Every parameter of the chosen component in the top ``top_k`` blocks."""
    if components not in COMPONENTS:
        raise SurveyError(f"components={components!r} is not one of {', '.join(COMPONENTS)}")
    keep = set(top_blocks(config, top_k, components))
    return [(m, name) for m in _component_modules(config, components) if m.layer in keep for name, _ in m.params]


def apply_partial(model: nn.Module, top_k: int | None = None, components: str = "block") -> nn.Module:
    r"""Partial fine-tuning: train the top ``k`` blocks, or one component of them, freeze the rest.

    .. math:: \theta = (\theta_\text{frozen}, \theta_S), \qquad \theta_S \leftarrow \theta_S - \eta
              \nabla_{\theta_S} L, \quad S = \text{the top } k \text{ blocks' (attention / FFN) weights}

    Lee, Tang & Lin 2019 (arXiv:1911.03090) fine-tune only the last blocks of BERT and RoBERTa and report that
    the top quarter reaches 90% of full fine-tuning's quality: ``top_k=None`` takes that quarter. With
    ``components="cross_attention"`` on an encoder-decoder this is Gheini et al. 2021's cross-attention tuning
    (arXiv:2104.08771); ``"mlp"`` trains the feed-forward layers only, the setting of FAR (Vucetic et al.
    2022, arXiv:2205.01541). Blocks below the lowest trained one save nothing for backward.
    """
    return unfreeze(model, partial_selection(model.config, top_k, components))


def partial_trainable_params(config: PretrainedConfig, top_k: int | None = None, components: str = "block",
                             **_: Any) -> int:
    r""":math:`\sum_{\ell \in \text{top } k} |\theta_\ell^{\text{component}}|`."""
    return selected_numel(partial_selection(config, top_k, components))


def partial_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int,
                         adapter_bytes: int, top_k: int | None = None, components: str = "block",
                         **_: Any) -> dict[str, int]:
    """A linear layer whose weight trains keeps its input for :math:`\\nabla_W = g^\\top x`: once per distinct
    input (q/k/v read one tensor, :attr:`ModuleSpec.input_key`). Not counted: the attention output projection's
    input, which SDPA's flash kernel keeps anyway as its output (CUDA, and CPU without attention dropout). Trained
    RMS-style gains keep their normalised input (as LN tuning)."""
    t = batch_size * seq_len
    selection = partial_selection(config, top_k, components)
    terms = {"inputs of trained linears": _linear_inputs(selection, t, act_bytes),
             "normalised inputs of trained gains": _rms_weight_inputs(selection, t, act_bytes)}
    return {k: v for k, v in terms.items() if v}


def _linear_inputs(selection: Selection, t: int, act_bytes: int) -> int:
    """Bytes of the inputs that trained linear weights keep, once per distinct input (see :func:`partial_memory_terms`)."""
    inputs: dict[tuple[str, str], int] = {}
    for spec, name in selection:
        if spec.kind in LINEAR_KINDS and name == "weight" and not _reads_attention_output(spec):
            inputs[spec.input_key] = act_bytes * t * spec.in_features
    return sum(inputs.values())


def _reads_attention_output(spec: ModuleSpec) -> bool:
    return spec.component == "attention" and spec.stage in (ATTN_OUT, CROSS_OUT)


register(Method(
    name="partial",
    title="Partial fine-tuning (top blocks or components)",
    paper="Lee, Tang & Lin 2019, What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning (arXiv "
          "preprint); components as Gheini et al. 2021 (cross-attention, EMNLP 2021) and Vucetic et al. 2022 "
          "(FAR, feed-forward layers, ISCAS 2022)",
    arxiv_id="1911.03090",
    taxonomy=Taxonomy(xu=NOT_PLACED, wang=NOT_PLACED, lialin=NOT_PLACED),
    chapter="03_selective",
    hyperparams=(
        HyperParam("top_k", "int", None, "blocks that train, counted from the output; None: the top quarter",
                   minimum=1, nullable=True),
        HyperParam("components", "str", "block", "what trains in those blocks", choices=COMPONENTS),
    ),
    apply=apply_partial,
    trainable_params=partial_trainable_params,
    memory_terms=partial_memory_terms,
    validate=partial_selection,
    gradient_sites=lambda config, **hp: _sites(config, partial_selection(config, **hp)),
    largest_trainable_tensor=lambda config, **hp: _largest(partial_selection(config, **hp)),
    unfrozen_params=partial_selection,
    adds_parameters=False,
    mergeable=True,
))


# --- Sparse methods: a mask over the entries of the block linears' weights -----------------------------------
#
# FISH mask, LT-SFT and Child-tuning keep the tensors of the block linears trainable and mask their gradients to
# k = int(density * numel) entries per tensor (Method.mask_kept); diff pruning adds a gated dense delta instead.
# The papers rank entries across the whole model; ranking within each tensor keeps the same total count and makes
# the split by tensor (and by component) a property of the layout rather than of the data.

def kept(density: float, numel: int) -> int:
    """Entries a mask of ``density`` keeps in a tensor of ``numel`` elements: ``int(density * numel)`` (FISH
    mask's code rounds the same way)."""
    return int(density * numel)


def _check_density(config: PretrainedConfig, density: float) -> None:
    if not 0 < density <= 1:
        raise SurveyError(f"density={density!r} must be in (0, 1]")


def sparse_targets(config: PretrainedConfig, target_modules: Any = None, method: str = "this method"
                   ) -> list[ModuleSpec]:
    """The linears inside blocks that a sparse method masks: every one (``None``), or those ``target_modules``
    names (peft's matching rule; a name the model lacks is refused in one line)."""
    shape = layout(config)
    names = shape.linear_names() if target_modules is None else target_modules
    specs = select(shape, names, kinds=LINEAR_KINDS, model_name=_label(config), method=method)
    chosen = [m for m in specs if m.layer is not None and not m.tied_to]
    if not chosen:
        raise SurveyError(f"target_modules={target_modules!r}: no linear layer inside the blocks of {_label(config)}")
    return chosen


def masked_selection(config: PretrainedConfig, density: float, target_modules: Any = None, method: str = "",
                     **_: Any) -> Selection:
    """The weights a gradient mask keeps entries of: each target's ``weight`` whose ``kept(density, n)`` > 0."""
    _check_density(config, density)
    chosen = [(m, "weight") for m in sparse_targets(config, target_modules, method)
              if kept(density, dict(m.params)["weight"]) > 0]
    if not chosen:
        raise SurveyError(f"density={density!r} keeps no entry of any weight of {_label(config)}")
    return chosen


def _mask_count(selection: Selection, density: float) -> int:
    return sum(kept(density, dict(spec.params)[name]) for spec, name in selection)


def _weight_names(selection: Selection) -> list[str]:
    return [f"{spec.name}.{name}" for spec, name in selection]


def _sparse_method(name: str, title: str, paper: str, arxiv: str, taxonomy: Taxonomy, hyperparams: tuple,
                   apply: Any, count: Any, density_of: Any, notes: str) -> Method:
    """One registration for the three gradient-masked methods: what they select, count and save is shared."""
    def selection(config: PretrainedConfig, **hp: Any) -> Selection:
        return masked_selection(config, density_of(hp), hp.get("target_modules"), name)

    def memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                     **hp: Any) -> dict[str, int]:
        """A masked weight still trains: its linear keeps its input for the (dense) weight gradient."""
        saved = _linear_inputs(selection(config, **hp), batch_size * seq_len, act_bytes)
        return {"inputs of trained linears": saved} if saved else {}

    return register(Method(
        name=name, title=title, paper=paper, arxiv_id=arxiv, taxonomy=taxonomy, chapter="03_selective",
        hyperparams=hyperparams, apply=apply, trainable_params=count, memory_terms=memory_terms,
        validate=selection, unfrozen_params=selection,
        mask_kept=lambda numel, **hp: kept(density_of(hp), numel),
        gradient_sites=lambda config, **hp: _sites(config, selection(config, **hp)),
        largest_trainable_tensor=lambda config, **hp: _largest(selection(config, **hp)),
        adds_parameters=False, mergeable=True, notes=notes,
    ))


DENSITY_HELP = "fraction of each weight's entries that train, in (0, 1]"
TARGETS = HyperParam("target_modules", "targets", None,
                     "linears inside the blocks whose weights are masked (names or one regex); None: every one",
                     nullable=True)


# --- FISH mask ---------------------------------------------------------------------------------------------

def apply_fish_mask(model: nn.Module, density: float = 0.005, num_samples: int = 1024, target_modules: Any = None,
                    batches: Any = None) -> nn.Module:
    r"""FISH mask (Sung, Nair & Raffel 2021, arXiv:2111.09839): train the entries with the largest Fisher information.

    .. math:: \hat F_i = \frac1N \sum_{n=1}^N \bigl(\partial_{\theta_i} \log p_\theta(y_n \mid x_n)\bigr)^2,
              \qquad m_i = [\,i \in \operatorname{top-}k(\hat F)\,], \qquad \theta \leftarrow \theta - \eta\,(m \odot g)

    The empirical Fisher is computed once, before training, on ``num_samples`` examples (``batches``: one
    example each; ``None``: random tokens, a stand-in for task data), and the mask stays fixed. Here ``k =
    int(density * n)`` per weight of the block linears (the paper ranks all parameters at once; 0.5% matches full
    fine-tuning on GLUE in its Table 1). The mask acts on the gradient: the weights keep dense gradients and
    AdamW states (see :attr:`Method.mask_kept`).
    """
    from survey_utils.methods.layers import selective as layers

    names = _weight_names(masked_selection(model.config, density, target_modules, "fish_mask"))
    data = batches if batches is not None else layers.random_batches(model.config, num_samples)
    layers.mask_by_scores(model, names, density, lambda params: layers.fisher_scores(model, params, data))
    return model


def fish_trainable_params(config: PretrainedConfig, density: float = 0.005, target_modules: Any = None,
                          **_: Any) -> int:
    r""":math:`\sum_{W} \lfloor \rho\,|W| \rfloor` over the masked weights (:math:`\rho` = density)."""
    return _mask_count(masked_selection(config, density, target_modules, "fish_mask"), density)


_sparse_method(
    "fish_mask", "FISH mask",
    "Sung, Nair & Raffel 2021, Training Neural Networks with Fixed Sparse Masks (NeurIPS 2021)", "2111.09839",
    Taxonomy(xu=NOT_PLACED, wang="selective / unstructured masking", lialin="S"),
    (HyperParam("density", "float", 0.005, DENSITY_HELP, maximum=1.0),
     HyperParam("num_samples", "int", 1024, "examples the empirical Fisher is averaged over", minimum=1),
     TARGETS),
    apply_fish_mask, fish_trainable_params, lambda hp: hp["density"],
    "mask computed once on real weights and data; on meta an index of the right length stands in.")


# --- LT-SFT ----------------------------------------------------------------------------------------------------

def apply_lt_sft(model: nn.Module, density: float = 0.05, full_ft_steps: int = 100, target_modules: Any = None,
                 batches: Any = None) -> nn.Module:
    r"""LT-SFT, lottery-ticket sparse fine-tuning (Ansell, Ponti, Korhonen & Vulić 2022, arXiv:2110.07560).

    .. math:: \theta^{(1)} = \mathrm{FT}(\theta^{(0)}), \qquad m_i = [\,i \in \operatorname{top-}k
              |\theta^{(1)}_i - \theta^{(0)}_i|\,], \qquad \theta \leftarrow \theta^{(0)}, \text{ then train } m \odot g

    Phase 1 fine-tunes the weights fully for ``full_ft_steps`` AdamW steps (``batches``; ``None``: random tokens),
    keeps the ``k = int(density * n)`` entries of each block-linear weight that moved most, rewinds every value
    to the pretrained one, and phase 2 retrains with the gradient masked (the paper ranks all parameters at once
    and calls the count K). The sparse difference :math:`\theta - \theta^{(0)}` is the stored task.
    """
    from survey_utils.methods.layers import selective as layers

    names = _weight_names(masked_selection(model.config, density, target_modules, "lt_sft"))
    data = batches if batches is not None else layers.random_batches(model.config, 8)
    layers.mask_by_scores(model, names, density,
                          lambda params: layers.change_scores(model, params, data, full_ft_steps))
    return model


def lt_sft_trainable_params(config: PretrainedConfig, density: float = 0.05, target_modules: Any = None,
                            **_: Any) -> int:
    r""":math:`\sum_{W} \lfloor \rho\,|W| \rfloor` over the masked weights: K, split by weight."""
    return _mask_count(masked_selection(config, density, target_modules, "lt_sft"), density)


_sparse_method(
    "lt_sft", "LT-SFT (lottery-ticket sparse fine-tuning)",
    "Ansell, Ponti, Korhonen & Vulić 2022, Composable Sparse Fine-Tuning for Cross-Lingual Transfer (ACL 2022)",
    "2110.07560",
    Taxonomy(xu="partial / delta weight masking", wang="selective / unstructured masking", lialin="S"),
    (HyperParam("density", "float", 0.05, DENSITY_HELP, maximum=1.0),
     HyperParam("full_ft_steps", "int", 100, "steps of the first, full fine-tuning that ranks the entries",
                minimum=1),
     TARGETS),
    apply_lt_sft, lt_sft_trainable_params, lambda hp: hp["density"],
    "phase 1 (full fine-tuning, then rewind) runs inside apply on real weights; on meta an index stands in.")


# --- Child-tuning ----------------------------------------------------------------------------------------------

CHILD_VARIANTS = ("F", "D")


def apply_child_tuning(model: nn.Module, variant: str = "D", reserve_p: float = 0.3, num_samples: int = 1024,
                       target_modules: Any = None, batches: Any = None) -> nn.Module:
    r"""Child-tuning (Xu et al. 2021, arXiv:2109.05687): update a *child network* through a gradient mask.

    .. math:: \theta \leftarrow \theta - \eta\, \frac{m \odot g}{p_F}\ (\text{F}), \qquad
              \theta \leftarrow \theta - \eta\, (m \odot g)\ (\text{D}),
              \quad m_i = [\,i \in \operatorname{top-}k(\hat F)\,]

    - **Child-tuning_F** (task-free): a fresh random mask at every step, each entry kept with probability
      ``reserve_p`` (the paper's :math:`p_F`), the kept gradients scaled by :math:`1/p_F`. The paper draws
      Bernoulli(:math:`p_F`) per entry; here exactly ``k = int(p_F n)`` entries are drawn uniformly (the same mean
      without the binomial noise, so the count per step is exact). Over many steps every entry moves.
    - **Child-tuning_D** (task-driven): the Fisher information on ``num_samples`` examples (``batches``) picks
      the child network once, the top ``p_D`` fraction, fixed for training.

    The paper masks inside its optimizer; here the mask sits on the gradient, with the same effect under AdamW
    with weight decay off.
    """
    from survey_utils.methods.layers import selective as layers

    if variant not in CHILD_VARIANTS:
        raise SurveyError(f"variant={variant!r} is not one of {', '.join(CHILD_VARIANTS)}")
    names = _weight_names(masked_selection(model.config, reserve_p, target_modules, "child_tuning"))
    if variant == "F":
        layers.mask_by_scores(model, names, reserve_p, None, resample=True, scale=1.0 / reserve_p)
        return model
    data = batches if batches is not None else layers.random_batches(model.config, num_samples)
    layers.mask_by_scores(model, names, reserve_p, lambda params: layers.fisher_scores(model, params, data))
    return model


def child_trainable_params(config: PretrainedConfig, reserve_p: float = 0.3, target_modules: Any = None,
                           **_: Any) -> int:
    r""":math:`\sum_{W} \lfloor p\,|W| \rfloor`: the child network (per step, for the F variant)."""
    return _mask_count(masked_selection(config, reserve_p, target_modules, "child_tuning"), reserve_p)


_sparse_method(
    "child_tuning", "Child-tuning (F: random mask; D: Fisher mask)",
    "Xu et al. 2021, Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning "
    "(EMNLP 2021)", "2109.05687",
    Taxonomy(xu=NOT_PLACED, wang="selective / unstructured masking", lialin=NOT_PLACED),
    (HyperParam("variant", "str", "D", "F: a random mask each step (task-free); D: a Fisher mask (task-driven)",
                choices=CHILD_VARIANTS),
     HyperParam("reserve_p", "float", 0.3, "fraction of each weight in the child network (p_F or p_D), in (0, 1]",
                maximum=1.0),
     HyperParam("num_samples", "int", 1024, "examples the Fisher information is averaged over (variant D)",
                minimum=1),
     TARGETS),
    apply_child_tuning, child_trainable_params, lambda hp: hp["reserve_p"],
    "F redraws its mask every step: trained per step is the count, changed after training is every masked weight.")


# --- Diff pruning ----------------------------------------------------------------------------------------------

def apply_diff_pruning(model: nn.Module, density: float = 0.005, target_modules: Any = None) -> nn.Module:
    r"""Diff pruning (Guo, Rush & Kim 2021, arXiv:2012.07463): learn a sparse task diff with an L0 penalty.

    .. math:: \theta_\tau = \theta_0 + z_\tau \odot \delta_\tau, \qquad
              \min_{\delta, \alpha}\ L(\theta_0 + z \odot \delta) + \lambda\, \mathbb E\,\|z\|_0,
              \quad z \sim \text{hard-concrete}(\log\alpha)

    Each target weight gets a dense delta (zero at init) and a dense gate logit (5 at init): the model trains
    **twice** the targets' size (Lialin et al.'s "200%"). After training, ``prune_diff`` keeps the ``density``
    fraction of :math:`|z \odot \delta|` per weight (the paper: 0.5% of the whole model) and fixes the gate; the
    stored task is that sparse diff, and merging writes only its entries. Layer: :class:`~survey_utils.methods.
    layers.selective.DiffLinear` (the L0 term: ``l0_penalty(model)``).
    """
    from survey_utils.methods.common import adapt_targets, freeze
    from survey_utils.methods.layers import selective as layers

    names = [spec.name for spec in diff_targets(model.config, density, target_modules)]
    freeze(model)
    adapt_targets(model, "diff_pruning", {"target_modules": names},
                  lambda base: layers.DiffLinear(base, density))
    return model


def diff_targets(config: PretrainedConfig, density: float = 0.005, target_modules: Any = None, **_: Any
                 ) -> list[ModuleSpec]:
    _check_density(config, density)
    return sparse_targets(config, target_modules, "diff_pruning")


def diff_trainable_params(config: PretrainedConfig, density: float = 0.005, target_modules: Any = None,
                          **_: Any) -> int:
    r""":math:`2 \sum_W |W|`: a delta and a gate logit per target weight, both dense while training."""
    return 2 * sum(m.in_features * m.out_features for m in diff_targets(config, density, target_modules))


def diff_memory_terms(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                      density: float = 0.005, target_modules: Any = None, **_: Any) -> dict[str, int]:
    r"""Per target weight the gate saves its sigmoid and the clamp's input, the product :math:`z \odot \delta`
    saves :math:`z`, and the delta path's linear saves :math:`z \odot \delta` (four weight-sized tensors in the
    trainable dtype) and its input (once per distinct input)."""
    specs = diff_targets(config, density, target_modules)
    t = batch_size * seq_len
    inputs = {m.input_key: act_bytes * t * m.in_features for m in specs}
    return {"inputs of adapted linears": sum(inputs.values()),
            "gate and delta tensors (4 per weight)": 4 * adapter_bytes * sum(m.in_features * m.out_features
                                                                              for m in specs)}


register(Method(
    name="diff_pruning",
    title="Diff pruning",
    paper="Guo, Rush & Kim 2021, Parameter-Efficient Transfer Learning with Diff Pruning (ACL 2021)",
    arxiv_id="2012.07463",
    taxonomy=Taxonomy(xu="partial / delta weight masking", wang="selective / unstructured masking", lialin="S"),
    chapter="03_selective",
    hyperparams=(
        HyperParam("density", "float", 0.005, "fraction of each delta kept by magnitude pruning, in (0, 1]",
                   maximum=1.0),
        TARGETS,
    ),
    apply=apply_diff_pruning,
    trainable_params=diff_trainable_params,
    memory_terms=diff_memory_terms,
    validate=diff_targets,
    gradient_sites=lambda config, **hp: diff_targets(config, **hp),
    largest_trainable_tensor=lambda config, **hp: max(m.in_features * m.out_features
                                                      for m in diff_targets(config, **hp)),
    param_prefixes=("diff_",),
    mergeable=True,
    notes="trained: a dense delta and gate per weight (2x the targets); changed and stored: the pruned delta.",
))
