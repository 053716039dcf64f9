r"""Per-GPU memory of one training step on N GPUs: DDP, ZeRO-1/2/3, FSDP, CPU offload (chapter 06).

Data parallelism gives every GPU its own micro-batch, so activations, the loss transient and the batch stay
what one GPU holds (:func:`survey_utils.memory.closed_form`); what sharding divides are the *model states*. In
the ZeRO paper's accounting (Rajbhandari et al. 2020, arXiv:1910.02054, section 5 and figure 1) with
:math:`W` weights, :math:`G` gradients and :math:`O` optimizer states (with fp32 master copies where the
estimate keeps them) on :math:`N` GPUs:

=====================  ================================================================
strategy               model states per GPU
=====================  ================================================================
DDP                    :math:`W + G + O` (+ :math:`G` for DDP's gradient buckets)
ZeRO-1 (P_os)          :math:`W + G + O/N`
ZeRO-2 (P_os+g)        :math:`W + (G + O)/N`
ZeRO-3 (P_os+g+p)      :math:`(W + G + O)/N` + the parameters gathered for the current module
FSDP SHARD_GRAD_OP     ZeRO-2, plus one wrapped unit's unsharded gradients before reduce-scatter
FSDP FULL_SHARD        ZeRO-3 with units = transformer blocks; the root unit (embeddings, final norm,
                       head) stays gathered through the step, and two blocks are gathered at once
                       (the current one and the one prefetched, ``BACKWARD_PRE``)
=====================  ================================================================

CPU offload (ZeRO-Offload, Ren et al. 2021, arXiv:2101.06840; FSDP ``CPUOffload``) moves the optimizer
states, the master copies and the optimizer's update to the CPU (``offload="optimizer"``), and with
``offload="optimizer+params"`` (ZeRO-3 / FULL_SHARD only) the parameter shards and their gradients too.

The step's phases are kept from the estimate: the peak is
:math:`W' + O' + B + \max(\text{backward}', \text{step}')` with backward' the estimate's backward peak
(activations and the loss's transients) plus whatever parameters and unsharded gradients a unit gathers,
and step' the (sharded) gradients plus the optimizer's temporaries. Every choice is returned as an
assumption string beside the number. Torch-free: the advisor runs it for every method in well under a second.

What is not modelled (said in the assumptions): communication buckets (DDP's 25 MiB buckets are counted as
the whole gradient copy they add up to; ZeRO's ``reduce_bucket_size`` and ``allgather_bucket_size`` staging
buffers are not), NCCL's own workspace, and fragmentation of the flat buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from survey_utils.errors import SurveyError

if TYPE_CHECKING:
    from survey_utils.architecture import Layout
    from survey_utils.memory.closed_form import MemoryEstimate

STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp_shard_grad_op", "zero3", "fsdp_full_shard")
"""Strategies, cheapest in communication first: DDP, ZeRO-1 and ZeRO-2 move as much data per step as plain
data parallelism (ZeRO paper, section 7); ZeRO-3 and FULL_SHARD move 1.5 times as much."""
OFFLOADS = ("none", "optimizer", "optimizer+params")
SHARDS_PARAMS = ("zero3", "fsdp_full_shard")
MULTI_GPU = tuple(s for s in STRATEGIES if s != "single")

# DeepSpeed's default stage3_prefetch_bucket_size: parameters gathered ahead of the module that needs them
# (deepspeed/runtime/zero/config.py in deepspeedai/DeepSpeed: ``prefetch_bucket_size = Field(pp_int(5e7), ...,
# alias="stage3_prefetch_bucket_size")``, "maximum number of parameter elements to fetch ahead of use").
ZERO3_PREFETCH_ELEMENTS = 50_000_000


@dataclass(frozen=True)
class Sharding:
    """How a step is spread: a strategy, the number of GPUs, and what is offloaded to the CPU."""

    strategy: str = "single"
    gpus: int = 1
    offload: str = "none"

    def __post_init__(self) -> None:
        check_sharding(self.strategy, self.gpus, self.offload)

    @property
    def label(self) -> str:
        offload = "" if self.offload == "none" else f" + offload {self.offload}"
        return f"{self.strategy}{offload}" if self.strategy == "single" else \
            f"{self.strategy} x{self.gpus}{offload}"


def check_sharding(strategy: str, gpus: Any, offload: str = "none") -> None:
    """One-line :class:`SurveyError` for an unknown strategy, 0 GPUs, or a sharding on one GPU."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise SurveyError(f"gpus={gpus!r} must be a positive integer")
    if strategy not in STRATEGIES:
        raise SurveyError(f"sharding '{strategy}' is not one of {', '.join(STRATEGIES)}")
    if offload not in OFFLOADS:
        raise SurveyError(f"offload '{offload}' is not one of {', '.join(OFFLOADS)}")
    if strategy != "single" and gpus == 1:
        raise SurveyError(f"sharding '{strategy}' needs at least 2 GPUs (gpus=1): use 'single'")
    if strategy == "single" and gpus > 1:
        raise SurveyError(f"sharding 'single' runs on one GPU, not gpus={gpus}: pick one of "
                          f"{', '.join(MULTI_GPU)}")
    if offload == "optimizer+params" and strategy not in SHARDS_PARAMS:
        raise SurveyError(f"offload '{offload}' needs sharded parameters ({' or '.join(SHARDS_PARAMS)}), "
                          f"not '{strategy}'")
    if offload != "none" and strategy in ("ddp", "zero1"):
        raise SurveyError(f"offload '{offload}' is not available with '{strategy}' (ZeRO-Offload needs ZeRO-2 "
                          "or 3, or FSDP)")


