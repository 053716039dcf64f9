r"""Closed-form memory of one training step, term by term, with every assumption stated (chapter 00).

The peak of *allocated* memory in a steady-state step (the optimizer states already exist) is

.. math::

    M = W + O + M_\text{master} + B + \max\bigl(A + \Delta_\text{loss},\; G + T_\text{opt}\bigr)

- :math:`W`: weights, by dtype (quantized frozen linears: 4-bit NF4 or int8 plus their scales);
- :math:`O`: optimizer states of the trainable parameters; :math:`M_\text{master}`: fp32 master copies
  when the trainable parameters are fp16 (mixed precision with loss scaling needs them);
- :math:`B`: the batch (``input_ids`` and ``labels``, int64);
- :math:`A`: activations saved for backward, by architecture and device
  (:mod:`survey_utils.memory.activations`): only the blocks from the lowest trainable module up save
  anything (autograd saves a tensor only when an input of its operator requires a gradient); with
  gradient checkpointing only their inputs plus one block's worth; :math:`\Delta_\text{loss}`: the
  log-softmax and the two logit gradients alive at the start of backward (:math:`12\,b\,s\,V` bytes in
  fp32 for causal LMs; :math:`3\,a\,b\,s\,V` for BERT and T5, whose loss takes the model's dtype);
- :math:`G`: gradients of the trainable parameters; :math:`T_\text{opt}`: the optimizer's largest
  per-parameter temporary (AdamW's ``sqrt`` and ``/``: two tensors of the biggest parameter).

``reserved`` adds what PyTorch's caching allocator holds beyond the allocated peak, by the closed form of
:mod:`survey_utils.memory.allocator` (block rounding of the persistent tensors, plus a share of the transient
peak derived from replaying simulated steps through the allocator model), stated among the assumptions.

A method joins with no change here: trainable parameters come from the registry's closed form; a method
whose tensors saved for backward matter sets ``Method.memory_terms`` (see the registry docstring); where
its gradients enter the backbone comes from its ``target_modules`` or, for other methods, from
``Method.gradient_sites`` (the modules its trainable branch joins, or ``"input"``); prefix-like methods set
``Method.key_value_positions`` (their virtual positions are keys and values only). Parameters of the base
model train under methods with ``Method.trains_whole_model``; the adapter dtype applies only to the
parameters a method adds (as peft's ``autocast_adapter_dtype``). A method that searches its numbers without
gradients (``Method.gradient_free``, LoRAHub) steps by a forward pass under ``no_grad``:
:math:`M = W + B + \Delta_\text{fwd}`, with :math:`\Delta_\text{fwd}` the logits, their fp32 copy and its
log-softmax (:math:`(a + 8)\,b\,s\,V`; :math:`2\,a\,b\,s\,V` where the loss takes the model's dtype).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import Layout, layout, task_head_trainable, total_params, train_task_head
from survey_utils.errors import SurveyError
from survey_utils.memory.activations import (
    ATTN_IN,
    ATTN_OUT,
    DEVICES,
    INPUT,
    LOSS_IN_MODEL_DTYPE,
    MLP_IN,
    MLP_OUT,
    RECIPES,
    Activations,
    Ctx,
    saved_activations,
    trainable_start,
)
from survey_utils.methods.registry import Method, get_method
from survey_utils.units import ATTENTIONS, DTYPE_BYTES, DTYPES, OPTIMIZERS, QUANTIZATIONS
from survey_utils.zoo import load_config, supports_sdpa

if TYPE_CHECKING:
    from transformers import PretrainedConfig


# bitsandbytes NF4 (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, section 3): 4-bit codes, one absmax
# per block of 64 weights, itself quantized to 8 bits with one fp32 constant per 256 blocks (double
# quantization): 0.5 + 1/64 + 4/(64*256) bytes per weight.
NF4_BLOCK, NF4_BLOCK2 = 64, 256
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_BLOCK2)
# bitsandbytes LLM.int8 (Dettmers et al. 2022, arXiv:2208.07339): int8 codes and one fp32 scale per row.
# bitsandbytes' 8-bit optimizers (0.50.2, ``Optimizer2State.init_state``): per tensor, uint8 moments with one
# fp32 absmax per block of 256 elements, but fp32 moments for a tensor under ``min_8bit_size`` = 4096 elements;
# the two 256-entry fp32 quantization maps (signed and unsigned dynamic) are shared by every 8-bit tensor.
BNB_MIN_8BIT_SIZE, BNB_BLOCK_SIZE, BNB_QMAP_ENTRIES = 4096, 256, 256


RECOMPUTED = "one block recomputed"  # the checkpointed term: one block's activations rebuilt in backward


def _backward_peak(activations: int, recomputed: int, loss_transient: int) -> int:
    """Bytes at the backward peak beyond the fixed terms: the saved activations, with the loss's transients or
    the one rebuilt block, whichever is larger (they are never alive together)."""
    return activations - recomputed + max(loss_transient, recomputed)


@dataclass(frozen=True)
class MemoryEstimate:
    """A step's memory in bytes, term by term, with the assumptions that produced it."""

    weights: int
    weights_by_dtype: dict[str, int]
    gradients: int
    optimizer_states: int
    master_weights: int
    activations: int
    activations_by_term: dict[str, int]
    loss_transient: int
    optimizer_transient: int
    batch: int
    total: int
    trainable_params: int
    total_params: int
    peak_phase: str
    cuda_overhead_note: str
    assumptions: list[str] = field(default_factory=list)
    reserved: int | None = None
    """Reserved bytes (CUDA context excluded): ``total`` plus the caching allocator's reserve
    (:func:`survey_utils.memory.allocator.reserved_of`, stated in ``assumptions``)."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of ``memory --json``."""
        return {
            "weights": self.weights, "gradients": self.gradients, "optimizer_states": self.optimizer_states,
            "activations": self.activations, "total": self.total, "master_weights": self.master_weights,
            "loss_transient": self.loss_transient, "optimizer_transient": self.optimizer_transient,
            "batch": self.batch, "weights_by_dtype": self.weights_by_dtype,
            "activations_by_term": self.activations_by_term, "trainable_params": self.trainable_params,
            "total_params": self.total_params, "peak_phase": self.peak_phase,
            "cuda_overhead_note": self.cuda_overhead_note, "assumptions": self.assumptions,
            "reserved": self.reserved,
        }

    @property
    def backward_peak(self) -> int:
        """Activations and the loss's transients alive together at the backward peak: with checkpointing the
        loss's transients are gone before the first block is rebuilt, so this is less than their sum."""
        recomputed = self.activations_by_term.get(RECOMPUTED, 0)
        return _backward_peak(self.activations, recomputed, self.loss_transient)

    def terms(self) -> dict[str, int]:
        """The stacked-bar terms at the peak; they add up to ``total``."""
        fixed = {"weights": self.weights, "optimizer states": self.optimizer_states + self.master_weights,
                 "batch": self.batch}
        rest = self.total - sum(fixed.values())
        if self.peak_phase == "backward":
            return {**fixed, "activations": self.activations, "logits and loss": rest - self.activations}
        return {**fixed, "gradients": self.gradients, "optimizer step": rest - self.gradients}


