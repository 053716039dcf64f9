"""The model zoo: Hugging Face configs in ``data/models/``, read without torch and built without weights.

Reading a config is cheap: for the families with a hand-written layout in :mod:`survey_utils.architecture`,
:func:`load_config` returns a :class:`LightConfig`, the same values transformers' config class would hold
(its defaults, aliases and derived fields, taken from ``config_defaults.json``, which
:func:`write_config_defaults` generates from the installed transformers), without importing torch or
transformers. That is what lets closed-form counts and memory estimates answer in well under a second.
Building a model needs the real thing: :func:`to_transformers_config` (or ``load_config(..., full=True)``)
gives transformers' ``PretrainedConfig``, and :func:`build_model` uses it. Families without a hand layout
get the real ``PretrainedConfig``, except the zoo's own configs of those families, whose resolved values
:mod:`survey_utils.snapshots` stores (a light config again, with the stored layout).

Small models are built with random weights on the CPU; big ones on torch's ``meta`` device, where a 70B
model costs no memory. The model class comes from the config's ``architectures`` field. Anywhere a zoo
name is accepted, a path to any HF ``config.json`` is accepted too. Chapter 00 explains the zoo.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from survey_utils.errors import SurveyError, closest

if TYPE_CHECKING:  # typing only: importing torch and transformers costs seconds
    from typing import TypeAlias

    import torch
    from transformers import PretrainedConfig, PreTrainedModel

    Config: TypeAlias = "LightConfig | PretrainedConfig"

DATA_DIR = Path(os.environ.get("SURVEY_DATA_DIR", Path(__file__).resolve().parent.parent / "data"))
MODELS_DIR = DATA_DIR / "models"
CONFIG_DEFAULTS = Path(__file__).resolve().parent / "config_defaults.json"
CONFIG_DEFAULTS_COMMAND = "python -m survey_utils.zoo"

# Models up to this many parameters get real (random) tensors by default; larger ones live on `meta`.
REAL_TENSOR_LIMIT = 200_000_000


# ----------------------------------------------------------------------------------------------- names


def list_models() -> list[str]:
    """Names of the zoo's models, ordered by family then size."""
    names = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
    return sorted(names, key=_zoo_order)


def _zoo_order(name: str) -> tuple[int, float, str]:
    families = ["tiny", "gpt2", "bert", "roberta", "t5", "opt", "bloom", "llama", "mistral", "qwen"]
    family = next((i for i, f in enumerate(families) if name.startswith(f)), len(families))
    try:  # the recorded count where sources.csv has one: ordering never builds a generic-layout model
        size = float(_recorded_totals().get(name) or total_params_from_name(name))
    except Exception:  # noqa: BLE001 - ordering must never fail because of one bad file
        size = float("inf")
    return family, size, name


@lru_cache(maxsize=1)
def _recorded_totals() -> dict[str, int]:
    import csv

    sources = MODELS_DIR / "sources.csv"
    if not sources.is_file():
        return {}
    with sources.open(encoding="utf-8") as handle:
        return {row["name"]: int(row["counted_total"]) for row in csv.DictReader(handle)
                if (row.get("counted_total") or "").isdigit()}


def zoo_row(name: str) -> dict[str, Any]:
    """One line of ``python -m survey_utils models``, without importing torch: families with a hand layout are
    counted from it; other families read their config.json and the exact total ``sources.csv`` records for them
    (tests/test_generic_layout.py checks it against the meta build), so listing never builds a model."""
    from survey_utils.architecture import _BUILDERS, layout

    raw = _read_json(config_path(name))
    model_type = str(raw.get("model_type"))
    architecture = (raw.get("architectures") or [model_type])[0]
    if model_type in _BUILDERS:
        shape = layout(load_config(name))
        return {"name": name, "model_type": model_type, "architecture": architecture, "total": shape.total,
                "layers": shape.num_layers, "hidden": shape.hidden_size}
    text = raw.get("text_config") or raw
    layers = text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers")
    if model_type in ("t5", "mt5", "umt5") or raw.get("is_encoder_decoder"):
        layers = (text.get("num_layers") or 0) + (text.get("num_decoder_layers") or text.get("num_layers") or 0)
    hidden = text.get("hidden_size") or text.get("d_model") or text.get("n_embd")
    return {"name": name, "model_type": model_type, "architecture": architecture,
            "total": _recorded_totals().get(name), "layers": layers, "hidden": hidden}


def total_params_from_name(name: str) -> int:
    from survey_utils.architecture import total_params

    return total_params(load_config(name))


