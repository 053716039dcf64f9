r"""Activation recipes read off an architecture's own code, for every model type without a hand recipe (chapter 00).

The hand recipes of :mod:`survey_utils.memory.activations` were written from the tensors torch saves in transformers'
code. Any other model type the generic layout handles gets its recipe the same way, automatically: the model's own
forward runs on fake tensors (shapes, no storage) under ``torch.autograd.graph.saved_tensors_hooks``, and every
tensor autograd saves is written down. Nothing is fitted to a published number. How:

1. **A shorter copy.** The config keeps its first :math:`N` blocks, the shortest prefix that holds a block of every
   kind the full model has (a block's kind: its modules' names and shapes in the layout, and its ``layer_types``
   entry) and at least two blocks. DeepSeek-V3's 61 blocks become five: three dense, two MoE.
2. **Two passes per shape**, in the step's dtype and attention, in train mode (dropout active):
   *frozen*: no parameter trains, but the embeddings' output requires a gradient, so each block saves what an
   activation gradient needs (what a PEFT method's blocks save); *full*: every parameter trains, so the linears also
   save their inputs for the weights' gradients (:data:`~survey_utils.memory.activations.LINEAR_INPUTS`, counted
   only for full fine-tuning). Labels are not passed: the loss's tensors are the closed form's
   :math:`\Delta_\text{loss}`.
3. **Each storage once**, where it is first saved: the embeddings (before the first block), a block, or outside the
   blocks after them. Parameters and the batch are not activations. A storage saved by two blocks or more (the
   rotary table, a mask) is one shared copy. Inside a block a tensor's *stage* is the latest stage among the block's
   layout modules that have begun (:attr:`ModuleSpec.stage`), a hair after it: where gradients start inside a block,
   what was saved before the trainable module is dropped, as in the hand recipes.
4. **Exact scaling.** A saved storage's bytes are :math:`c\,b^i s^j` (:math:`i \le 1`, :math:`j \le 3`) in batch
   :math:`b` and sequence :math:`s`. Passes at :math:`(b, s) = (2, 7)` and :math:`(3, 11)` identify :math:`(i, j)`
   by the ratio of the two sizes (the eight possible ratios :math:`1.5^i (11/7)^j` are distinct) and :math:`c` as an
   integer that both sizes must agree on; a storage of any other form (or passes that save different tensors) is
   refused in one line. Each block of the full model takes the recipe of the prefix's last block of its kind.

The passes run CPU kernels (fake CPU tensors, as :mod:`survey_utils.memory.simulation` does): on CUDA, SDPA with
attention dropout and nn.LayerNorm's statistics save a little less (the note says so). A recipe is cached per config
content, dtype and attention; a zoo snapshot stores its model's recipes (:mod:`survey_utils.snapshots`), so asking
for a zoo model's memory imports no torch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import ATTN_CORE, ATTN_NORM, INPUT, Layout, layout
from survey_utils.errors import SurveyError
from survey_utils.memory.activations import LINEAR_INPUTS, Ctx, Recipe, Saved

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig

# The two shapes of the passes (batch, sequence): coprime, small, and far from any width a model uses.
SHAPES = ((2, 7), (3, 11))
MAX_BATCH_POWER, MAX_SEQ_POWER = 1, 3
_AFTER = 0.01  # a saved tensor's stage: a hair after the latest module of its block that began
_LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
NOTE = ("activations derived from the model's own code: one forward on fake CPU tensors under saved_tensors_hooks "
        "per pass (frozen and fully trainable, two shapes), scaled exactly in batch and sequence "
        "(survey_utils.memory.derived)")
CUDA_NOTE = ("CUDA kernels stood in for the CPU ones in the passes: SDPA saves q, k, v, its output, the fp32 "
             "log-sum-exp and any explicit mask (flash / memory-efficient kernels, no s^2 term); dropout keeps a 1-byte "
             "mask; LayerNorm keeps fp32 statistics")
CPU_NOTE = ("CPU kernels, as the simulation runs them: SDPA takes its math path (fp32 softmax per head, s^2) where "
            "the model passes an explicit mask or attention dropout")


@dataclass(frozen=True)
class Term:
    """Saved bytes :math:`\\sum c\\, b^i s^j` of one kind at one stage: ``monomials`` holds ``(c, i, j)``."""

    term: str
    stage: float
    full_only: bool
    monomials: tuple[tuple[int, int, int], ...]

    def nbytes(self, b: int, s: int) -> int:
        return sum(c * b**i * s**j for c, i, j in self.monomials)

    def as_json(self) -> list[Any]:
        return [self.term, _stage_json(self.stage), self.full_only, [list(m) for m in self.monomials]]

    @staticmethod
    def from_json(item: list[Any]) -> Term:
        term, stage, full_only, monomials = item
        return Term(term, -math.inf if stage is None else float(stage), bool(full_only),
                    tuple(tuple(int(v) for v in m) for m in monomials))


@dataclass(frozen=True)
class DerivedRecipe:
    """One model's saved tensors per pass, as polynomials in batch and sequence: per block of the full model (in
    layout order, runs of equal blocks grouped as ``(count, terms)``), before the blocks, after them, and shared."""

    stacks: tuple[tuple[int, tuple[Term, ...]], ...]
    embeddings: tuple[Term, ...]
    head: tuple[Term, ...]
    shared: tuple[Term, ...]

    def recipe(self, c: Ctx) -> Recipe:
        """The :class:`Recipe` at the context's batch and sequence."""
        if c.s_kv != c.s:
            raise SurveyError(f"{c.shape.family}: its recipe is derived from passes without extra key/value positions; "
                              "prefix methods need a hand recipe")
        c.note(NOTE)
        c.note(CUDA_NOTE if c.device == "cuda" else CPU_NOTE)

        def saved(terms: tuple[Term, ...]) -> list[Saved]:
            return [Saved(t.term, t.nbytes(c.b, c.s), t.stage, t.full_only) for t in terms]

        return Recipe([(count, saved(terms)) for count, terms in self.stacks], saved(self.embeddings),
                      saved(self.head), saved(self.shared))

    def as_json(self) -> dict[str, Any]:
        def terms(items: tuple[Term, ...]) -> list[Any]:
            return [t.as_json() for t in items]

        return {"stacks": [[count, terms(block)] for count, block in self.stacks], "embeddings": terms(self.embeddings),
                "head": terms(self.head), "shared": terms(self.shared)}

    @staticmethod
    def from_json(data: dict[str, Any]) -> DerivedRecipe:
        def terms(items: list[Any]) -> tuple[Term, ...]:
            return tuple(Term.from_json(t) for t in items)

        return DerivedRecipe(tuple((int(count), terms(block)) for count, block in data["stacks"]),
                             terms(data["embeddings"]), terms(data["head"]), terms(data["shared"]))