def check_settings(config: PretrainedConfig, method: Method, hp: dict[str, Any], batch_size: int, seq_len: int,
                   dtype: str, adapter_dtype: str | None, optimizer: str, quantization: str | None,
                   attention: str, device: str = "cuda", gradient_checkpointing: bool = False) -> dict[str, Any]:
    """Validate every setting (one-line :class:`SurveyError`) and return the method's resolved hyper-parameters."""
    if layout(config).family not in RECIPES and method.key_value_positions:
        # Derived recipes (survey_utils.memory.derived) come from passes without extra key/value positions.
        raise SurveyError(f"method '{method.name}' adds key/value positions, and the memory model's activations of "
                          f"model type '{config.model_type}' are derived from its code without them (hand recipes: "
                          f"{', '.join(sorted(RECIPES))})")
    if gradient_checkpointing and method.key_value_positions:
        # transformers' GradientCheckpointingLayer drops past_key_values, so the prefixes would silently vanish.
        raise SurveyError(f"method '{method.name}' feeds its prefixes through past_key_values, which transformers' "
                          "gradient-checkpointed layers drop: turn gradient checkpointing off")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SurveyError(f"{name}={value!r} must be a positive integer")
    if dtype not in DTYPES:
        raise SurveyError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if adapter_dtype is not None and adapter_dtype not in DTYPES:
        raise SurveyError(f"adapter_dtype '{adapter_dtype}' is not one of {', '.join(DTYPES)}")
    if optimizer not in OPTIMIZERS:
        raise SurveyError(f"optimizer '{optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise SurveyError(f"quantization '{quantization}' is not one of {', '.join(QUANTIZATIONS)}")
    if attention not in ATTENTIONS:
        raise SurveyError(f"attention '{attention}' is not one of {', '.join(ATTENTIONS)}")
    if device not in DEVICES:
        raise SurveyError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    if quantization is not None and method.trains_whole_model:
        raise SurveyError(f"quantization '{quantization}' freezes the base weights; full fine-tuning cannot use it")
    resolved = dict(_memo(config, method, "resolve", hp, lambda: method.resolve(config, **hp)))
    shape = layout(config)
    extra = method.extra_positions(config, **resolved) if method.extra_positions else 0
    if shape.max_positions is not None and seq_len + extra > shape.max_positions:
        raise SurveyError(f"seq_len={seq_len}{f' + {extra} virtual tokens' if extra else ''} exceeds the "
                          f"context of {config.name_or_path} ({shape.max_positions} positions)")
    return resolved


def estimate(model_or_config: str | PretrainedConfig, method: str | Method,
             hp: dict[str, Any] | None = None, batch_size: int = 1, seq_len: int = 512, dtype: str = "bf16",
             adapter_dtype: str | None = None, optimizer: str = "adamw", gradient_checkpointing: bool = False,
             quantization: str | None = None, attention: str = "sdpa", device: str = "cuda") -> MemoryEstimate:
    """Peak allocated bytes of a steady-state training step, term by term (see the module docstring).

    ``device`` picks the kernels whose saved tensors are counted: ``cuda`` (what users train on) or ``cpu``
    (what :func:`survey_utils.memory.simulation` runs, for like-with-like validation); see
    :mod:`survey_utils.memory.activations`.
    """
    config = load_config(model_or_config)
    method = get_method(method) if isinstance(method, str) else method
    resolved = check_settings(config, method, hp or {}, batch_size, seq_len, dtype, adapter_dtype, optimizer,
                              quantization, attention, device, gradient_checkpointing)
    shape = layout(config)
    a = DTYPE_BYTES[dtype]
    full = method.trains_whole_model
    tdtype = method.trainable_dtype(dtype, adapter_dtype)
    tb = DTYPE_BYTES[tdtype]
    # A task head (Layout.task_head) trains beside the method, as peft's modules_to_save: its gradients and
    # optimizer states are held too (counting.closed_form adds it the same way).
    head = _memo(config, method, "head", resolved, lambda: task_head_trainable(
        shape, full, method.unfrozen_params(config, **resolved) if method.unfrozen_params is not None else ()))
    own = _memo(config, method, "trainable", resolved, lambda: method.trainable_params(config, **resolved))
    trainable = own + head
    added = _memo(config, method, "added", resolved, lambda: method.added_params(config, **resolved))
    base_total = total_params(config)
    assumptions: list[str] = []

    # Weights ---------------------------------------------------------------------------------------
    by_dtype: dict[str, int] = {}
    if full:
        by_dtype[tdtype] = base_total * tb
    else:
        quantized = 0
        if quantization is not None:
            quantized_bytes, quantized = _quantized_bytes(shape, quantization)
            by_dtype[quantization] = quantized_bytes
            assumptions.append(_QUANT_NOTES[quantization])
        by_dtype[dtype] = by_dtype.get(dtype, 0) + (base_total - quantized) * a
        frozen_added = added - trainable
        if trainable:
            by_dtype[tdtype] = by_dtype.get(tdtype, 0) + trainable * tb
        if frozen_added:
            by_dtype[dtype] = by_dtype.get(dtype, 0) + frozen_added * a
    weights = sum(by_dtype.values())

    # Gradients, optimizer states, master weights ---------------------------------------------------
    if method.gradient_free:
        # a search step is forward passes under no_grad: nothing holds a gradient, the optimizer never steps
        gradients = masters = optimizer_states = optimizer_transient = 0
        assumptions.append(f"{method.name} searches its {trainable:,} numbers without gradients: a step is a forward "
                           "pass and its loss under torch.no_grad(), with no gradients and no optimizer states")
    else:
        held = trainable  # elements holding a gradient and optimizer states
        if method.mask_kept is not None and method.unfrozen_params is not None:
            held = head + sum(dict(spec.params)[name] for spec, name in method.unfrozen_params(config, **resolved)
                              if not spec.tied_to)
            by_dtype["int64 (mask indices)"] = 8 * own
            weights += 8 * own
            assumptions.append(f"gradient mask: {own:,} entries train, but the {held - head:,} elements of the masked "
                               "tensors hold dense gradients and optimizer states; 8 B per kept index")
        gradients = held * tb
        masters = 4 * held if tdtype == "fp16" else 0
        state_bytes = 4 if tdtype == "fp16" else tb
        largest = _memo(config, method, "largest", resolved,
                        lambda: _largest_trainable(shape, method, config, resolved, full, held - head))
        if head:  # the head's own tensors are trainable too: the optimizer's temporaries may be as big as its largest
            largest = max(largest, max(dict(m.params)[p] for m, p in shape.task_head_params))
            assumptions.append(f"task head {', '.join(shape.task_head)} ({shape.task_type}): {head:,} parameters train "
                               "beside the method (peft's modules_to_save), with their gradients and optimizer states")
        if optimizer == "adamw8bit" and largest < BNB_MIN_8BIT_SIZE:
            # Even the biggest trainable tensor is under min_8bit_size: every one keeps fp32 moments, no build needed.
            optimizer_states, optimizer_transient = 8 * held, 0
            assumptions.append(f"8-bit AdamW: the biggest trainable tensor has {largest:,} elements, under "
                               f"{BNB_MIN_8BIT_SIZE}: every tensor keeps fp32 moments (8 B per element)")
        elif optimizer == "adamw8bit":
            # bitsandbytes decides 8-bit or 32-bit per tensor: the sizes of the trainable tensors decide the bytes.
            sizes = trainable_tensor_sizes(config, method, resolved)
            optimizer_states, optimizer_transient = adamw8bit_state_bytes(sizes), 0
            small = sum(n for n in sizes if n < BNB_MIN_8BIT_SIZE)
            assumptions.append(f"8-bit AdamW: {len(sizes)} trainable tensors (sizes from a meta-device build of the "
                               f"method); {small:,} of their {sum(sizes):,} elements sit in tensors under "
                               f"{BNB_MIN_8BIT_SIZE} elements and keep fp32 moments")
        else:
            optimizer_states, optimizer_transient = _optimizer(optimizer, held, state_bytes, largest, shape, full)
        if masters:
            assumptions.append("fp16 trainable parameters: fp32 master copies (4 B/param) are updated by the "
                               "optimizer, whose states are fp32 too (mixed precision with loss scaling)")
        elif tdtype == "bf16":
            assumptions.append("bf16 trainable parameters without fp32 master copies (pure bf16 training); "
                               "optimizer states in the parameters' dtype, as torch creates them")
        assumptions.append(_OPTIMIZER_NOTES[optimizer])

    # Activations -----------------------------------------------------------------------------------
    extra = method.extra_positions(config, **resolved) if method.extra_positions else 0
    key_value_only = method.key_value_positions
    s = seq_len if key_value_only else seq_len + extra
    if extra and key_value_only:
        assumptions.append(f"{extra} virtual key/value positions in every prefixed attention: keys and values "
                           f"grow to {seq_len + extra} positions, queries, MLP, norms and logits stay at {seq_len}")
    elif extra:
        assumptions.append(f"{extra} virtual tokens of the method lengthen every block's sequence (and the logits) "
                           f"to {s}")
    if attention == "sdpa" and not supports_sdpa(config):
        attention = "eager"
        assumptions.append(f"{config.model_type} has no SDPA path in transformers: eager attention")
    assumptions.append(_DEVICE_NOTES[device])
    assumptions.append("model in train mode: dropout is active wherever the config sets a probability "
                       "(as in the simulation and in training)")
    ctx = Ctx(config, shape, batch_size, s, seq_len + extra, a, attention, device, full)
    if method.gradient_free and gradient_checkpointing:
        gradient_checkpointing = False  # it acts in backward only: a forward under no_grad saves nothing to drop
        assumptions.append("gradient checkpointing changes nothing: the step has no backward pass")
    if method.backprop_through_backbone and not method.gradient_free:
        start = _memo(config, method, "start", resolved, lambda: trainable_start(method, config, resolved))
        saved = saved_activations(ctx, start)
        if not full and (start.block > 0 or start.stage > INPUT):
            assumptions.append(f"gradients start at block {start.block} ({_stage_name(start.stage)}): the blocks "
                               "below save nothing for backward, and that block only what follows it")
    elif method.gradient_free:
        saved = Activations({}, 0, 0, 0)
        assumptions.append("no backward pass: the forward saves nothing, and each block's tensors are freed as it "
                           "ends; the loss's transients below are the forward's largest")
    else:
        saved = Activations({}, 0, 0, 0)
        assumptions.append("the method does not back-propagate through the backbone: the backbone saves nothing")
    assumptions.extend(ctx.notes)
    terms = saved.terms
    method_terms = {} if method.gradient_free else _method_terms(method, config, batch_size, s, a, tb, resolved)
    recomputed = 0
    if gradient_checkpointing:
        # Each checkpointed block keeps its input (the previous block's output); in backward one block's
        # tensors are rebuilt at a time, with the method's share of that block.
        n_blocks = max(saved.saving_blocks, 1)
        per_block_method = sum(method_terms.values()) // n_blocks
        recomputed = saved.largest_block + per_block_method
        activations_by_term = {
            "block inputs (checkpointed)": saved.saving_blocks * batch_size * s * shape.hidden_size * a
            + saved.checkpoint_extra,
            RECOMPUTED: recomputed}
        activations_by_term.update({k: v for k, v in terms.items() if k.startswith("outside blocks")})
        assumptions.append("gradient checkpointing on every block (non-reentrant): each block keeps its input, "
                           "one block's activations are rebuilt at a time in backward")
    else:
        activations_by_term = dict(terms)
        for key, value in method_terms.items():
            activations_by_term[f"method: {key}"] = value
    activations = sum(activations_by_term.values())
    vocab_positions = batch_size * s
    if shape.task_type is not None:
        # A task head's logits are num_labels wide (two for answer start and end), not vocabulary-wide: whatever
        # dtype the loss takes, its transients are a few bytes per position; the fp32 rule bounds them.
        width = 2 if shape.task_type == "QUESTION_ANS" else int(getattr(config, "num_labels", 2) or 2)
        loss_transient = 12 * vocab_positions * width
        assumptions.append(f"{shape.task_type} head: logits {width} wide, at most 12 B x batch x positions x {width} "
                           "for the loss's transients")
    elif method.gradient_free and shape.family in LOSS_IN_MODEL_DTYPE:
        loss_transient = 2 * a * vocab_positions * shape.vocab_size
        assumptions.append(f"{config.model_type}: no backward pass; at the loss the logits and their log-softmax, in "
                           f"the model's dtype, are alive together: 2 x {a} B x batch x positions x vocab")
    elif method.gradient_free:
        loss_transient = (a + 8) * vocab_positions * shape.vocab_size
        assumptions.append(f"no backward pass; at the loss the logits ({a} B), their fp32 copy and its fp32 "
                           f"log-softmax are alive together: {a + 8} B x batch x positions x vocab")
    elif shape.family in LOSS_IN_MODEL_DTYPE:
        loss_transient = 3 * a * vocab_positions * shape.vocab_size
        assumptions.append(f"{config.model_type}: CrossEntropyLoss on logits in the model's dtype; at the start of "
                           "backward the saved log-softmax and two logit gradients are alive together: "
                           f"3 x {a} B x batch x positions x vocab")
    else:
        loss_transient = 12 * vocab_positions * shape.vocab_size
        assumptions.append("logits cast to fp32 for the loss; at the start of backward the saved log-softmax and "
                           "two fp32 logit gradients are alive together: 12 B x batch x positions x vocab")
    # input_ids and the targets (int64): next tokens, token labels, or one label (answer start and end) per sequence
    targets = {"SEQ_CLS": batch_size, "QUESTION_ANS": 2 * batch_size}.get(shape.task_type or "", batch_size * seq_len)
    batch_bytes = 8 * batch_size * seq_len + 8 * targets

    fixed = weights + optimizer_states + masters + batch_bytes
    # With checkpointing the loss's transients are gone before the first block is rebuilt.
    backward_peak = _backward_peak(activations, recomputed, loss_transient)
    step_peak = gradients + optimizer_transient
    total = fixed + max(backward_peak, step_peak)
    phase = "forward" if method.gradient_free else "backward" if backward_peak >= step_peak else "optimizer step"
    assumptions.append(f"the peak is reached at the {phase} (steady state: optimizer states already exist)")
    assumptions.append("total: allocated bytes only; `reserved` adds the caching allocator's reserve (below), the "
                       "CUDA context is kept apart")
    note = ("nvidia-smi and most published figures show reserved memory plus the CUDA context: `reserved` adds "
            "the caching allocator's reserve (survey_utils.memory.allocator), and the CUDA context is a per-GPU "
            "constant kept apart (`cuda_context` in memory --json)")
    result = MemoryEstimate(
        weights=weights, weights_by_dtype=by_dtype, gradients=gradients, optimizer_states=optimizer_states,
        master_weights=masters, activations=activations, activations_by_term=activations_by_term,
        loss_transient=loss_transient, optimizer_transient=optimizer_transient, batch=batch_bytes, total=total,
        trainable_params=trainable, total_params=base_total + added, peak_phase=phase,
        cuda_overhead_note=note, assumptions=assumptions,
    )
    from survey_utils.memory.allocator import reserved_of

    reserved, reserved_note = reserved_of(config, method, result)
    return dataclasses.replace(result, reserved=reserved, assumptions=[*assumptions, reserved_note])


_QUANT_NOTES = {
    "nf4": f"NF4 (bitsandbytes, QLoRA): frozen block linears at {NF4_BYTES_PER_WEIGHT:.4f} B/weight (4-bit codes, "
           "8-bit absmax per 64 weights, fp32 constant per 256 blocks); embeddings, norms and head unquantized",
    "int8": "int8 (bitsandbytes LLM.int8): frozen block linears at 1 B/weight plus one fp32 scale per output row; "
            "embeddings, norms and head unquantized",
}

_OPTIMIZER_NOTES = {
    "adamw": "AdamW: two moments per trainable parameter; per-parameter update (foreach=False) whose largest "
             "temporaries are two tensors the size of the biggest trainable parameter",
    "adamw8bit": "AdamW 8-bit (bitsandbytes): uint8 moments plus one fp32 absmax per 256 elements, fp32 moments "
                 "for tensors under 4096 elements; fused in-place update",
    "sgd": "SGD with momentum: one buffer per trainable parameter, in-place update",
    "adafactor": "Adafactor (torch): factored second moment (row and column vectors) for matrices, full for "
                 "vectors, no first moment; the update materialises one tensor the size of the parameter",
}


_MEMO: dict[tuple[Any, ...], tuple[Any, Any, Any]] = {}


def _memo(config: Any, method: Method, what: str, hp: dict[str, Any], compute: Any) -> Any:
    """``compute()``, remembered for the zoo's shared read-only configs: what depends on the model and the method's
    settings only (resolved hyper-parameters, counts, where gradients start) is then computed once, however many
    (batch, sequence) points the advisor and the widgets ask for. Any other config is computed every time (it may
    be changed between calls)."""
    if not getattr(config, "_frozen", False):
        return compute()
    key = (id(config), id(method), what, repr(sorted(hp.items())))
    hit = _MEMO.get(key)
    if hit is not None and hit[0] is config and hit[1] is method:
        return hit[2]
    value = compute()
    _MEMO[key] = (config, method, value)
    return value


def adamw8bit_state_bytes(sizes: tuple[int, ...] | list[int]) -> int:
    r"""State bytes of bitsandbytes' ``AdamW8bit`` (0.50.2, ``Optimizer2State.init_state``) for tensors of ``sizes``
    elements (chapter 06, "8-bit and paged optimizers"):

    .. math:: O = \sum_{n < 4096} 8n \;+\; \sum_{n \ge 4096} \bigl(2n + 2 \cdot 4 \lceil n / 256 \rceil\bigr)
              \;+\; [\exists\, n \ge 4096]\; 2 \cdot 256 \cdot 4

    two fp32 moments below ``min_8bit_size``; otherwise two uint8 moments with one fp32 absmax each per block of
    256, and the two shared 256-entry fp32 quantization maps once. ``step`` is a Python int (no tensor);
    ``unorm_vec`` exists only with ``max_unorm > 0`` (default 0). Paged variants hold the same bytes (in unified
    memory that can spill to the CPU)."""
    states = 0
    quantized = False
    for n in sizes:
        if n < BNB_MIN_8BIT_SIZE:
            states += 2 * 4 * n
        else:
            quantized = True
            states += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK_SIZE)
    return states + (2 * 4 * BNB_QMAP_ENTRIES if quantized else 0)


