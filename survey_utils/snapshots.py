"""Stored snapshots of the zoo's models without a hand layout, so that answering for them needs no torch.

The nine families chapter 00 teaches have closed-form layouts and a light config reader
(:class:`survey_utils.zoo.LightConfig`), so counts, memory estimates and the advisor answer for them in a fraction
of a second. Every other model type (qwen3, gemma2, phi3, falcon, mixtral, deepseek_v3, ...) takes two slow steps
before its first answer: transformers' config class (its ``__post_init__`` derives fields) and a model built on
``meta`` (:mod:`survey_utils.generic_layout`), several seconds of imports of torch, transformers and peft.

For each zoo config of those types, ``python -m survey_utils.snapshots`` stores what the two steps give, computed
by them and nothing else: the resolved config values (the config object's attributes), the config class's spec
(fields, types, aliases, as ``config_defaults.json`` holds them for the hand families), the layout (every
module with its shapes, the MoE tags, peft's default targets) and, for a family with no hand activation recipe,
the recipe derived from its code at the memory estimate's defaults (:mod:`survey_utils.memory.derived`). :func:`survey_utils.zoo.load_config` then returns
a :class:`~survey_utils.zoo.LightConfig` holding those values, and :func:`survey_utils.architecture.layout` reads
the stored layout for it while the config is unchanged (a config copied and edited is built again).

A snapshot is keyed by the config file's content, the installed transformers and peft versions (peft names the
default LoRA targets) and the fields of the layout classes: any change of these misses the snapshot, and the slow
path, which is exact, answers. ``tests/test_snapshots.py`` rebuilds every snapshot and compares it with the stored
one; the main job (``make figures``) regenerates them, byte for byte.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from survey_utils.architecture import Layout, ModuleSpec
from survey_utils.zoo import MODELS_DIR

if TYPE_CHECKING:
    from survey_utils.zoo import Config

SNAPSHOT_DIR = MODELS_DIR / "snapshots"
COMMAND = "python -m survey_utils.snapshots"
SCHEMA = 1  # bump when what a snapshot holds changes meaning
KEY_CHARS = 20  # of the sha256, in the file name


# ----------------------------------------------------------------------------------------------- keys and reading


@lru_cache(maxsize=4)
def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def snapshot_key(raw: dict[str, Any], model_type: str) -> str:
    """sha256 of the config (``raw`` is config.json without ``model_type``), the model type, the transformers,
    peft and torch versions (torch's kernels decide a derived recipe's saved tensors) and the layout classes'
    fields."""
    payload = {"config": raw, "model_type": model_type, "schema": SCHEMA,
               "transformers": _version("transformers"), "peft": _version("peft"), "torch": _version("torch"),
               "layout_fields": [f.name for f in dataclasses.fields(Layout)],
               "module_fields": [f.name for f in dataclasses.fields(ModuleSpec)]}
    text = json.dumps(_encode(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def snapshot_path(key: str) -> Path:
    return SNAPSHOT_DIR / f"{key[:KEY_CHARS]}.json.gz"


def find_snapshot(raw: dict[str, Any], model_type: str) -> dict[str, Any] | None:
    """The stored snapshot of this config under the installed versions, or None (a corrupt or stale file is
    ignored: the slow path answers, exactly)."""
    key = snapshot_key(raw, model_type)
    return _read(str(snapshot_path(key)), key)


@lru_cache(maxsize=64)
def _read(path: str, key: str) -> dict[str, Any] | None:
    try:
        record = _decode(json.loads(gzip.decompress(Path(path).read_bytes()).decode("utf-8")))
    except (OSError, EOFError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("key") == key else None


def stored_layout(config: Config) -> Layout | None:
    """The stored layout of a snapshot config that nobody changed (:func:`survey_utils.zoo.load_config`'s shared
    copy, or an unchanged ``copy.deepcopy`` of it); None for any other config."""
    from survey_utils.zoo import LightConfig

    if not isinstance(config, LightConfig) or config._changes:
        return None
    snapshot = config._snapshot
    if snapshot is None:
        return None
    return _layout_from_record(snapshot["key"], snapshot["layout"])


def stored_recipe(config: Config, dtype: str, attention: str, device: str) -> Any:
    """The stored derived activation recipe (:class:`survey_utils.memory.derived.DerivedRecipe`) of an unchanged
    snapshot config for these settings; None when the snapshot holds none for them (they are derived on demand)."""
    from survey_utils.zoo import LightConfig

    if not isinstance(config, LightConfig) or config._changes or config._snapshot is None:
        return None
    key = (config._snapshot["key"], recipe_key(dtype, attention, device))
    if key not in _RECIPES:
        record = config._snapshot.get("recipes", {}).get(key[1])
        if record is None:
            return None
        from survey_utils.memory.derived import DerivedRecipe

        _RECIPES[key] = DerivedRecipe.from_json(record)
    return _RECIPES[key]


_RECIPES: dict[tuple[str, str], Any] = {}


def recipe_key(dtype: str, attention: str, device: str) -> str:
    return f"{dtype}/{attention}/{device}"


_LAYOUTS: dict[str, Layout] = {}


def _layout_from_record(key: str, record: dict[str, Any]) -> Layout:
    if key not in _LAYOUTS:
        from survey_utils.generic_layout import remember_transposed

        modules = tuple(ModuleSpec(**_tuples(m)) for m in record["modules"])
        fields = {k: _tuples(v) for k, v in record.items() if k not in ("modules", "transposed")}
        shape = Layout(modules=modules, **fields)
        remember_transposed(shape, frozenset(record["transposed"]))
        _LAYOUTS[key] = shape
    return _LAYOUTS[key]


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the frozen dataclasses hold."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------------------------- building


def snapshot_models() -> list[str]:
    """The zoo's models whose family has no hand layout (the ones a snapshot speeds up)."""
    from survey_utils.architecture import _BUILDERS
    from survey_utils.zoo import _read_json, config_path, list_models

    return [name for name in list_models() if _read_json(config_path(name)).get("model_type") not in _BUILDERS]