@dataclass(frozen=True)
class Units:
    """Parameter counts of the units a sharded step gathers (from the layout, torch-free)."""

    root: int  # outside the blocks: embeddings, final norms, head (tied weights once)
    largest_block: int
    largest_module: int  # the biggest single module (DeepSpeed ZeRO-3 gathers module by module)
    blocks: int


_UNITS: dict[int, tuple[Layout, Units]] = {}


def units(shape: Layout) -> Units:
    """Group the layout's parameters into FSDP's transformer-block units and the root (cached per layout)."""
    cached = _UNITS.get(id(shape))
    if cached is not None and cached[0] is shape:
        return cached[1]
    result = _units(shape)
    _UNITS[id(shape)] = (shape, result)
    return result


def _units(shape: Layout) -> Units:
    per_block: dict[int, int] = {}
    root, largest_module = 0, 0
    for module in shape.modules:
        if module.tied_to:
            continue
        n = module.numel
        largest_module = max(largest_module, n)
        if module.layer is None:
            root += n
        else:
            per_block[module.layer] = per_block.get(module.layer, 0) + n
    return Units(root, max(per_block.values(), default=0), largest_module, len(per_block))


@dataclass(frozen=True)
class PerGPU:
    """One GPU's allocated peak under a sharding, term by term, with the assumptions behind it."""

    sharding: Sharding
    total: int
    terms: dict[str, int]
    cpu_bytes: int
    peak_phase: str
    states: dict[str, int] = field(default_factory=dict)
    """Model states on this GPU whatever the phase: weights, gradients, optimizer states (the ZeRO paper's
    figure 1 quantities; DDP's buckets and gathered units apart)."""
    assumptions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"sharding": self.sharding.label, "strategy": self.sharding.strategy, "gpus": self.sharding.gpus,
                "offload": self.sharding.offload, "total": self.total, "terms": self.terms,
                "states": self.states, "cpu_bytes": self.cpu_bytes, "peak_phase": self.peak_phase, "assumptions": self.assumptions}


def phases(est: MemoryEstimate) -> tuple[int, int]:
    """The estimate's backward peak (activations and loss transients) and step peak (gradients + temporaries)."""
    recomputed = est.activations_by_term.get("one block recomputed", 0)
    backward = est.activations - recomputed + max(est.loss_transient, recomputed)
    return backward, est.gradients + est.optimizer_transient