def trainable_tensor_sizes(config: PretrainedConfig, method: Method, hp: dict[str, Any]) -> tuple[int, ...]:
    """Element counts of the tensors that hold gradients and optimizer states (``hp`` resolved), sorted: read
    from the method's own ``apply`` on a ``meta``-device build (no storage, so any size), cached per config,
    method and settings. What an optimizer that decides per tensor (bitsandbytes' 8-bit ones) needs, and the
    closed form's total cannot say."""
    key = (config.to_json_string(use_diff=False), getattr(config, "name_or_path", ""), method.name,
           tuple(sorted((k, repr(v)) for k, v in hp.items())))
    if key not in _SIZES:
        from survey_utils.zoo import build_model

        try:
            model = method.apply(build_model(config, device="meta"), **hp)
            train_task_head(model, method.trains_whole_model)  # the task head's tensors train too
        except SurveyError:
            raise
        except Exception as error:  # noqa: BLE001 - a model's or a method's constructor fails in many ways
            raise SurveyError(f"8-bit AdamW needs the trainable tensors' sizes, but method '{method.name}' could not be "
                              f"built on '{getattr(config, 'name_or_path', '')}' on meta: "
                              f"{(str(error).splitlines() or [type(error).__name__])[0]}") from None
        _SIZES[key] = tuple(sorted(p.numel() for p in model.parameters() if p.requires_grad))
    return _SIZES[key]