def _stage_json(stage: float) -> float | None:
    return None if stage == -math.inf else stage


# ------------------------------------------------------------------------------------------ the cache
_CACHE: dict[tuple[str, str, str, str], DerivedRecipe] = {}


def derived_recipe(config: PretrainedConfig, dtype: str, attention: str, device: str) -> DerivedRecipe:
    """The recipe of ``config`` in ``dtype`` (``bf16`` or ``fp32``: the activations' bytes) with ``attention``
    (resolved) for ``device``'s kernels: derived by fake-tensor passes (a few seconds for a large MoE), cached per
    config content."""
    from survey_utils.snapshots import stored_recipe

    stored = stored_recipe(config, dtype, attention, device)
    if stored is not None:
        return stored
    key = (config.to_json_string(use_diff=False), dtype, attention, device)
    if key not in _CACHE:
        if len(_CACHE) >= 64:
            _CACHE.clear()
        _CACHE[key] = derive(config, dtype, attention, device)
    return _CACHE[key]


# ------------------------------------------------------------------------------------------ the passes
@dataclass
class _Record:
    """What one pass saw: each storage's first save (region, stage, term) and its bytes, in order."""

    first: dict[Any, tuple[Any, float, str]]  # storage key -> (region, stage, term)
    nbytes: dict[Any, int]
    blocks_saving: dict[Any, set[int]]  # storage key -> the blocks that saved it