def config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Resolve a zoo name or a path to a ``config.json`` file."""
    text = str(name_or_path)
    candidate = Path(text)
    if text.endswith(".json") or candidate.is_file() or os.sep in text:
        if not candidate.is_file():
            raise SurveyError(f"config file '{text}' does not exist")
        return candidate
    path = MODELS_DIR / f"{text}.json"
    if not path.is_file():
        raise SurveyError(
            f"unknown model '{text}'; choose one of: {closest(text, list_models())} (or pass a path to a config.json)"
        )
    return path


# ----------------------------------------------------------------------------------------------- loading


def load_config(model: str | os.PathLike[str] | Config, full: bool = False) -> Config:
    """The config of a zoo name or a ``config.json`` path; a config passed in is passed through.

    A family with a hand-written layout gives a read-only :class:`LightConfig` (no torch import); with
    ``full=True``, or for any other family, the answer is transformers' ``PretrainedConfig`` (unless the
    config matches a stored snapshot: :mod:`survey_utils.snapshots`).
    """
    if isinstance(model, LightConfig):
        return to_transformers_config(model) if full else model
    if _is_transformers_config(model):
        return model
    config = _load_cached(str(config_path(model)), str(model))
    return to_transformers_config(config) if full else config


def read_only(config: Config) -> bool:
    """Whether ``config`` is the zoo cache's shared copy, which no one can change (caches may key it by identity)."""
    return isinstance(config, LightConfig) and config._frozen


def to_transformers_config(config: Config) -> PretrainedConfig:
    """transformers' ``PretrainedConfig`` for ``config`` (built from the same config.json, plus any attribute
    set on a copy of a :class:`LightConfig`); a ``PretrainedConfig`` is returned unchanged."""
    if not isinstance(config, LightConfig):
        return config
    if config._full is not None:
        return config._full
    full = _transformers_config(config._raw, config.model_type, config._path)
    full.name_or_path = config.name_or_path
    for name, value in config._changes.items():
        setattr(full, name, copy.deepcopy(value))
    if config._frozen:  # the zoo's shared, read-only config keeps its one full config, as load_config did
        object.__setattr__(config, "_full", full)
    return full


def _is_transformers_config(model: object) -> bool:
    # Only an already-imported transformers can have made one; never import it just to ask.
    module = sys.modules.get("transformers.configuration_utils")
    return module is not None and isinstance(model, module.PreTrainedConfig)


@lru_cache(maxsize=256)
def _load_cached(path: str, label: str) -> Config:
    raw = _read_json(Path(path))
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise SurveyError(f"config file '{path}' has no 'model_type' field")
    if not raw.get("architectures"):
        raise SurveyError(f"config file '{path}' has no 'architectures' field naming the model class")
    defaults = config_defaults()
    if model_type in defaults["types"] and not _NEEDS_TRANSFORMERS.intersection(raw):
        return _light_config(raw, model_type, label, path)
    from survey_utils.snapshots import find_snapshot

    snapshot = find_snapshot(raw, model_type)
    if snapshot is not None:  # a zoo config of another family, resolved and stored by survey_utils.snapshots
        return _snapshot_config(snapshot, raw, model_type, label, path)
    if model_type not in defaults["model_types"]:  # answer without importing transformers to find out
        raise SurveyError(f"config file '{path}' is not a valid '{model_type}' config: transformers "
                          f"{defaults['transformers_version']} has no model type '{model_type}'")
    config = _transformers_config(raw, model_type, path)
    config.name_or_path = label
    return config


def _transformers_config(raw: dict[str, Any], model_type: str, path: str) -> PretrainedConfig:
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **copy.deepcopy(raw))
    except Exception as error:  # noqa: BLE001 - transformers raises many types (StrictDataclassError, ...)
        raise SurveyError(_invalid(path, model_type, error)) from None


