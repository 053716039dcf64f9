"""The method registry: the one place a PEFT method joins the project.

A family module (``methods/<family>.py``) defines a method's from-scratch ``apply``, its closed-form
``trainable_params`` and, where HF peft has the method, a ``peft_config`` builder, then calls
:func:`register` once. Everything else (the CLI, the counting tests, the memory model, widgets and
figures) finds methods here, so a new method appears everywhere with no other change.

The contract is the :class:`Method` record: every property that counting, the memory model, parity,
widgets and figures read from a method is one of its typed, documented fields, so no module anywhere tests
a method by its name. A method's section of its family file defines the callables and the record; the
nn.Module layers it builds live in ``methods/layers/`` (imported inside ``apply``), so that the registry
and every closed form load without torch (the command line answers in well under a second).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from survey_utils.errors import SurveyError, closest

if TYPE_CHECKING:  # typing only: importing transformers costs seconds, and the closed forms never need it
    from transformers import PretrainedConfig

HP_TYPES = ("int", "float", "bool", "str", "str_list", "int_list", "targets")


@dataclass(frozen=True)
class HyperParam:
    """One hyper-parameter: peft's field name where peft has the method, a default, and its bounds.

    ``type`` is one of ``int``, ``float``, ``bool``, ``str``, ``str_list``, ``int_list`` or ``targets``
    (a list of module names, or one string taken as a regular expression, as peft's ``target_modules``).
    ``None`` is accepted when ``nullable`` (peft's "use the default for this architecture").
    """

    name: str
    type: str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    def __post_init__(self) -> None:
        if self.type not in HP_TYPES:
            raise ValueError(f"hyper-parameter {self.name}: type '{self.type}' is not one of {HP_TYPES}")

    def parse(self, text: str) -> Any:
        """Parse a command-line value (``--set name=text``); lists are comma-separated."""
        text = text.strip()
        if self.nullable and text.lower() in ("none", "null", ""):
            return None
        try:
            if self.type == "int":
                return int(text)
            if self.type == "float":
                return float(text)
            if self.type == "bool":
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            if self.type == "int_list":
                return [int(part) for part in text.split(",") if part.strip()]
            if self.type == "targets" and text.lower() == "all-linear":
                return text  # peft's keyword (targeting.ALL_LINEAR), not a module name
            if self.type in ("str_list", "targets"):
                return [part.strip() for part in text.split(",") if part.strip()]
            return text
        except ValueError:
            raise SurveyError(f"{self.name}={text!r} is not a valid {self.type.replace('_', ' ')}") from None

    def check(self, value: Any) -> Any:
        """Validate a value (already of Python type); return it normalised."""
        if value is None:
            if self.nullable:
                return None
            raise SurveyError(f"{self.name} must be set")
        if self.type == "int":
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or (isinstance(value, float) and not value.is_integer())):
                raise SurveyError(f"{self.name}={value!r} must be an integer")
            value = int(value)
        elif self.type == "float":
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise SurveyError(f"{self.name}={value!r} must be a finite number")
            value = float(value)
        elif self.type == "bool":
            if not isinstance(value, bool):
                raise SurveyError(f"{self.name}={value!r} must be true or false")
        elif self.type in ("str_list", "targets", "int_list"):
            if isinstance(value, str) and self.type == "targets":
                return value
            if isinstance(value, str | int) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, list | tuple):
                raise SurveyError(f"{self.name}={value!r} must be a list")
            value = list(value)
            kind = int if self.type == "int_list" else str
            if not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
                raise SurveyError(f"{self.name}={value!r} must be a list of {kind.__name__}")
        if self.minimum is not None and isinstance(value, int | float) and value < self.minimum:
            raise SurveyError(f"{self.name}={value} is below its minimum {self.minimum:g}")
        if self.maximum is not None and isinstance(value, int | float) and value > self.maximum:
            raise SurveyError(f"{self.name}={value} is above its maximum {self.maximum:g}")
        if self.choices is not None and value not in self.choices:
            raise SurveyError(f"{self.name}={value!r} is not one of {', '.join(map(str, self.choices))}")
        return value


MASK_INDEX_SUFFIX = "_mask_index"  # buffer beside a masked parameter: its kept flat indices (Method.mask_kept)
NOT_PLACED = "not placed"
BASELINE = "baseline"  # the taxonomy entry of the reference every method is compared with (full fine-tuning)


@dataclass(frozen=True)
class Taxonomy:
    """Where the method sits in each survey: Xu et al. 2023, Wang et al. 2024, Lialin et al. 2023.

    Values follow ``data/catalogue.csv`` (family / sub-group; Lialin's Venn region as ``A``, ``S``,
    ``R`` joined by ``+``); :data:`NOT_PLACED` where that survey's taxonomy does not name the method.
    """

    xu: str
    wang: str
    lialin: str


def saves_nothing(config: PretrainedConfig, batch_size: int, seq_len: int, act_bytes: int, adapter_bytes: int,
                  **hp: Any) -> dict[str, int]:
    """``memory_terms`` of a method whose own modules save no tensor for backward (declared, not forgotten)."""
    return {}


@dataclass(frozen=True)
class Method:
    """A PEFT method, as registered: everything the rest of the package may know about it.

    ``hp`` below is the resolved hyper-parameter dict (defaults filled in, each value checked).
    """

    name: str
    """Registry key, used on the command line and in ``data/catalogue.csv``."""
    title: str
    paper: str
    """Authors, year, title and venue of the paper that introduced the method."""
    arxiv_id: str | None
    taxonomy: Taxonomy
    chapter: str
    """The chapter (notebook stem) that explains the method."""
    hyperparams: tuple[HyperParam, ...]
    apply: Callable[..., Any]
    """``apply(model, **hp) -> model``: add the method's modules in place, freeze every other parameter,
    return the model. New parameters are created on the base weight's device and dtype (never moved with
    ``.to()``), so the same code builds on ``cpu``, on ``meta`` and under ``FakeTensorMode``."""
    trainable_params: Callable[..., int]
    """``trainable_params(config, **hp) -> int``: the exact count, by arithmetic on the config's layout."""
    memory_terms: Callable[..., dict[str, int]]
    """``memory_terms(config, batch_size, seq_len, act_bytes, adapter_bytes, **hp) -> {label: bytes}``: the
    tensors the method's own modules save for backward, summed over the model (``seq_len`` already includes
    :attr:`extra_positions`; ``act_bytes`` is the model dtype's size, ``adapter_bytes`` the trainable
    parameters'). Required: a method that saves nothing says so with :func:`saves_nothing`."""
    peft_config: Callable[..., Any] | None = None
    """``peft_config(config, **hp) -> peft.PeftConfig``: the equivalent HF peft configuration, if peft has
    the method. Its defaults must equal ours (tested on several zoo models)."""
    peft_param_map: Mapping[str, str] = field(default_factory=dict)
    """Our parameter leaf name -> peft's (``{"lora_A": "lora_A.default.weight"}``): how output parity copies
    our values into peft's model. Every method with a ``peft_config`` declares it."""
    peft_variant: Mapping[str, Any] = field(default_factory=dict)
    """Fields of peft's config that select this method among its variants (rsLoRA: ``use_rslora=True``):
    peft's defaults for the method are its config class's defaults updated with these."""
    peft_state_sync: Callable[[Any, Any], int] | None = None
    """``peft_state_sync(ours, theirs) -> tensors copied``: for methods whose modules sit elsewhere than
    peft's (prompt encoders, adaption prompts), copy peft's values of the method's parameters into ours,
    making them non-trivial first where peft starts them at zero. Output parity uses it instead of
    :attr:`peft_param_map`."""
    peft_fixup: Callable[[Any], None] | None = None
    """Called on peft's wrapped model after ``get_peft_model``, to undo an artifact of building it on ``meta``."""
    validate: Callable[..., None] | None = None
    """``validate(config, **hp)``: raise :class:`SurveyError` for values that are wrong for this model."""
    extra_positions: Callable[..., int] | None = None
    """``extra_positions(config, **hp) -> int``: sequence positions the method adds (soft prompts)."""
    key_value_positions: bool = False
    """The extra positions are keys and values only (prefix tuning): queries, MLP and logits keep the
    real length, and gradient checkpointing (which drops ``past_key_values``) is refused."""
    gradient_sites: Callable[..., Any] | None = None
    """``gradient_sites(config, **hp) -> list[ModuleSpec] | "input"``: the modules whose outputs the
    method's trainable branch joins, where its gradients enter the backbone. ``None``: the method's
    ``target_modules`` (with :attr:`default_targets`), else the input for methods that add positions."""
    default_targets: Callable[..., dict[str, list[str]]] | None = None
    """``default_targets(config) -> {hp name: [module names]}``: per-architecture targets used when the
    ``targets`` hyper-parameters are ``None`` (peft's mapping, as for (IA)^3). ``None``: the layout's
    query and value projections."""
    largest_trainable_tensor: Callable[..., int] | None = None
    """``largest_trainable_tensor(config, **hp) -> int``: elements of the biggest trainable tensor (the
    optimizer's temporaries are this big). ``None``: bounded by the whole trainable count."""
    routed_added_params: Callable[..., int] | None = None
    """``routed_added_params(config, **hp) -> int``: of the parameters the method adds, those inside a mixture of
    experts' routed experts, one equal share per expert (LoRA's A and B on fused expert tensors); a token uses the
    shares of its top-k experts only, so :attr:`survey_utils.counting.ParameterCount.active` counts them times
    ``experts_per_token / num_experts``. ``None``: the method adds nothing there."""
    frozen_added_params: Callable[..., int] | None = None
    """``frozen_added_params(config, **hp) -> int``: frozen parameters the method adds (e.g. shared random
    projections stored as parameters)."""
    param_prefixes: tuple[str, ...] = ()
    """Name fragments of the method's own parameters (``lora_``): the ``method`` component when counting."""
    adds_parameters: bool = True
    """False for methods that only unfreeze existing weights (full fine-tuning, BitFit): the model's total
    is unchanged."""
    trains_whole_model: bool = False
    """Every base parameter trains (full fine-tuning): weights, gradients and optimizer states for the whole
    model, every block saves activations, and the base cannot be quantized."""
    mergeable: bool = False
    """The update folds into the base weights after training (no inference cost)."""
    backprop_through_backbone: bool = True
    """False for side networks (LST): gradients never flow through the frozen backbone."""
    base_quantization: str | None = None
    """The storage of the frozen base linears the method itself implies (``"nf4"`` for QLoRA; one of
    ``units.QUANTIZATIONS``): the memory model's ``quantization`` for this method. ``None``: the model's dtype."""
    unfrozen_params: Callable[..., list[tuple[Any, str]]] | None = None
    """``unfrozen_params(config, **hp) -> [(ModuleSpec, parameter name)]``: the base model's own parameters the
    method makes trainable (selective methods: BitFit's biases, LN tuning's norms, partial tuning's blocks), read
    from the layout. Counting splits the trainable count by component with it, and the trained / changed / stored
    measurement of chapter 03 reads it. ``None``: the method trains only parameters it adds (or, with
    :attr:`trains_whole_model`, every parameter)."""
    peft_frozen_copies: Callable[..., int] | None = None
    """``peft_frozen_copies(config, **hp) -> int``: frozen parameters peft's implementation holds that ours does
    not (peft's LN tuning deep-copies every target norm, trains the copy and keeps the original): peft's total is
    our total plus this; its trainable count equals ours."""
    mask_kept: Callable[..., int] | None = None
    """``mask_kept(numel, **hp) -> int``: for a sparse method whose gradient mask lets only some entries of each
    tensor of :attr:`unfrozen_params` train (FISH mask, LT-SFT, Child-tuning), how many of a tensor's ``numel``
    entries the mask keeps, rounded as the method rounds (``int(density * numel)``). Data decide *which* entries
    (Fisher scores, the change a first fine-tuning made, a random draw); never *how many*, so the closed form stays
    exact: trainable = the sum of ``mask_kept`` over the unfrozen tensors, split by their components. A built model
    carries, beside each masked parameter, an int64 buffer ``<name>`` + :data:`MASK_INDEX_SUFFIX` of the kept flat
    indices, and counting takes its length (on ``meta`` too, where the entries are unspecified).
    "Trainable" then means *the entries a step may change*: the masked tensors keep ``requires_grad``, so autograd
    computes their gradients densely and AdamW keeps dense moments for them; the memory model charges gradients
    and optimizer states for every element of :attr:`unfrozen_params` (and 8 bytes per kept index), and weight
    decay must be off for them (decoupled decay would move masked entries). ``None``: no mask, every element of a
    trainable parameter trains."""
    tasks_hp: str | None = None
    """For a multi-task method (chapter 08): the hyper-parameter that says how many tasks (or source modules) its
    parameters serve (``num_tasks`` for MPT, peft's ``n_tasks`` for Polytropon, ``num_sources`` for AdapterFusion):
    widgets grow it to show what each added task costs. ``None``: a single-task method."""
    takes_task_ids: bool = False
    """The forward needs ``task_ids`` (an int64 tensor with one task index per example, passed by keyword to the
    model's forward, as peft's MPT and Polytropon take it); an index outside ``range(hp[tasks_hp])`` is a one-line
    :class:`SurveyError`. Output parity passes them."""
    gradient_free: bool = False
    """The method's numbers are searched without gradients (LoRAHub's evolution strategy): a step of its training
    is a forward pass and a loss under ``torch.no_grad()``. The memory model and the simulation then count no
    saved activations, no gradients and no optimizer states, only the forward's largest transient."""
    composes_trained_sources: bool = False
    """The method combines modules trained beforehand on other tasks and frozen (AdapterFusion's adapters,
    LoRAHub's LoRAs); what it trains alone, over freshly initialised sources, is not the method. Chapter 09's lab,
    which trains one task from scratch, leaves these out and says why."""
    parts: tuple[Any, ...] = ()
    """For a hybrid built by :func:`survey_utils.methods.composition.compose`: its parts (each a registered
    method with the recipe's settings); empty for a method of its own."""
    part_hyperparams: Callable[..., dict[str, dict[str, Any]]] | None = None
    """For a hybrid (:attr:`parts` not empty): ``part_hyperparams(config, **hp) -> {part label: its resolved
    hyper-parameters}``, the settings each part is applied with on ``config``, after the hybrid's own rewrites (S4's
    groups become its parts' layers). Set by ``compose``; whoever needs a hybrid's parts at their settings (its
    tests, chapter 05's design search) reads this field, never a table keyed by the method's name."""
    notes: str = ""

    @property
    def is_baseline(self) -> bool:
        """The reference point of all three surveys (full fine-tuning): not itself a PEFT method."""
        return self.taxonomy.xu == BASELINE

    @property
    def family(self) -> str:
        """The file of ``survey_utils.methods`` that defines the method."""
        return self.apply.__module__.rsplit(".", 1)[-1]

    def hyperparam(self, name: str) -> HyperParam:
        for hp in self.hyperparams:
            if hp.name == name:
                return hp
        raise SurveyError(
            f"method '{self.name}' has no hyper-parameter '{name}'; it has: "
            f"{closest(name, [h.name for h in self.hyperparams])}"
        )

    def trainable_dtype(self, dtype: str, adapter_dtype: str | None) -> str:
        """The dtype of the parameters that train: ``adapter_dtype`` applies to parameters the method adds
        (as peft's ``autocast_adapter_dtype``); base weights that train stay in the model's ``dtype``."""
        if self.trains_whole_model or not self.adds_parameters:
            return dtype
        return adapter_dtype or dtype

    def sites(self, config: PretrainedConfig, **hp: Any) -> list[Any] | str | None:
        """Where the method's gradients enter the backbone (``hp`` resolved): :attr:`gradient_sites` if
        declared, else its ``target_modules`` (with :attr:`default_targets`), else ``"input"`` for methods
        that add positions; ``None`` when nothing says (the memory model then assumes the input)."""
        from survey_utils.methods.common import target_specs

        if self.gradient_sites is not None:
            return self.gradient_sites(config, **hp)
        if "target_modules" in hp:
            values = dict(hp)
            if values.get("target_modules") is None and self.default_targets is not None:
                values.update(self.default_targets(config))
            return target_specs(config, self.title, values)
        if self.extra_positions is not None:
            return "input"
        return None

    def defaults(self) -> dict[str, Any]:
        return {hp.name: hp.default for hp in self.hyperparams}

    def resolve(self, config: PretrainedConfig | None = None, **overrides: Any) -> dict[str, Any]:
        """Defaults updated with ``overrides``, each checked; then the method's own checks for ``config``."""
        values = self.defaults()
        for name, value in overrides.items():
            hp = self.hyperparam(name)
            values[name] = hp.parse(value) if isinstance(value, str) and hp.type not in ("str", "targets") else value
        resolved = {hp.name: hp.check(values[hp.name]) for hp in self.hyperparams}
        if config is not None and self.validate is not None:
            self.validate(config, **resolved)
        return resolved

    def parse_settings(self, settings: Sequence[str]) -> dict[str, Any]:
        """Turn ``["r=8", "target_modules=q_proj,v_proj"]`` into typed overrides."""
        overrides: dict[str, Any] = {}
        for item in settings:
            if "=" not in item:
                raise SurveyError(f"--set {item!r} must look like name=value")
            name, text = item.split("=", 1)
            overrides[name.strip()] = self.hyperparam(name.strip()).parse(text)
        return overrides

    def count(self, config: PretrainedConfig, **overrides: Any) -> int:
        """Closed-form trainable parameters for ``config`` with these hyper-parameters."""
        return self.trainable_params(config, **self.resolve(config, **overrides))

    def added_params(self, config: PretrainedConfig, **hp: Any) -> int:
        """Parameters the method adds to the model (``hp`` resolved): the closed form of total - base."""
        if not self.adds_parameters:
            return 0
        frozen = self.frozen_added_params(config, **hp) if self.frozen_added_params else 0
        return self.trainable_params(config, **hp) + frozen


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry; every lookup (CLI, tests, widgets, figures) then finds it."""
    if method.name in _REGISTRY:
        raise ValueError(f"method '{method.name}' is registered twice")
    names = [hp.name for hp in method.hyperparams]
    if len(set(names)) != len(names):
        raise ValueError(f"method '{method.name}' repeats a hyper-parameter name: {names}")
    for hp in method.hyperparams:
        hp.check(hp.default)
    if not method.paper:
        raise ValueError(f"method '{method.name}' must cite its paper")
    if method.peft_config is not None and not (method.peft_param_map or method.peft_state_sync):
        raise ValueError(f"method '{method.name}' has a peft_config but neither a peft_param_map nor a "
                         "peft_state_sync for output parity")
    if method.tasks_hp is not None and method.tasks_hp not in names:
        raise ValueError(f"method '{method.name}': tasks_hp '{method.tasks_hp}' is not one of its hyper-parameters")
    if method.takes_task_ids and method.tasks_hp is None:
        raise ValueError(f"method '{method.name}' takes task_ids but names no tasks_hp")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    _load_families()
    if name not in _REGISTRY:
        raise SurveyError(f"unknown method '{name}'; choose one of: {closest(name, list(_REGISTRY))}")
    return _REGISTRY[name]


def list_methods(family: str | None = None) -> list[Method]:
    """Registered methods in registration order, optionally of one family file."""
    _load_families()
    return [m for m in _REGISTRY.values() if family is None or m.family == family]


def _load_families() -> None:
    import survey_utils.methods  # noqa: F401 - importing the package registers every family