def build_snapshot(name: str) -> dict[str, Any]:
    """What transformers' config class and the ``meta`` build give for zoo model ``name`` (imports torch)."""
    import torch

    from survey_utils.generic_layout import generic_layout, transposed_modules
    from survey_utils.zoo import _read_json, _transformers_config, config_class_spec, config_path

    path = config_path(name)
    raw = _read_json(path)
    model_type = raw.pop("model_type")
    full = _transformers_config(raw, model_type, str(path))
    full.name_or_path = name
    values = {k: (str(v).split(".")[1] if isinstance(v, torch.dtype) else v) for k, v in vars(full).items()}
    shape = generic_layout(full)
    layout = {f.name: getattr(shape, f.name) for f in dataclasses.fields(Layout) if f.name != "modules"}
    layout["modules"] = [dataclasses.asdict(m) for m in shape.modules]
    layout["transposed"] = sorted(transposed_modules(shape))
    return {"recipes": _default_recipes(full, shape),
            "about": f"config and layout of data/models/{name}.json as transformers and survey_utils.generic_layout "
                     f"give them; generated by '{COMMAND}', do not edit",
            "key": snapshot_key(raw, model_type), "model": name, "model_type": model_type,
            "transformers": _version("transformers"), "peft": _version("peft"),
            "spec": config_class_spec(model_type), "values": values, "layout": layout}


def _default_recipes(config: Any, shape: Layout) -> dict[str, Any]:
    """The derived activation recipe at the memory estimate's defaults (bf16, SDPA where the model has it, CUDA
    kernels) for a family with no hand recipe: what ``memory`` and ``advise`` ask for first. Other settings are
    derived on demand (:mod:`survey_utils.memory.derived`)."""
    from survey_utils.memory.activations import RECIPES

    if shape.family in RECIPES:
        return {}
    from survey_utils.memory.derived import derive
    from survey_utils.zoo import supports_sdpa

    attention = "sdpa" if supports_sdpa(config) else "eager"
    return {recipe_key("bf16", attention, "cuda"): derive(config, "bf16", attention, "cuda").as_json()}


def encode_snapshot(record: dict[str, Any]) -> bytes:
    """Deterministic bytes: sorted keys, gzip with no time stamp or file name."""
    text = json.dumps(_encode(record), sort_keys=True, indent=0, separators=(",", ":")) + "\n"
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def write_snapshots(folder: Path = SNAPSHOT_DIR) -> list[Path]:
    """(Re)write the snapshot of every zoo model without a hand layout; remove snapshots no model has any more."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in tqdm(snapshot_models(), desc="zoo snapshots", unit="model"):
        record = build_snapshot(name)
        path = folder / snapshot_path(record["key"]).name
        path.write_bytes(encode_snapshot(record))
        written.append(path)
    for stale in set(folder.glob("*.json.gz")) - set(written):
        stale.unlink()
    return written


# ----------------------------------------------------------------------------------------------- JSON for Python values
# Config values hold what JSON cannot: sets (transformers' ignore_keys_at_rope_validation), tuples, integer dict
# keys (id2label) and NaN or infinite floats. Each is written as a one-key tagged object and read back exactly.


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted(_encode(v) for v in value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if value and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {"__int_keys__": {str(k): _encode(v) for k, v in value.items()}}
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"snapshot: dict keys {sorted(map(repr, value))[:3]} are neither all str nor all int")
        return {k: _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"snapshot: {type(value).__name__} value {value!r} has no JSON form")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, inner), = value.items()
            if tag == "__float__":
                return float(inner)
            if tag == "__set__":
                return {_decode(v) for v in inner}
            if tag == "__tuple__":
                return tuple(_decode(v) for v in inner)
            if tag == "__int_keys__":
                return {int(k): _decode(v) for k, v in inner.items()}
        return {k: _decode(v) for k, v in value.items()}
    return value


def main() -> None:
    for path in write_snapshots():
        print(path.relative_to(MODELS_DIR.parent.parent))


if __name__ == "__main__":
    main()