def _invalid(path: str, model_type: str, error: BaseException) -> str:
    reason = " ".join(str(error).split())[:200]
    return f"config file '{path}' is not a valid '{model_type}' config: {reason}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SurveyError(f"corrupt config file '{path}': {error.msg} at line {error.lineno}") from None
    except UnicodeDecodeError:
        raise SurveyError(f"corrupt config file '{path}': not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise SurveyError(f"corrupt config file '{path}': expected a JSON object, got {type(raw).__name__}")
    return raw


@lru_cache(maxsize=1)
def config_defaults() -> dict[str, Any]:
    """The contents of ``config_defaults.json`` (see :func:`build_config_defaults`)."""
    return json.loads(CONFIG_DEFAULTS.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------------- the light config

# config.json keys whose handling the light reader does not reproduce: such configs get transformers' class.
_NEEDS_TRANSFORMERS = frozenset({"per_layer_config"})
# transformers' PreTrainedConfig keeps these in __dict__ but never serializes them (_remove_keys_not_serialized).
_NOT_SERIALIZED = ("_is_quantized", "_auto_class", "_commit_hash", "_attn_implementation_internal",
                   "_experts_implementation_internal", "_post_init_done", "ignore_keys_at_rope_validation",
                   "base_model_tp_plan", "base_model_pp_plan", "base_model_fsdp_plan", "distributed_config")
# Properties of PreTrainedConfig that read another attribute.
_READ_AS = {"name_or_path": "_name_or_path", "output_attentions": "_output_attentions",
            "_attn_implementation": "_attn_implementation_internal",
            "_experts_implementation": "_experts_implementation_internal",
            "torch_dtype": "dtype", "use_return_dict": "return_dict", "rope_scaling": "rope_parameters"}


class LightConfig:
    """A model config as transformers would hold it, without transformers: values, aliases, ``to_dict()``.

    Attribute access follows transformers' config class: ``attribute_map`` aliases (GPT-2's ``hidden_size``
    reads ``n_embd``), the defaults of the class's fields, and the fields its ``__post_init__`` derives
    (Llama's ``head_dim``, T5's ``is_gated_act``, OPT's ``word_embed_proj_dim``, ...). ``to_dict()`` and
    ``to_json_string(use_diff=False)`` equal transformers' for the zoo's configs (``tests/test_zoo.py``); one
    difference: ``dtype`` stays a string (``"bfloat16"``), where transformers holds a ``torch.dtype``.
    Not reproduced: RoPE parameter validation (``validate_rope``) and special-token warnings, which change
    no shape; :func:`to_transformers_config` runs them.

    The config :func:`load_config` returns is shared by its cache and read-only; ``copy.deepcopy(config)``
    gives a private copy whose attributes may be set (type-checked as transformers checks them), and
    :func:`to_transformers_config` replays those assignments on the real config.
    """

    __slots__ = ("_values", "_spec", "_raw", "_path", "_changes", "_frozen", "_full", "_snapshot")

    def __init__(self, model_type: str, raw: dict[str, Any], path: str, spec: dict[str, Any] | None = None) -> None:
        # spec: the config class's entry of config_defaults.json, or a stored snapshot's (survey_utils.snapshots)
        spec = spec if spec is not None else config_defaults()["types"][model_type]
        for slot, value in (("_values", {}), ("_spec", spec), ("_raw", raw),
                            ("_path", path), ("_changes", {}), ("_frozen", False), ("_full", None),
                            ("_snapshot", None)):
            object.__setattr__(self, slot, value)

    @property
    def model_type(self) -> str:
        return self._spec["model_type"]

    @property
    def attribute_map(self) -> dict[str, str]:
        return self._spec["attribute_map"]

    @property
    def num_labels(self) -> int | None:
        id2label = self._values.get("id2label")
        return len(id2label) if id2label is not None else None

    def __getattr__(self, name: str) -> Any:  # only called when the class has no such attribute
        if name.startswith("__"):
            raise AttributeError(name)
        values = object.__getattribute__(self, "_values")
        key = _READ_AS.get(name, name)
        key = object.__getattribute__(self, "_spec")["attribute_map"].get(key, key)
        if key in values:
            return values[key]
        raise AttributeError(f"'{self._spec['config_class']}' config has no attribute '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError(f"config '{self.name_or_path}' is read-only (the zoo's cache shares it): set "
                                 f"'{name}' on copy.deepcopy(config) or on to_transformers_config(config)")
        self._assign(name, value)
        self._changes[name] = copy.deepcopy(value)

    def _assign(self, name: str, value: Any) -> None:
        """transformers' attribute assignment: property setters, the field's type check, then the alias."""
        values = self._values
        if name == "name_or_path":
            values["_name_or_path"] = str(value)
        elif name == "num_labels":
            if values.get("id2label") is None or self.num_labels != value:
                values["id2label"] = {i: f"LABEL_{i}" for i in range(value)}
                values["label2id"] = dict(zip(values["id2label"].values(), values["id2label"].keys(), strict=True))
        elif name == "output_attentions":
            if value and values.get("_attn_implementation_internal") is None:
                values["_attn_implementation_internal"] = "eager"
            if value and values.get("_attn_implementation_internal") != "eager":
                raise ValueError("output_attentions needs attn_implementation 'eager', got "
                                 f"{values.get('_attn_implementation_internal')!r}")
            values["_output_attentions"] = value
        elif name in ("_attn_implementation", "_experts_implementation"):
            current = values.get(f"{name}_internal")
            values[f"{name}_internal"] = value.get("", current) if isinstance(value, dict) else value
        elif name == "torch_dtype":
            self._assign("dtype", value)
        elif name == "rope_scaling":
            self._assign("rope_parameters", value)
            if value is not None and values.get("_post_init_done"):
                _standardize_rope(self)
        elif name == "use_return_dict":
            raise AttributeError("property 'use_return_dict' has no setter")
        else:
            _check_field(self._spec, name, value)
            values[self._spec["attribute_map"].get(name, name)] = value

    def to_dict(self) -> dict[str, Any]:
        """transformers' ``PretrainedConfig.to_dict()``: every attribute, ``model_type`` and the version."""
        output = copy.deepcopy(self._values)
        output["model_type"] = self.model_type
        output["transformers_version"] = config_defaults()["transformers_version"]
        output.pop("kwargs", None)
        output = {k: _tuples_to_lists(v) for k, v in output.items()}
        _remove_keys_not_serialized(output)
        return output

    def to_json_string(self, use_diff: bool = True) -> str:
        """``to_json_string(use_diff=False)`` as transformers writes it (the layout's cache key)."""
        if use_diff:
            raise NotImplementedError("LightConfig writes the whole config only: call to_json_string(use_diff=False)"
                                      ", or to_transformers_config(config).to_json_string() for the diff")
        return json.dumps(_encode_special_floats(self.to_dict()), indent=2, sort_keys=True) + "\n"

    def __iter__(self):
        yield from self._values

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LightConfig) and self.model_type == other.model_type
                and self._values == other._values)

    __hash__ = None  # type: ignore[assignment]  # unhashable, like transformers' configs

    def __repr__(self) -> str:
        return f"LightConfig({self._spec['config_class']}) {self.to_json_string(use_diff=False)}"

    def __copy__(self) -> LightConfig:
        return self.__deepcopy__({})

    def __deepcopy__(self, memo: dict[int, Any]) -> LightConfig:
        clone = LightConfig(self.model_type, self._raw, self._path, self._spec)
        object.__setattr__(clone, "_values", copy.deepcopy(self._values, memo))
        object.__setattr__(clone, "_changes", copy.deepcopy(self._changes, memo))
        object.__setattr__(clone, "_snapshot", self._snapshot)  # read-only, shared
        return clone

    def __reduce__(self) -> tuple[Any, ...]:
        return _restore, (self.model_type, self._raw, self._path, self._values, self._changes, self._frozen,
                          self._spec, self._snapshot)


def _restore(model_type: str, raw: dict[str, Any], path: str, values: dict[str, Any], changes: dict[str, Any],
             frozen: bool, spec: dict[str, Any] | None = None, snapshot: dict[str, Any] | None = None) -> LightConfig:
    config = LightConfig(model_type, raw, path, spec)
    object.__setattr__(config, "_snapshot", snapshot)
    object.__setattr__(config, "_values", values)
    object.__setattr__(config, "_changes", changes)
    object.__setattr__(config, "_frozen", frozen)
    return config


def _light_config(raw: dict[str, Any], model_type: str, label: str, path: str) -> LightConfig:
    """What ``AutoConfig.for_model(model_type, **raw)`` does, step by step, on a :class:`LightConfig`."""
    config = LightConfig(model_type, raw, path)
    try:
        _init_like_transformers(config, copy.deepcopy(raw))
    except (ArithmeticError, AttributeError, LookupError, TypeError, ValueError) as error:
        raise SurveyError(_invalid(path, model_type, error)) from None
    config._assign("name_or_path", label)
    object.__setattr__(config, "_frozen", True)
    return config


def _snapshot_config(snapshot: dict[str, Any], raw: dict[str, Any], model_type: str, label: str,
                     path: str) -> LightConfig:
    """A :class:`LightConfig` holding the values transformers' config class gave this config when the snapshot
    was stored (nothing replayed: the values are the resolved ones), read-only like every zoo config."""
    config = LightConfig(model_type, raw, path, snapshot["spec"])
    values = copy.deepcopy(snapshot["values"])
    if values.get("id2label") is not None:  # JSON keys are strings; transformers holds ints
        values["id2label"] = {int(key): value for key, value in values["id2label"].items()}
    object.__setattr__(config, "_values", values)
    object.__setattr__(config, "_snapshot", snapshot)
    config._assign("name_or_path", label)
    object.__setattr__(config, "_frozen", True)
    return config


def _init_like_transformers(config: LightConfig, kwargs: dict[str, Any]) -> None:
    spec, values = config._spec, config._values
    # The dataclass __init__ (transformers' wrap_init_to_accept_kwargs): fields from kwargs or their defaults.
    for name, default in spec["fields"].items():
        config._assign(name, kwargs.pop(name) if name in kwargs else copy.deepcopy(default))
    # The family's __post_init__, which ends by calling PreTrainedConfig.__post_init__.
    _POST_INIT.get(config.model_type, lambda c, k: None)(config, kwargs)
    defaults = config_defaults()
    torch_dtype = kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        values["dtype"] = values["dtype"] if values["dtype"] is not None else torch_dtype
    if isinstance(values["dtype"], str):  # transformers turns it into a torch.dtype; to_dict() writes its name
        if values["dtype"] not in defaults["torch_dtypes"]:
            raise AttributeError(f"module 'torch' has no attribute '{values['dtype']}'")
        values["dtype"] = defaults["torch_dtypes"][values["dtype"]]
    elif values["dtype"] is not None:  # transformers keeps it, then its to_dict() fails or mangles it (0.5 -> '5')
        raise TypeError(f"torch_dtype {values['dtype']!r} is not the name of a torch dtype")
    if values["id2label"] is None:
        config._assign("num_labels", kwargs.get("num_labels", 2))
    else:
        values["id2label"] = {int(key): value for key, value in values["id2label"].items()}
    if values["problem_type"] == "single_label_classification" and config.num_labels == 1:
        raise ValueError('problem_type="single_label_classification" requires num_labels > 1')
    if "rope_parameters" in values or (kwargs.get("rope_scaling") and kwargs.get("rope_theta")):
        _convert_rope(config, kwargs)
    for name in defaults["generation_parameters"]:
        kwargs.pop(name, None)
    values["_name_or_path"] = str(kwargs.pop("name_or_path", ""))
    kwargs.pop("_commit_hash", None)
    values["_output_attentions"] = kwargs.pop("output_attentions", False)
    config._assign("_attn_implementation", kwargs.pop("attn_implementation", None))
    config._assign("_experts_implementation", kwargs.pop("experts_implementation", None))
    for name, value in kwargs.items():
        if name not in ("_attn_implementation_internal", "_experts_implementation_internal"):
            config._assign(name, value)
    for name in ("layer_types", "mtp_layer_types"):
        if values.get(name) is not None:
            remapped = [defaults["legacy_layer_types"].get(t, t) for t in values[name]]
            if remapped != values[name]:
                config._assign(name, remapped)
    values["_post_init_done"] = True
    _validate(config)


def _llama_post_init(config: LightConfig, kwargs: dict[str, Any]) -> None:
    if config.head_dim is None:
        config._assign("head_dim", config.hidden_size // config.num_attention_heads)
    if config.num_key_value_heads is None:
        config._assign("num_key_value_heads", config.num_attention_heads)


def _qwen2_post_init(config: LightConfig, kwargs: dict[str, Any]) -> None:
    config._assign("sliding_window", config.sliding_window if config.use_sliding_window else None)
    if config.num_key_value_heads is None:
        config._assign("num_key_value_heads", config.num_attention_heads)
    if config.layer_types is None:
        config._assign("layer_types", [
            "sliding_attention" if config.sliding_window is not None and i >= config.max_window_layers
            else "full_attention" for i in range(config.num_hidden_layers)])


def _t5_post_init(config: LightConfig, kwargs: dict[str, Any]) -> None:
    if config.num_decoder_layers is None:
        config._assign("num_decoder_layers", config.num_layers)
    act_info = config.feed_forward_proj.split("-")
    config._assign("dense_act_fn", "gelu_new" if config.feed_forward_proj == "gated-gelu" else act_info[-1])
    config._assign("is_gated_act", act_info[0] == "gated")
    config._assign("scale_decoder_outputs", kwargs.pop("tie_word_embeddings", None) is not False)
    config._assign("tie_word_embeddings", True)


def _opt_post_init(config: LightConfig, kwargs: dict[str, Any]) -> None:
    if config.word_embed_proj_dim is None:
        config._assign("word_embed_proj_dim", config.hidden_size)


def _bloom_post_init(config: LightConfig, kwargs: dict[str, Any]) -> None:
    n_embed = kwargs.pop("n_embed", None)
    config._assign("hidden_size", config.hidden_size if n_embed is None else n_embed)


# Each family's __post_init__ in transformers/models/<type>/configuration_<type>.py, before it calls
# PreTrainedConfig.__post_init__ (gpt2, bert and roberta derive nothing). tests/test_zoo.py compares the result
# with transformers' for every zoo config and for each one with any optional key removed.
_POST_INIT = {"llama": _llama_post_init, "mistral": _llama_post_init, "qwen2": _qwen2_post_init,
              "t5": _t5_post_init, "opt": _opt_post_init, "bloom": _bloom_post_init}


def _convert_rope(config: LightConfig, kwargs: dict[str, Any]) -> None:
    """RotaryEmbeddingConfigMixin.convert_rope_params_to_dict: legacy ``rope_scaling``/``rope_theta`` keys
    become the ``rope_parameters`` dict."""
    rope = config._spec["rope"]
    rope_scaling = kwargs.pop("rope_scaling", None)
    config._assign("rope_parameters", rope_scaling or getattr(config, "rope_parameters", None))
    if config.rope_parameters is None:
        config._assign("rope_parameters", {})
    rope_theta = kwargs.pop("rope_theta", getattr(config, "rope_theta", rope["default_theta"]))
    partial = kwargs.pop("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    nested = _nested_rope_keys(config, config.rope_parameters)
    for parameters in [config.rope_parameters[k] for k in nested] or [config.rope_parameters]:
        if parameters is None:
            continue
        parameters.setdefault("rope_theta", rope_theta)
        if partial is not None:
            parameters.setdefault("partial_rotary_factor", partial)
    if partial is not None:
        config._values["ignore_keys_at_rope_validation"] = set(
            config._values.get("ignore_keys_at_rope_validation") or []) | {"partial_rotary_factor"}
    _standardize_rope(config)


def _nested_rope_keys(config: LightConfig, parameters: dict[str, Any]) -> list[str]:
    labels = getattr(config, "_rope_type_labels", None) or getattr(config, "layer_types", None) or ()
    return [key for key in parameters if key in labels]


def _standardize_rope(config: LightConfig) -> None:
    """RotaryEmbeddingConfigMixin.standardize_rope_params."""
    default_type = config._spec["rope"]["default_rope_type"]
    rope_theta = getattr(config, "rope_theta", None)
    partial = getattr(config, "partial_rotary_factor", None)
    parameters = getattr(config, "rope_parameters", None) or {}
    nested = _nested_rope_keys(config, parameters)
    if not (parameters or rope_theta):
        return
    for key in nested or [None]:
        entry = parameters if key is None else parameters[key]
        if entry is None:
            continue
        entry.setdefault("rope_type", entry.get("type", "default"))
        entry.setdefault("rope_theta", rope_theta)
        if partial is not None:
            entry.setdefault("partial_rotary_factor", partial)
        if key is None and default_type != "default" and entry["rope_type"] == "default":
            entry["rope_type"] = default_type
        if entry["rope_type"] in ("llama3", "yarn", "longrope"):
            if key is None and hasattr(config, "original_max_position_embeddings"):
                entry["original_max_position_embeddings"] = config.original_max_position_embeddings
            else:
                entry.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        if key is not None and default_type != "default" and entry["rope_type"] == "default":
            entry["rope_type"] = default_type
    config._assign("rope_parameters", parameters)


def _validate(config: LightConfig) -> None:
    """The class validators transformers runs after __init__, in its order; validate_rope and
    validate_token_ids (warnings only) are left to the full config."""
    if config.model_type == "llama" and config.hidden_size % config.num_attention_heads != 0:
        raise ValueError(f"The hidden size ({config.hidden_size}) is not a multiple of the number of attention "
                         f"heads ({config.num_attention_heads}).")
    elif config.model_type == "t5":
        act_info = config.feed_forward_proj.split("-")
        if len(act_info) > 1 and act_info[0] != "gated" or len(act_info) > 2:
            raise ValueError(f"`feed_forward_proj`: {config.feed_forward_proj} is not a valid activation function "
                             "of the dense layer: use 'gated-{ACT_FN}' or '{ACT_FN}'")
    elif all(hasattr(config, k) for k in ("head_dim", "num_heads", "embed_dim")) and (
            config.head_dim * config.num_heads != config.embed_dim):
        raise ValueError(f"The embed_dim ({config.embed_dim}) is not a multiple of the number of attention "
                         f"heads ({config.num_heads}).")
    defaults = config_defaults()
    for name, allowed in (("layer_types", defaults["allowed_layer_types"]),
                          ("mlp_layer_types", defaults["allowed_mlp_layer_types"])):
        layers = getattr(config, name, None)
        if not (layers is not None and hasattr(config, "num_hidden_layers")):
            break
        if not all(layer in allowed for layer in layers):
            raise ValueError(f"The `{name}` entries must be in {tuple(allowed)} but got {layers}")
        if config.num_hidden_layers is not None and config.num_hidden_layers != len(layers):
            raise ValueError(f"`num_hidden_layers` ({config.num_hidden_layers}) must be equal to the number of "
                             f"`{name}` ({len(layers)})")
    if config.output_attentions and config._attn_implementation not in ("eager", None):
        raise ValueError("output_attentions is not supported with attn_implementation "
                         f"{config._attn_implementation!r}: use 'eager'")


def _check_field(spec: dict[str, Any], name: str, value: Any) -> None:
    """huggingface_hub's strict-dataclass check of one field: its type, then its custom validators."""
    if name in spec["field_types"]:
        _check_type(name, value, spec["field_types"][name])
    for check in spec["field_checks"].get(name, []):
        low = -math.inf if check["min"] is None else check["min"]
        high = math.inf if check["max"] is None else check["max"]
        if not ((low < value if check["exclude_min"] else low <= value)
                and (value < high if check["exclude_max"] else value <= high)):
            raise ValueError(f"Field '{name}': value must be in [{low}, {high}], got {value!r}")


def _check_type(name: str, value: Any, spec: Any) -> None:
    """huggingface_hub.dataclasses.type_validator on a type written by :func:`_type_spec`."""
    if spec == "any":
        return
    if spec is None:
        if value is not None:
            raise TypeError(f"Field '{name}' expected None, got {type(value).__name__}")
        return
    if isinstance(spec, str):
        expected = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}[spec]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise TypeError(f"Field '{name}' expected {spec}, got {type(value).__name__} (value: {value!r})")
        return
    (kind, arg), = spec.items()
    if kind == "union":
        errors = []
        for option in arg:
            try:
                _check_type(name, value, option)
                return
            except TypeError as error:
                errors.append(str(error))
        raise TypeError(f"Field '{name}' with value {value!r} doesn't match any of its types: {'; '.join(errors)}")
    if kind == "literal":
        same_kind = [a for a in arg if isinstance(a, bool) == isinstance(value, bool)]
        if value not in same_kind:
            raise TypeError(f"Field '{name}' expected one of {tuple(arg)}, got {value!r}")
    elif kind == "list":
        if not isinstance(value, list):
            raise TypeError(f"Field '{name}' expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check_type(f"{name}[{i}]", item, arg)
    elif kind == "dict":
        if not isinstance(value, dict):
            raise TypeError(f"Field '{name}' expected a dict, got {type(value).__name__}")
        for key, item in value.items():
            _check_type(f"{name}.key", key, arg[0])
            _check_type(f"{name}[{key!r}]", item, arg[1])
    elif kind == "typeddict":  # isinstance() on a TypedDict raises TypeError: the check always fails
        raise TypeError(f"TypedDict {arg} does not support instance checks")
    else:
        raise ValueError(f"config_defaults.json: unknown type spec {spec!r} for field '{name}'")


def _tuples_to_lists(value: Any) -> Any:
    return [_tuples_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _remove_keys_not_serialized(d: dict[str, Any]) -> None:
    for key in _NOT_SERIALIZED:
        d.pop(key, None)
    if "_output_attentions" in d:
        d["output_attentions"] = d.pop("_output_attentions")
    for value in d.values():
        if isinstance(value, dict):
            _remove_keys_not_serialized(value)


def _encode_special_floats(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _encode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode_special_floats(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------- config_defaults.json


def build_config_defaults() -> dict[str, Any]:
    """Everything the light reader takes from transformers, read from the installed transformers (and torch).

    For each family of ``architecture._BUILDERS``: its config class's fields (defaults, types as
    huggingface_hub's strict check reads them, custom validators), ``attribute_map``, RoPE defaults and
    its model classes' ``_supports_sdpa``; and the facts of ``PreTrainedConfig.__post_init__``
    (generation parameters it drops, legacy layer-type names, allowed layer types, torch's dtype names),
    plus every model type transformers knows.
    """
    import torch
    import transformers
    from transformers import configuration_utils
    from transformers.generation.configuration_utils import GenerationConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from survey_utils.architecture import _BUILDERS

    types = {model_type: config_class_spec(model_type) for model_type in sorted(_BUILDERS)}
    dtypes = {name: str(getattr(torch, name)).split(".")[1] for name in sorted(dir(torch))
              if not name.startswith("_") and isinstance(getattr(torch, name, None), torch.dtype)}
    return {
        "about": "Generated from the installed transformers by survey_utils.zoo.build_config_defaults; do not "
                 "edit. The light config reader (survey_utils.zoo.LightConfig) reads it instead of importing "
                 "transformers; tests/test_zoo.py fails when it differs from what the installed versions give.",
        "command": CONFIG_DEFAULTS_COMMAND,
        "transformers_version": transformers.__version__,
        "generation_parameters": sorted(GenerationConfig._get_default_generation_params()),
        "legacy_layer_types": dict(configuration_utils._LEGACY_LAYER_TYPE_REMAP),
        "allowed_layer_types": list(configuration_utils.ALLOWED_ATTN_LAYER_TYPES),
        "allowed_mlp_layer_types": list(configuration_utils.ALLOWED_MLP_LAYER_TYPES),
        "torch_dtypes": dtypes,
        "model_types": sorted(CONFIG_MAPPING_NAMES),
        "types": types,
    }


def config_class_spec(model_type: str) -> dict[str, Any]:
    """What the light reader needs of one model type's config class, read from the installed transformers: its
    fields (defaults, types as huggingface_hub's strict check reads them, custom validators), ``attribute_map``,
    RoPE defaults and its model classes' ``_supports_sdpa``."""
    import dataclasses
    import importlib

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    if cls.sub_configs_defaults:
        raise ValueError(f"{cls.__name__} has sub-configs, which the light reader does not handle")
    fields: dict[str, Any] = {}
    field_types: dict[str, Any] = {}
    field_checks: dict[str, list[dict[str, Any]]] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            raise ValueError(f"{cls.__name__}.{f.name} has no default")
        if json.loads(json.dumps(default)) != default:
            raise ValueError(f"{cls.__name__}.{f.name}: default {default!r} does not survive JSON")
        fields[f.name] = default
        field_types[f.name] = _type_spec(f.type)
        validators = f.metadata.get("validator") or []
        for validator in validators if isinstance(validators, list) else [validators]:
            field_checks.setdefault(f.name, []).append(_validator_spec(cls, f.name, validator))
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    classes = {name: {"supports_sdpa": bool(getattr(getattr(modeling, name), "_supports_sdpa", False))}
               for name in sorted(modeling.__all__)
               if isinstance(getattr(modeling, name), type)
               and issubclass(getattr(modeling, name), transformers.PreTrainedModel)}
    return {
        "model_type": model_type, "config_class": cls.__name__, "attribute_map": dict(cls.attribute_map),
        "fields": fields, "field_types": field_types, "field_checks": field_checks,
        "rope": {"default_theta": cls.default_theta, "default_rope_type": cls.default_rope_type},
        "model_classes": classes,
    }


def write_config_defaults(path: str | os.PathLike[str] = CONFIG_DEFAULTS) -> Path:
    """Regenerate ``config_defaults.json`` (run ``python -m survey_utils.zoo`` after upgrading transformers)."""
    path = Path(path)
    path.write_text(json.dumps(build_config_defaults(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    config_defaults.cache_clear()
    return path


def _type_spec(annotation: Any) -> Any:
    """A field's type as JSON, with the meaning huggingface_hub.dataclasses.type_validator gives it."""
    import types
    import typing

    if annotation is typing.Any or isinstance(annotation, (str, typing.ForwardRef)):
        return "any"  # a string annotation (``from __future__ import annotations``) is not checked
    if annotation is None or annotation is type(None):
        return None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return {"union": [_type_spec(a) for a in args]}
    if origin is typing.Literal:
        return {"literal": list(args)}
    if origin is list:
        return {"list": _type_spec(args[0])}
    if origin is dict:
        return {"dict": [_type_spec(args[0]), _type_spec(args[1])]}
    if annotation in (int, float, str, bool, list, dict):
        return annotation.__name__
    if typing.is_typeddict(annotation):
        return {"typeddict": annotation.__name__}
    raise ValueError(f"no JSON form for the field type {annotation!r}: extend _type_spec and _check_type")


def _validator_spec(cls: type, name: str, validator: Any) -> dict[str, Any]:
    import inspect

    if validator.__qualname__ != "interval.<locals>._inner":
        raise ValueError(f"{cls.__name__}.{name}: validator {validator.__qualname__} is not reproduced")
    bounds = inspect.getclosurevars(validator).nonlocals
    return {"kind": "interval", **{k: bounds[k] if not math.isinf(bounds[k]) else None for k in ("min", "max")},
            "exclude_min": bounds["exclude_min"], "exclude_max": bounds["exclude_max"]}


# ----------------------------------------------------------------------------------------------- building models


def model_class(config: Config) -> type[PreTrainedModel]:
    """The transformers class named first in the config's ``architectures`` field."""
    import transformers

    name = (config.architectures or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise SurveyError(f"config '{config.name_or_path}' names model class '{name}', which transformers lacks")
    return cls


def has_model_class(config: Config, name: str) -> bool:
    """Whether transformers has the class ``name`` for this config, without importing it for a light config
    (``config_defaults.json`` records every model class of the hand families; the task-head check asks)."""
    if isinstance(config, LightConfig):
        return name in config._spec.get("model_classes", {})
    import transformers

    return isinstance(getattr(transformers, name, None), type)


def supports_sdpa(config: Config) -> bool:
    """Whether transformers' class for this config can use SDPA, without importing it when
    ``config_defaults.json`` records the class (BLOOM cannot: it adds ALiBi by hand)."""
    name = (config.architectures or [None])[0]
    spec = config._spec if isinstance(config, LightConfig) else config_defaults()["types"].get(config.model_type, {})
    recorded = spec.get("model_classes", {}).get(name)
    if recorded is not None:
        return recorded["supports_sdpa"]
    return bool(getattr(model_class(config), "_supports_sdpa", False))


def default_device(config: Config) -> str:
    """``cpu`` (real random tensors) for small models, ``meta`` (shapes only) for big ones."""
    from survey_utils.architecture import total_params

    return "cpu" if total_params(config) <= REAL_TENSOR_LIMIT else "meta"


def build_model(
    model: str | os.PathLike[str] | Config,
    device: str | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Build a model from its config alone: random init on ``cpu``, no storage at all on ``meta``.

    ``device=None`` picks ``cpu`` for models up to 200M parameters and ``meta`` above.
    The model is returned in eval mode so that outputs are deterministic (no dropout).
    """
    import torch

    config = load_config(model, full=True)
    device = device or default_device(config)
    cls = model_class(config)
    if device != "meta":
        torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            # The model gets its own copy: code that sets model.config.use_cache (X-LoRA, peft) must not change the
            # zoo's shared config, which every later load_config(..., full=True) returns.
            built = cls(copy.deepcopy(config))
    finally:
        torch.set_default_dtype(previous)
    if getattr(built, "loss_type", "") is None and hasattr(built, "lm_head") and not config.is_encoder_decoder:
        # transformers falls back to the causal-LM loss for decoder classes whose name it does not map (GPT-2's
        # LMHeadModel), with a warning in every chapter that trains one: say so once, here, and set it.
        built.loss_type = "ForCausalLM"
    return built.eval()


def load_pretrained(
    model: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load real weights with ``from_pretrained`` when they are on disk; otherwise say so and use random init.

    ``weights`` is a local folder or a hub repo id already in the local cache (no download is attempted
    when ``HF_HUB_OFFLINE`` is set). Without weights, one line is printed and the config-built model is
    returned, so a chapter runs the same with or without them.
    """
    config = load_config(model, full=True)
    source = str(weights) if weights is not None else _hub_repo(str(model))
    if source:
        try:
            return model_class(config).from_pretrained(source, **kwargs).eval()
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0][:160]
            print(f"no weights for '{model}' at '{source}' ({reason}); using random init from its config")
    else:
        print(f"no weights source known for '{model}'; using random init from its config")
    return build_model(config, device="cpu" if default_device(config) == "cpu" else "meta")


def _hub_repo(name: str) -> str | None:
    import csv

    sources = MODELS_DIR / "sources.csv"
    if not sources.is_file():
        return None
    with sources.open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("name") == name and row.get("hf_repo"):
                return row["hf_repo"]
    return None


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        print(f"wrote {write_config_defaults()}")
