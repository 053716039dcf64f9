r"""Chapter 05's experiment: a budgeted design search over hybrids (section "A budgeted design search").

AutoPEFT (Zhou et al. 2023) and S4 (Chen et al. 2023) search which methods go where, at which sizes. Here the
design space is every combination of LoRA on :math:`W_Q, W_V` (rank :math:`r`), prefix tuning (:math:`n`
positions, no MLP), and a serial or parallel bottleneck adapter (width :math:`k`), on all blocks or the upper
half. Each candidate is a :func:`~survey_utils.methods.composition.compose` of registered parts, but it is
*scored* without building anything: each part's closed forms are computed once per setting (an "atom"), and
a candidate's numbers are assembled from its atoms:

- trainable parameters: the sum of its parts' (the composition's own rule);
- peak memory of a training step: the memory model of ``survey_utils.memory.closed_form`` (AdamW, no gradient
  checkpointing), assembled from the atoms' parameters, saved tensors and where gradients start (the lowest
  part's start; the backbone's saved activations are cached per start and prefix length).
  :func:`peak_of` equals ``estimate(compose(parts)).total`` exactly (tested on random candidates);
- inference overhead: extra FLOPs per token after LoRA is merged, as a % of the base model's :math:`2N`:
  :math:`4dk` per adapter, :math:`4 n\,d_\text{attn}` per prefixed attention (scores and values over
  :math:`n` more keys), 0 for LoRA.

:func:`search` returns the feasible candidates and their Pareto front: within the budgets, the most trainable
capacity for the least peak memory and inference overhead (minimising all three would always pick the smallest
LoRA, which costs nothing at inference and least in memory: a front of one point). ``benchmarks/design_search_speed.py`` prints candidates per second.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import layout, total_params
from survey_utils.errors import SurveyError
from survey_utils.memory.activations import Ctx, Start, saved_activations, trainable_start
from survey_utils.memory.closed_form import estimate
from survey_utils.methods import get_method
from survey_utils.methods.composition import Part, compose
from survey_utils.methods.registry import NOT_PLACED, Method, Taxonomy
from survey_utils.methods.soft_prompts import prefix_layers
from survey_utils.targeting import num_blocks
from survey_utils.units import DTYPE_BYTES
from survey_utils.zoo import load_config, supports_sdpa

if TYPE_CHECKING:
    from transformers import PretrainedConfig

RANKS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
PREFIX_LENGTHS = (0, 5, 10, 20, 30, 50, 100, 200)
ADAPTERS = ("none", "pfeiffer", "parallel_adapter")
BOTTLENECKS = (8, 16, 32, 64, 128, 256, 512)
BLOCKS = ("all", "upper half")
NAMED = ("lora", "mam_adapter", "unipelt", "compacter_pp", "scaled_parallel", "s4")
"""The named configurations marked on the front (registered methods at their defaults)."""


@dataclass(frozen=True)
class Atom:
    """One part at one setting, scored once: what a candidate sums or compares."""

    part: Part
    trainable: int
    frozen_added: int
    largest: int
    saved: int  # bytes its own modules save for backward
    start: Start
    flops: int  # extra FLOPs per token at inference


@dataclass(frozen=True)
class Candidate:
    """A point of the design space with its three objectives."""

    label: str
    parts: tuple[Part, ...]
    trainable: int
    peak: int  # bytes
    overhead: float  # % extra FLOPs per token at inference


@dataclass
class SearchResult:
    model: str
    evaluated: int
    seconds: float
    feasible: list[Candidate]
    front: list[Candidate]
    named: list[Candidate] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.evaluated / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        def row(c: Candidate) -> dict[str, Any]:
            return {"label": c.label, "trainable": c.trainable, "peak_bytes": c.peak, "overhead_pct": c.overhead}
        return {"model": self.model, "evaluated": self.evaluated, "feasible": len(self.feasible),
                "front": [row(c) for c in self.front], "named": [row(c) for c in self.named],
                "settings": self.settings}


class DesignSpace:
    """The atoms and the memory model's fixed pieces for one model and training setting."""

    def __init__(self, model: str | PretrainedConfig, batch_size: int = 8, seq_len: int = 128,
                 dtype: str = "bf16") -> None:
        self.config = load_config(model)
        self.model = getattr(self.config, "_name_or_path", "") or str(model)
        self.b, self.s, self.dtype, self.a = batch_size, seq_len, dtype, DTYPE_BYTES[dtype]
        shape = layout(self.config)
        self.base_flops = 2 * total_params(self.config)
        reference = estimate(self.config, "lora", batch_size=batch_size, seq_len=seq_len, dtype=dtype)
        self.loss, self.batch = reference.loss_transient, reference.batch
        self.base_weights = total_params(self.config) * self.a
        self.attention = "sdpa" if supports_sdpa(self.config) else "eager"
        blocks = num_blocks(shape)
        self.layers = {"all": None, "upper half": list(range(blocks // 2, blocks))}
        self.attn_width = shape.num_heads * shape.head_dim
        self._atoms: dict[tuple[str, tuple], Atom] = {}
        self._backbone: dict[tuple[Start, int], int] = {}
        self.named: list[Candidate] | None = None

    def atom(self, method: str, **settings: Any) -> Atom:
        key = (method, tuple(sorted((k, str(v)) for k, v in settings.items())))
        if key not in self._atoms:
            registered = get_method(method)
            hp = registered.resolve(self.config, **settings)
            terms = registered.memory_terms(self.config, self.b, self.s, self.a, self.a, **hp)
            trainable = registered.trainable_params(self.config, **hp)
            largest = (registered.largest_trainable_tensor or registered.trainable_params)(self.config, **hp)
            self._atoms[key] = Atom(Part(method, method, settings), trainable,
                                    registered.added_params(self.config, **hp) - trainable, largest,
                                    sum(int(v) for v in terms.values()),
                                    trainable_start(registered, self.config, hp), self._flops(registered, hp))
        return self._atoms[key]

    def _flops(self, method: Method, hp: dict[str, Any]) -> int:
        if method.mergeable:
            return 0
        if method.extra_positions is not None:
            return 4 * method.extra_positions(self.config, **hp) * self.attn_width * prefix_layers(self.config)
        sites = method.sites(self.config, **hp)
        width = hp.get("bottleneck_size") or 0
        return sum(4 * s.out_features * (width or int(s.out_features // hp["reduction_factor"])) for s in sites)

    def backbone(self, start: Start, positions: int) -> int:
        """Bytes the frozen backbone saves when gradients start at ``start`` (prefix: ``positions`` more keys)."""
        key = (start, positions)
        if key not in self._backbone:
            ctx = Ctx(self.config, layout(self.config), self.b, self.s, self.s + positions, self.a, self.attention,
                      "cuda", False)
            self._backbone[key] = sum(saved_activations(ctx, start).terms.values())
        return self._backbone[key]

    def peak_of(self, atoms: list[Atom], positions: int) -> int:
        """The memory model's peak for the composition of ``atoms`` (bf16/fp32/fp16 weights, AdamW)."""
        tb = self.a
        trainable = sum(a.trainable for a in atoms)
        frozen = sum(a.frozen_added for a in atoms)
        largest = max(a.largest for a in atoms)
        state = 4 if self.dtype == "fp16" else tb
        masters = 4 * trainable if self.dtype == "fp16" else 0
        start = min(atoms, key=lambda a: (a.start.block, a.start.stage)).start
        activations = self.backbone(start, positions) + sum(a.saved for a in atoms)
        fixed = self.base_weights + trainable * tb + frozen * self.a + 2 * trainable * state + masters + self.batch
        return fixed + max(activations + self.loss, trainable * tb + 2 * largest * state)


def candidates(space: DesignSpace) -> list[tuple[str, list[Atom], int]]:
    """Every point of the design space as (label, atoms, prefix positions); the empty point is left out."""
    points = []
    for blocks, r, n, adapter, k in itertools.product(BLOCKS, RANKS, PREFIX_LENGTHS, ADAPTERS, BOTTLENECKS):
        if (adapter == "none" and k != BOTTLENECKS[0]) or (blocks != "all" and not r and adapter == "none"):
            continue  # one point per setting: k means nothing without an adapter, blocks nothing for prefixes
        layers = space.layers[blocks]
        atoms, label = [], []
        if n:
            atoms.append(space.atom("prefix_tuning", num_virtual_tokens=n))
            label.append(f"prefix n={n}")
        if adapter != "none":
            atoms.append(space.atom(adapter, bottleneck_size=k, layers_to_transform=layers))
            label.append(f"{'serial' if adapter == 'pfeiffer' else 'parallel'} adapter k={k}")
        if r:
            atoms.append(space.atom("lora", r=r, layers_to_transform=layers))
            label.append(f"LoRA r={r}")
        if atoms:
            points.append((" + ".join(label) + ("" if blocks == "all" else f" ({blocks})"), atoms, n))
    return points


def pareto_front(points: list[Candidate]) -> list[Candidate]:
    """The candidates no other beats: none has at least as many trainable parameters (capacity, inside the
    budget) with at most the peak memory and the overhead, and is better on one. Sorted by trainable."""
    ordered = sorted(points, key=lambda c: (-c.trainable, c.peak, c.overhead))
    front: list[Candidate] = []
    for c in ordered:
        if not any(f.trainable >= c.trainable and f.peak <= c.peak and f.overhead <= c.overhead for f in front):
            front.append(c)
    return front[::-1]


def search(model: str | PretrainedConfig, trainable_budget: int, memory_budget: int, batch_size: int = 8,
           seq_len: int = 128, dtype: str = "bf16", space: DesignSpace | None = None) -> SearchResult:
    """The feasible candidates (trainable <= ``trainable_budget``, peak <= ``memory_budget`` bytes) and
    their Pareto front, with the named configurations scored the same way (chapter 05, "A budgeted design
    search"). A budget below every candidate is a one-line :class:`SurveyError`."""
    space = space or DesignSpace(model, batch_size, seq_len, dtype)
    began = time.perf_counter()
    scored = []
    for label, atoms, n in candidates(space):
        trainable = sum(a.trainable for a in atoms)
        overhead = 100 * sum(a.flops for a in atoms) / space.base_flops
        scored.append(Candidate(label, tuple(a.part for a in atoms), trainable, space.peak_of(atoms, n), overhead))
    seconds = time.perf_counter() - began
    smallest_t = min(c.trainable for c in scored)
    smallest_m = min(c.peak for c in scored)
    if trainable_budget < smallest_t:
        raise SurveyError(f"trainable budget {trainable_budget:,} is below the smallest configuration "
                          f"({smallest_t:,} parameters)")
    if memory_budget < smallest_m:
        raise SurveyError(f"memory budget {memory_budget / 2**30:.3f} GiB is below the smallest configuration "
                          f"({smallest_m / 2**30:.3f} GiB)")
    feasible = [c for c in scored if c.trainable <= trainable_budget and c.peak <= memory_budget]
    if not feasible:
        raise SurveyError(f"no configuration fits both budgets ({trainable_budget:,} parameters, "
                          f"{memory_budget / 2**30:.3f} GiB)")
    return SearchResult(space.model, len(scored), seconds, feasible, pareto_front(feasible),
                        named_configurations(space),
                        {"batch_size": batch_size, "seq_len": seq_len, "dtype": dtype, "optimizer": "adamw"})


def parse_trainable_budget(text: str, config: PretrainedConfig) -> int:
    """``--trainable-budget``: a parameter count (``2000000``) or a percent of the model's parameters (``1%``)."""
    value = str(text).strip()
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return int(total_params(config) * percent / 100)
        budget = int(value.replace(",", "").replace("_", ""))
        if budget < 1:
            raise ValueError
        return budget
    except ValueError:
        raise SurveyError(f"trainable budget '{text}' is not a positive parameter count (2000000) or a percent of "
                          "the model (1%, at most 100%)") from None


def parse_memory_budget(text: str) -> int:
    """``--memory-budget``: a size with its unit (``24GiB``, ``16GB``), as the advisor reads GPU memory."""
    from survey_utils.advisor import parse_memory

    try:
        return parse_memory(text)
    except SurveyError as error:
        raise SurveyError(str(error).replace("gpu memory", "memory budget", 1)) from None


def format_search(result: SearchResult) -> str:
    """The front as the command line prints it: one row per point, then the named configurations."""
    from survey_utils.units import format_bytes

    settings = result.settings
    lines = [f"{result.model}: {len(result.feasible)} of {result.evaluated} candidates fit; Pareto front of "
             f"{len(result.front)} (batch {settings['batch_size']} x {settings['seq_len']} tokens, "
             f"{settings['dtype']}, {settings['optimizer']})",
             f"{'trainable':>14}  {'peak':>10}  {'inference':>9}  configuration"]
    lines += [f"{c.trainable:>14,}  {format_bytes(c.peak):>10}  {c.overhead:>8.3f}%  {c.label}" for c in result.front]
    lines.append("named configurations at their defaults:")
    lines += [f"{c.trainable:>14,}  {format_bytes(c.peak):>10}  {c.overhead:>8.3f}%  {c.label}" for c in result.named]
    return "\n".join(lines)


def named_configurations(space: DesignSpace) -> list[Candidate]:
    """The registered hybrids (and LoRA) at their defaults, scored by the full memory estimate (once per space)."""
    if space.named is not None:
        return space.named
    named = []
    for name in NAMED:
        method = get_method(name)
        try:
            hp = method.resolve(space.config)
        except SurveyError:
            continue
        peak = estimate(space.config, method, batch_size=space.b, seq_len=space.s, dtype=space.dtype).total
        if method.parts:  # each part at the settings the hybrid gives it on this model (a typed field of Method)
            by_part = method.part_hyperparams(space.config, **hp)
            flops = sum(space._flops(p.registered, by_part[p.label]) for p in method.parts)
        else:
            flops = space._flops(method, hp)
        named.append(Candidate(method.title, method.parts, method.trainable_params(space.config, **hp), peak,
                               100 * flops / space.base_flops))
    space.named = named
    return named


def as_method(candidate: Candidate) -> Method:
    """The candidate as a registered-style composition (to build it, or to check :func:`DesignSpace.peak_of`)."""
    return compose("candidate", candidate.label, "chapter 05 design search", None,
                   Taxonomy(NOT_PLACED, NOT_PLACED, NOT_PLACED), "05_hybrid_unified", candidate.parts)


# ------------------------------------------------------------------------- section "Unified methods" (chapter 05)
@dataclass(frozen=True)
class Check:
    """One real-tensor claim about a unified method: what was measured beside what the closed form says."""

    method: str
    claim: str
    measured: float
    expected: float

    @property
    def holds(self) -> bool:
        return abs(self.measured - self.expected) <= 1e-6 * max(1.0, abs(self.expected))


def unified_checks(model: str = "tiny-bert", steps: int = 2) -> list[Check]:
    """The issue's measurements for ProPETL, AdaMix and SparseAdapter on a tiny model with real tensors (chapter 05,
    "Unified methods"): ProPETL's stored bytes and its layers' shared storage, AdaMix's served adapter against the
    mean of its experts, SparseAdapter's optimizer states after ``steps`` AdamW steps (only kept entries exist)."""
    import torch
    from torch.nn import functional as F

    from survey_utils.counting import apply_method
    from survey_utils.methods.hybrid import ADAMIX, PROPETL, SPARSE_ADAPTER, propetl_stored_bytes
    from survey_utils.methods.layers.hybrid import MaskedPrototype, MixtureOfAdapters, stored_bytes
    from survey_utils.parity import example_inputs
    from survey_utils.zoo import build_model

    config = load_config(model)
    checks = []
    hp = PROPETL.resolve(config)
    built = apply_method(build_model(config, device="cpu", seed=0), PROPETL)
    layers = [m for m in built.modules() if isinstance(m, MaskedPrototype)]
    storages = {m.prototype.adapter_down.weight.untyped_storage().data_ptr() for m in layers}
    checks.append(Check("propetl", f"prototype storages read by the {len(layers)} masked layers", len(storages), 1))
    checks.append(Check("propetl", "stored bytes (fp32 prototype once + 1 bit per mask entry)", stored_bytes(built),
                        propetl_stored_bytes(config, 4, **hp)))

    built = apply_method(build_model(config, device="cpu", seed=0), ADAMIX, share_up=False)
    mixture = next(m for m in built.modules() if isinstance(m, MixtureOfAdapters))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mixture.parameters():  # distinct experts (the up-projections start at zero)
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        mixture.eval()
        x = torch.randn(2, 5, mixture.adamix_down[0].weight.shape[1], generator=generator)
        (w1, b1), (w2, b2) = [(torch.stack([e.weight for e in experts]).mean(0),
                               torch.stack([e.bias for e in experts]).mean(0))
                              for experts in (mixture.adamix_down, mixture.adamix_up)]
        gap = (mixture(x) - F.linear(mixture.act(F.linear(x, w1, b1)), w2, b2)).abs().max().item()
    checks.append(Check("adamix", "max |served adapter - adapter of the mean expert weights|", gap, 0.0))

    built = apply_method(build_model(config, device="cpu", seed=0), SPARSE_ADAPTER)
    trainable = [p for p in built.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    inputs = example_inputs(config)
    for _ in range(steps):  # a loss on the encoder's output: the adapters train, and the vocabulary head is skipped
        built.base_model(**inputs).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    # Pruned entries are not parameters at all (unlike chapter 03's gradient masks, which keep dense tensors): the
    # optimizer's moments hold exactly the closed-form count, and every tensor it holds moved.
    moments = sum(state["exp_avg"].numel() for state in optimizer.state.values())
    checks.append(Check("sparse_adapter", f"AdamW first-moment entries after {steps} steps (closed form: trainable)",
                        moments, SPARSE_ADAPTER.count(config)))
    moved = sum(not torch.equal(p.detach(), b) for p, b in zip(trainable, before, strict=True))
    checks.append(Check("sparse_adapter", "trainable tensors that moved in training", moved, len(trainable)))
    return checks