def derive(config: PretrainedConfig, dtype: str, attention: str, device: str = "cpu") -> DerivedRecipe:
    """Derive the recipe (see the module docstring): four fake-tensor forwards of a shortened copy, with ``device``'s
    kernels (:func:`_device_kernels`)."""
    full_shape = layout(config)
    kinds = block_kinds(config, full_shape)
    prefix = _prefix_length(kinds)
    short = shortened(config, full_shape, prefix)
    passes: dict[tuple[bool, int], _Record] = {}
    for trainable in (False, True):
        for which, (b, s) in enumerate(SHAPES):
            passes[trainable, which] = _run(short, full_shape, dtype, attention, b, s, trainable, device)
    frozen = _polynomials(passes[False, 0], passes[False, 1], config)
    full = _polynomials(passes[True, 0], passes[True, 1], config)
    return _assemble(frozen, full, kinds, prefix)


def block_kinds(config: PretrainedConfig, shape: Layout) -> list[tuple[Any, ...]]:
    """Each block's kind: its modules (name inside the block, kind, parameter shapes) and its ``layer_types``
    entry. Blocks of one kind run the same code on the same shapes, so they save the same tensors."""
    by_block: dict[int, list[tuple[Any, ...]]] = {i: [] for i in range(shape.num_layers)}
    for spec in shape.modules:
        if spec.layer is not None:
            inside = spec.name.split(".")
            position = next(k for k in range(len(inside) - 1, -1, -1) if inside[k].isdigit())
            by_block[spec.layer].append((".".join(inside[position + 1:]), spec.kind, spec.params, spec.shapes))
    types = getattr(config, "layer_types", None)
    types = list(types) if isinstance(types, list | tuple) and len(types) == shape.num_layers else [None] * len(by_block)
    return [(tuple(sorted(by_block[i])), types[i]) for i in range(shape.num_layers)]


def _prefix_length(kinds: list[tuple[Any, ...]]) -> int:
    """The shortest prefix holding every kind of block, and at least two blocks (shared storages show there)."""
    wanted, seen = set(kinds), set()
    for n, kind in enumerate(kinds, start=1):
        seen.add(kind)
        if seen == wanted and n >= min(2, len(kinds)):
            return n
    return len(kinds)


def shortened(config: PretrainedConfig, shape: Layout, blocks: int) -> PretrainedConfig:
    """A transformers config of the first ``blocks`` blocks (per-layer lists cut to match); the full config when
    its depth is not one field (encoder-decoders) or already ``blocks``."""
    from survey_utils.zoo import to_transformers_config

    real = copy.deepcopy(to_transformers_config(config))
    if shape.is_encoder_decoder or blocks >= shape.num_layers:
        return real
    field = next((f for f in _LAYER_FIELDS if getattr(real, f, None) == shape.num_layers), None)
    if field is None:
        return real
    setattr(real, field, blocks)
    for name, value in list(vars(real).items()):
        if isinstance(value, list) and len(value) == shape.num_layers:
            setattr(real, name, value[:blocks])
    return real