_SIZES: dict[tuple[Any, ...], tuple[int, ...]] = {}


def _quantized_bytes(shape: Layout, quantization: str) -> tuple[int, int]:
    weights = [m for m in shape.modules if m.kind in ("linear", "conv1d") and m.layer is not None]
    count = sum(m.in_features * m.out_features for m in weights)
    if quantization == "nf4":
        return math.ceil(count * NF4_BYTES_PER_WEIGHT), count
    return count + 4 * sum(m.out_features for m in weights), count


def _largest_trainable(shape: Layout, method: Method, config: PretrainedConfig, hp: dict[str, Any], full: bool,
                       trainable: int) -> int:
    """Elements of the biggest trainable tensor (the optimizer's temporaries are this big)."""
    if full:
        return max(n for m in shape.modules if not m.tied_to for _, n in m.params)
    if method.largest_trainable_tensor is not None:
        return method.largest_trainable_tensor(config, **hp)
    return trainable


def _optimizer(name: str, trainable: int, state_bytes: int, largest: int, shape: Layout, full: bool
               ) -> tuple[int, int]:
    if name == "adamw":
        return 2 * trainable * state_bytes, 2 * largest * state_bytes
    if name == "sgd":
        return trainable * state_bytes, 0
    # adafactor: a matrix (rows x cols) keeps rows + cols; vectors keep themselves.
    if full:
        states = 0
        for module in shape.modules:
            if module.tied_to:
                continue
            for pname, n in module.params:
                if pname == "weight" and module.kind in ("linear", "conv1d", "embedding"):
                    states += module.in_features + module.out_features
                else:
                    states += n
        return states * state_bytes, largest * state_bytes
    # PEFT: matrices of shape (r x d) dominate; their factored states are about sqrt-sized, bounded by 1%.
    return max(1, trainable // 50) * state_bytes, largest * state_bytes


def _stage_name(stage: float) -> str:
    names = {INPUT: "its input", ATTN_IN: "after the attention's input projections", ATTN_OUT:
             "after the attention output", MLP_IN: "after the MLP's input projections", MLP_OUT: "after the MLP"}
    return names.get(stage, f"stage {stage:g}")


_DEVICE_NOTES = {
    "cuda": "device CUDA: SDPA's flash/efficient kernels (dropout inside the kernel, no s^2 tensor), 1-byte "
            "dropout masks, fp32 LayerNorm statistics",
    "cpu": "device CPU (what the fake-tensor simulation runs): SDPA with attention dropout takes the fp32 math "
           "path, dropout keeps its noise in the activation dtype, LayerNorm statistics in the activation dtype",
}


def _method_terms(method: Method, config: PretrainedConfig, b: int, s: int, a: int, tb: int,
                  hp: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in method.memory_terms(config, b, s, a, tb, **hp).items()}
