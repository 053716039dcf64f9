"""The model zoo: Hugging Face configs in ``data/models/``, built without downloading any weights.

Small models are built with random weights on the CPU; big ones on torch's ``meta`` device, where a 70B
model costs no memory. The model class comes from the config's ``architectures`` field. Anywhere a zoo
name is accepted, a path to any HF ``config.json`` is accepted too. Chapter 00 explains the zoo.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from survey_utils.errors import SurveyError, closest

DATA_DIR = Path(os.environ.get("SURVEY_DATA_DIR", Path(__file__).resolve().parent.parent / "data"))
MODELS_DIR = DATA_DIR / "models"

# Models up to this many parameters get real (random) tensors by default; larger ones live on `meta`.
REAL_TENSOR_LIMIT = 200_000_000


def list_models() -> list[str]:
    """Names of the zoo's models, ordered by family then size (the order of ``sources.csv`` when present)."""
    names = sorted(p.stem for p in MODELS_DIR.glob("*.json"))
    return sorted(names, key=_zoo_order)


def _zoo_order(name: str) -> tuple[int, float, str]:
    families = ["tiny", "gpt2", "bert", "roberta", "t5", "opt", "bloom", "llama", "mistral", "qwen"]
    family = next((i for i, f in enumerate(families) if name.startswith(f)), len(families))
    try:
        size = float(total_params_from_name(name))
    except Exception:  # noqa: BLE001 - ordering must never fail because of one bad file
        size = float("inf")
    return family, size, name


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


def load_config(model: str | os.PathLike[str] | PretrainedConfig) -> PretrainedConfig:
    """The ``PretrainedConfig`` of a zoo name, a ``config.json`` path, or a config passed through."""
    if isinstance(model, PretrainedConfig):
        return model
    return _load_config_cached(str(config_path(model)), str(model))


@lru_cache(maxsize=256)
def _load_config_cached(path: str, label: str) -> PretrainedConfig:
    raw = _read_json(Path(path))
    model_type = raw.pop("model_type", None)
    if not model_type:
        raise SurveyError(f"config file '{path}' has no 'model_type' field")
    if not raw.get("architectures"):
        raise SurveyError(f"config file '{path}' has no 'architectures' field naming the model class")
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except Exception as error:  # noqa: BLE001 - transformers raises many types (StrictDataclassError, ...)
        reason = " ".join(str(error).split())[:200]
        raise SurveyError(f"config file '{path}' is not a valid '{model_type}' config: {reason}") from None
    config.name_or_path = label
    return config


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


def model_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class named first in the config's ``architectures`` field."""
    name = (config.architectures or [None])[0]
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise SurveyError(f"config '{config.name_or_path}' names model class '{name}', which transformers lacks")
    return cls


def default_device(config: PretrainedConfig) -> str:
    """``cpu`` (real random tensors) for small models, ``meta`` (shapes only) for big ones."""
    from survey_utils.architecture import total_params

    return "cpu" if total_params(config) <= REAL_TENSOR_LIMIT else "meta"


def build_model(
    model: str | os.PathLike[str] | PretrainedConfig,
    device: str | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Build a model from its config alone: random init on ``cpu``, no storage at all on ``meta``.

    ``device=None`` picks ``cpu`` for models up to 200M parameters and ``meta`` above.
    The model is returned in eval mode so that outputs are deterministic (no dropout).
    """
    config = load_config(model)
    device = device or default_device(config)
    cls = model_class(config)
    if device != "meta":
        torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            built = cls(config)
    finally:
        torch.set_default_dtype(previous)
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
    config = load_config(model)
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