def _run(config: PretrainedConfig, full_shape: Layout, dtype: str, attention: str, b: int, s: int,
         trainable: bool, device: str = "cpu") -> _Record:
    """One forward on fake tensors, recording every saved storage's first save and the blocks that saved it."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.multiprocessing.reductions import StorageWeakRef

    from survey_utils.memory.simulation import _quiet
    from survey_utils.units import torch_dtype
    from survey_utils.zoo import build_model, supports_sdpa

    config = copy.deepcopy(config)
    config._attn_implementation = attention if supports_sdpa(config) else "eager"
    if hasattr(config, "use_cache"):
        config.use_cache = False
    stages = {spec.name: spec.stage for spec in full_shape.modules if spec.layer is not None}
    record = _Record({}, {}, {})
    with _quiet(), FakeTensorMode():
        try:
            # No random init (the values change no saved tensor's size; initialising a vision tower on fake tensors
            # takes minutes), and a scalar read by a constructor answers 1.
            from transformers.initialization import no_init_weights

            with _scalars(), no_init_weights():
                model = build_model(config, device="cpu", dtype=torch_dtype(dtype)).train()
                if hasattr(model, "tie_weights"):  # init_weights ties them (T5's encoder and decoder embeddings)
                    model.tie_weights()
        except Exception as error:  # noqa: BLE001 - a model's constructor fails in many ways
            raise SurveyError(_cannot(config, f"transformers cannot build it on fake tensors: {_first_line(error)}")
                              ) from None
        for param in model.parameters():
            param.requires_grad_(trainable)
        ids = torch.randint(0, max(int(getattr(config, "vocab_size", 2) or 2), 2), (b, s))
        batch = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            batch["decoder_input_ids"] = ids
        excluded = {StorageWeakRef(t.untyped_storage()) for t in [*model.parameters(), *model.buffers(), ids]}
        tracker = _Tracker(model, stages)
        hooks = tracker.install(trainable)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = StorageWeakRef(tensor.untyped_storage())
            if key in excluded:
                return tensor
            region, stage, term = tracker.where()
            if key not in record.first:
                record.first[key] = (region, stage, term)
                record.nbytes[key] = tensor.untyped_storage().nbytes()
            if isinstance(region, int):
                record.blocks_saving.setdefault(key, set()).add(region)
            return tensor

        try:
            with _scalars(), _device_kernels(device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                output = model(**batch)
        except SurveyError:
            raise
        except Exception as error:  # noqa: BLE001 - a forward fails on fake tensors in many ways
            raise SurveyError(_cannot(config, f"its forward fails on fake tensors: {_first_line(error)}")) from None
        finally:
            for hook in hooks:
                hook.remove()
        del output
    return record


@contextmanager
def _device_kernels(device: str) -> Iterator[None]:
    """On ``cuda``, SDPA and dropout save what CUDA's kernels save (the passes run CPU kernels otherwise).

    - SDPA: the flash and memory-efficient kernels keep q, k, v, the output, an fp32 log-sum-exp
      (batch x heads x queries) and the explicit mask when there is one (PyTorch's ``_efficient_attention_forward``);
      CPU's math path, taken with a mask or dropout, keeps the fp32 softmax instead.
    - Dropout: ``native_dropout`` on CUDA keeps a bool mask; CPU keeps its noise in the activation dtype.
    - LayerNorm: CUDA's ``native_layer_norm`` keeps its input and fp32 mean and reciprocal standard deviation per row;
      CPU keeps the statistics in the activation dtype.
    """
    if device != "cuda":
        yield
        return
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own alias

    original_sdpa, original_dropout, original_norm = F.scaled_dot_product_attention, F.dropout, F.layer_norm

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, query: Any, key: Any, value: Any, mask: Any, kwargs: dict[str, Any]) -> Any:
            with torch.no_grad():
                out = original_sdpa(query, key, value, attn_mask=mask, **kwargs)
            lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(query, key, value, out, lse, *([mask] if mask is not None else []))
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:  # never run: the passes record the forward only
            raise NotImplementedError

    class MaskedDropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, p: float) -> Any:
            ctx.save_for_backward(torch.empty_like(x, dtype=torch.bool))
            return x * (1 / (1 - p))

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            raise NotImplementedError

    class FusedLayerNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, bias: Any, shape: Any, eps: float) -> Any:
            with torch.no_grad():
                out = original_norm(x, shape, weight, bias, eps)
            rows = x.shape[: x.dim() - len(shape)] + (1,) * len(shape)
            stats = [x.new_empty(rows, dtype=torch.float32) for _ in range(2)]
            ctx.save_for_backward(x, *stats)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            raise NotImplementedError

    def layer_norm(x: Any, normalized_shape: Any, weight: Any = None, bias: Any = None, eps: float = 1e-5) -> Any:
        return FusedLayerNorm.apply(x, weight, bias, tuple(normalized_shape), eps)

    def sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("dropout_p", None)  # CUDA's fused kernels draw the dropout inside (philox seeds, no tensor)
        return FusedAttention.apply(query, key, value, attn_mask, kwargs)

    def dropout(x: Any, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0:
            return x
        return MaskedDropout.apply(x, p)

    F.scaled_dot_product_attention, F.dropout, F.layer_norm = sdpa, dropout, layer_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.dropout, F.layer_norm = original_sdpa, original_dropout, original_norm


@contextmanager
def _scalars() -> Iterator[None]:
    """``.item()`` of a fake tensor answers 1, as :class:`survey_utils.memory.simulation.PeakTracker` answers it:
    some constructors and forwards read a scalar (a mask's maximum, an embedding scale), which changes no saved
    tensor's size."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Scalars(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten._local_scalar_dense.default:
                return 1 if not args[0].dtype.is_floating_point else 1.0
            return func(*args, **(kwargs or {}))

    with Scalars():
        yield


class _Tracker:
    """Where the forward is: before, in or after the blocks, the block's latest stage, the innermost module."""

    def __init__(self, model: nn.Module, stages: dict[str, float]) -> None:
        self.model, self.stages = model, stages
        self.region: Any = "embeddings"
        self.stage = INPUT
        self.stack: list[tuple[str, nn.Module]] = []

    def install(self, trainable: bool) -> list[Any]:
        from survey_utils.generic_layout import _BLOCK_LISTS

        hooks = []
        blocks: list[str] = []  # the outermost modules named <list>.<index>, in the layout's order (encoder first)
        for name, _ in self.model.named_modules():
            segments = name.split(".")
            nested = any(name.startswith(f"{outer}.") for outer in blocks)
            if len(segments) >= 2 and segments[-1].isdigit() and segments[-2] in _BLOCK_LISTS and not nested:
                blocks.append(name)
        modules = dict(self.model.named_modules())
        index = {id(modules[name]): i for i, name in enumerate(blocks)}
        for name, module in self.model.named_modules():
            hooks.append(module.register_forward_pre_hook(self._enter(name, index.get(id(module)))))
            hooks.append(module.register_forward_hook(self._leave(index.get(id(module)))))
        if not trainable:  # the embeddings' output requires a gradient: every block saves what a PEFT block saves
            # every module holding the input embedding's weight (T5's encoder and decoder hold their own module)
            weight = self.model.get_input_embeddings().weight
            for module in self.model.modules():
                if getattr(module, "weight", None) is weight:
                    hooks.append(module.register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
        return hooks

    def _enter(self, name: str, block: int | None) -> Any:
        def hook(module: nn.Module, _args: Any) -> None:
            if block is not None:
                self.region, self.stage = block, INPUT
            stage = self.stages.get(name, INPUT)
            if stage != INPUT and isinstance(self.region, int):
                self.stage = max(self.stage, stage)
            self.stack.append((name, module))
        return hook

    def _leave(self, block: int | None) -> Any:
        def hook(_module: nn.Module, _args: Any, _out: Any) -> None:
            self.stack.pop()
            if block is not None:
                self.region, self.stage = "after", INPUT
        return hook

    def where(self) -> tuple[Any, float, str]:
        name, module = self.stack[-1] if self.stack else ("", None)
        if not isinstance(self.region, int):
            stage = INPUT
        else:  # before the block's first staged module: with its norm, which the attention's input follows
            stage = ATTN_NORM if self.stage == INPUT else self.stage + _AFTER
        return self.region, stage, _term(name, module)


def _term(name: str, module: Any) -> str:
    """A label for a saved tensor, from the innermost module that saved it."""
    from survey_utils.generic_layout import _ATTENTION_SEGMENTS, _MLP_SEGMENTS

    kind = type(module).__name__.lower() if module is not None else ""
    if "norm" in kind:
        return "norms"
    if "dropout" in kind:
        return "dropout"
    segments = name.split(".")
    if any(_ATTENTION_SEGMENTS.search(s) for s in segments):
        return "attention"
    if any(_MLP_SEGMENTS.search(s) for s in segments):
        return "mlp"
    return "block (other)"


# ------------------------------------------------------------------------------------------ the scaling
Poly = dict[tuple[Any, float, str], dict[tuple[int, int], int]]  # (region, stage, term) -> {(i, j): c}


def _polynomials(small: _Record, large: _Record, config: PretrainedConfig) -> Poly:
    """Pair the two shapes' storages in order of first save and identify each one's monomial."""
    out: Poly = {}
    pairs_small, pairs_large = _ordered(small), _ordered(large)
    if [p[0] for p in pairs_small] != [p[0] for p in pairs_large]:
        raise SurveyError(_cannot(config, "its forward saves different tensors at different batch and sequence "
                                          "sizes"))
    (b1, s1), (b2, s2) = SHAPES
    for (place, n1), (_, n2) in zip(pairs_small, pairs_large, strict=True):
        fit = next(((i, j, n1 // (b1**i * s1**j)) for i in range(MAX_BATCH_POWER + 1) for j in range(MAX_SEQ_POWER + 1)
                    if n1 % (b1**i * s1**j) == 0 and n1 // (b1**i * s1**j) * b2**i * s2**j == n2), None)
        if fit is None:
            raise SurveyError(_cannot(config, f"a saved tensor of {n1} then {n2} bytes is not c x b^i x s^j"))
        i, j, c = fit
        poly = out.setdefault(place, {})
        poly[i, j] = poly.get((i, j), 0) + c
    return out


def _ordered(record: _Record) -> list[tuple[tuple[Any, float, str], int]]:
    """Each storage's (place, bytes) in order of first save; a storage saved by two blocks or more is shared."""
    items = []
    for key, (region, stage, term) in record.first.items():
        if len(record.blocks_saving.get(key, ())) > 1:
            region, term = "shared", "outside blocks (shared: rotary tables, masks)"
        items.append(((region, stage, term), record.nbytes[key]))
    return items


def _assemble(frozen: Poly, full: Poly, kinds: list[tuple[Any, ...]], prefix: int) -> DerivedRecipe:
    """Terms per block of the full model (its kind's last block in the prefix), outside the blocks and shared; what
    the full pass saves beyond the frozen one is the trainable linears' inputs."""

    def terms(region: Any) -> list[Term]:
        return [Term(term, stage, False, _monomials(poly)) for (r, stage, term), poly in frozen.items() if r == region]

    def extra(region: Any, stage: float, label: str) -> list[Term]:
        more: dict[tuple[int, int], int] = {}
        for source, sign in ((full, 1), (frozen, -1)):
            for (r, _stage, _term), poly in source.items():
                if r == region:
                    for key, c in poly.items():
                        more[key] = more.get(key, 0) + sign * c
        monomials = _monomials({k: v for k, v in more.items() if v})
        return [Term(label, stage, True, monomials)] if monomials else []

    source_block = {kind: i for i, kind in enumerate(kinds[:prefix])}
    blocks = [tuple(terms(source_block[kind]) + extra(source_block[kind], INPUT, LINEAR_INPUTS)) for kind in kinds]
    stacks: list[tuple[int, tuple[Term, ...]]] = []
    for block in blocks:
        if stacks and stacks[-1][1] == block:
            stacks[-1] = (stacks[-1][0] + 1, block)
        else:
            stacks.append((1, block))
    embeddings = [Term("outside blocks (embeddings)", INPUT, False, t.monomials) for t in terms("embeddings")]
    head = [Term("outside blocks (final norm, head)", INPUT, False, t.monomials) for t in terms("after")]
    shared = [Term(t.term, max(t.stage, ATTN_CORE) if t.stage != INPUT else ATTN_CORE, False, t.monomials)
              for t in terms("shared")]
    return DerivedRecipe(tuple(stacks), tuple(embeddings + extra("embeddings", INPUT, LINEAR_INPUTS)),
                         tuple(head + extra("after", INPUT, LINEAR_INPUTS)),
                         tuple(shared + extra("shared", ATTN_CORE, LINEAR_INPUTS)))


def _monomials(poly: dict[tuple[int, int], int]) -> tuple[tuple[int, int, int], ...]:
    return tuple((c, i, j) for (i, j), c in sorted(poly.items()))


def _cannot(config: Any, why: str) -> str:
    return (f"the memory model cannot derive the activations of model type '{config.model_type}' from its code: {why} "
            f"(parameter counts are exact)")


def _first_line(error: BaseException) -> str:
    return (" ".join(str(error).split()) or type(error).__name__)[:200]