def per_gpu(est: MemoryEstimate, shape: Layout, sharding: Sharding, full: bool) -> PerGPU:
    """Allocated bytes on one GPU under ``sharding`` for the step ``est`` describes (``full``: every base
    parameter trains, so a unit's gradients are as big as its parameters)."""
    n, strategy, offload = sharding.gpus, sharding.strategy, sharding.offload
    w, g = est.weights, est.gradients
    o = est.optimizer_states + est.master_weights
    t_opt = est.optimizer_transient
    backward, _ = phases(est)
    notes: list[str] = []
    extra_backward = 0
    ddp_buckets = 0
    cpu = 0
    u = units(shape)
    params = max(est.total_params, 1)
    bytes_per_param = w / params  # average storage (NF4 blocks, 16-bit root) per parameter
    block_bytes = int(u.largest_block * bytes_per_param)
    root_bytes = int(u.root * bytes_per_param)
    grad_fraction = 1.0 if full else (est.trainable_params / params)
    grad_bytes_per_param = g / max(est.trainable_params, 1)
    unit_grads = int(u.largest_block * grad_fraction * grad_bytes_per_param) if g else 0

    if strategy == "single":
        notes.append("one GPU: every model state on it")
    elif strategy == "ddp":
        ddp_buckets = g
        notes.append(f"DDP on {n} GPUs: every GPU holds all model states, plus its gradient buckets (a second "
                     "copy of the trainable gradients: torch's default gradient_as_bucket_view=False)")
    elif strategy == "zero1":
        o //= n
        notes.append(f"ZeRO-1 on {n} GPUs: optimizer states (and master copies) divided by {n}")
    elif strategy in ("zero2", "fsdp_shard_grad_op"):
        o //= n
        g //= n
        notes.append(f"{strategy} on {n} GPUs: optimizer states and gradients divided by {n}; weights replicated")
        if strategy == "fsdp_shard_grad_op" and unit_grads:
            extra_backward = unit_grads
            notes.append("FSDP SHARD_GRAD_OP: one block's unsharded gradients are alive before their "
                         "reduce-scatter")
    else:  # zero3, fsdp_full_shard
        o //= n
        g //= n
        w_shard = w // n
        if strategy == "zero3":
            gathered = int((u.largest_module + ZERO3_PREFETCH_ELEMENTS) * bytes_per_param)
            notes.append(f"ZeRO-3 on {n} GPUs: weights, gradients and optimizer states divided by {n}; gathered "
                         f"in full: the largest module ({u.largest_module:,} parameters) plus DeepSpeed's "
                         f"default prefetch bucket ({ZERO3_PREFETCH_ELEMENTS:,} elements)")
            extra_backward = gathered
        else:
            gathered = root_bytes + 2 * block_bytes
            extra_backward = gathered + unit_grads
            notes.append(f"FSDP FULL_SHARD on {n} GPUs, one unit per transformer block: weights, gradients and "
                         f"optimizer states divided by {n}; gathered in full: the root unit (embeddings, final "
                         f"norm, head: {u.root:,} parameters, kept through the step) and two blocks "
                         f"({u.largest_block:,} parameters each: current and prefetched), plus one block's "
                         "unsharded gradients before their reduce-scatter")
        if offload == "optimizer+params":
            cpu += w_shard + g
            notes.append("parameter shards and their gradients offloaded to the CPU; only gathered units on "
                         "the GPU")
            w_shard, g = 0, 0
        w = w_shard
    if offload in ("optimizer", "optimizer+params"):
        cpu += o
        notes.append("optimizer states, master copies and the update on the CPU (ZeRO-Offload / FSDP "
                     "CPUOffload)")
        o, t_opt = 0, 0
    if strategy != "single":
        notes.append("activations, the loss's transients and the batch are one GPU's micro-batch (data "
                     "parallel); communication staging buffers and NCCL's workspace are not counted")
    backward_peak = backward + extra_backward
    step_peak = g + t_opt
    fixed = w + o + est.batch + ddp_buckets
    total = fixed + max(backward_peak, step_peak)
    phase = "backward" if backward_peak >= step_peak else "optimizer step"
    terms = {"weights": w, "optimizer states": o, "batch": est.batch}
    if ddp_buckets:
        terms["DDP gradient buckets"] = ddp_buckets
    if phase == "backward":
        terms["activations"] = backward
        if extra_backward:
            terms["gathered parameters"] = extra_backward
    else:
        terms["gradients"] = g
        terms["optimizer step"] = t_opt
    states = {"weights": w, "gradients": g, "optimizer states": o}
    return PerGPU(sharding, total, terms, cpu, phase, states, notes)


def candidates(gpus: int) -> list[Sharding]:
    """Shardings to try on ``gpus`` GPUs, cheapest first: strategies by communication, then CPU offload."""
    if gpus < 1 or isinstance(gpus, bool):
        raise SurveyError(f"gpus={gpus!r} must be a positive integer")
    if gpus == 1:
        return [Sharding()]
    plain = [Sharding(s, gpus) for s in MULTI_GPU]
    offloaded = [Sharding(s, gpus, "optimizer") for s in ("zero2", "fsdp_shard_grad_op", "zero3", "fsdp_full_shard")]
    offloaded += [Sharding(s, gpus, "optimizer+params") for s in SHARDS_PARAMS]
    return plain + offloaded
