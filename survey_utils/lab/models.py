"""The lab's model family: three llama-shaped sizes, pretrained here on the lab's corpus (chapter 09).

:func:`pretrained` returns a size's pretrained model, training it on first use (one CPU thread, fixed seeds and
data order, so the same bytes on every machine with the same torch build) and caching its weights under
:func:`cache_dir` (git-ignored ``_build/lab``, or ``$SURVEY_LAB_CACHE``). Users with real weights pass a
folder to :func:`load_model`: the lab then runs the same grid on them (their vocabulary must hold the lab's
96 token ids, which then stand for whatever those ids mean to the model).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from survey_utils.errors import SurveyError
from survey_utils.lab.tasks import DOCUMENT_LEN, VOCAB_SIZE, pretraining_documents

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Size:
    """One llama-shaped size: width, depth, MLP width (about 8/3 x width, as LLaMA, rounded to a multiple of 32
    so that QA-LoRA's default group of 32 divides it), four heads."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int = 4


SIZES: dict[str, Size] = {s.name: s for s in (
    Size("lab-s", 64, 2, 192),
    Size("lab-m", 96, 3, 256),
    Size("lab-l", 160, 4, 416),
)}


@dataclass(frozen=True)
class Pretraining:
    """How every size is pretrained: AdamW, linear warm-up then cosine decay to 10%, next-token loss."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    eval_documents: int = 64


PRETRAINING = Pretraining()
# Held-out pretraining documents (for forgetting) come from this seed; training documents from 0, 1, 2, ...
EVAL_DOCUMENT_SEED = 999_999


def check_size(size: str) -> Size:
    if size not in SIZES:
        raise SurveyError(f"model size {size!r} is not one of {', '.join(SIZES)}")
    return SIZES[size]


def lab_config(size: str) -> Any:
    """The transformers ``LlamaConfig`` of a lab size (vocabulary :data:`VOCAB_SIZE`, untied embeddings)."""
    from transformers import LlamaConfig

    s = check_size(size)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=s.hidden_size, num_hidden_layers=s.num_hidden_layers,
                         intermediate_size=s.intermediate_size, num_attention_heads=s.num_attention_heads,
                         num_key_value_heads=s.num_attention_heads, max_position_embeddings=2 * DOCUMENT_LEN,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=4, pad_token_id=0,
                         architectures=["LlamaForCausalLM"])
    config.name_or_path = size
    return config


def cache_dir() -> Path:
    return Path(os.environ.get("SURVEY_LAB_CACHE", REPO_ROOT / "_build" / "lab"))


def fingerprint(size: str, settings: Pretraining = PRETRAINING) -> str:
    """A hash of everything the pretrained weights depend on: the config, the recipe, the torch version and the
    source of the corpus generator and of this module (a change to either retrains)."""
    import torch

    from survey_utils.lab import tasks

    sources = [Path(tasks.__file__).read_text(encoding="utf-8"), Path(__file__).read_text(encoding="utf-8")]
    text = json.dumps([lab_config(size).to_dict(), asdict(settings), torch.__version__, sources], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def checkpoint_path(size: str, settings: Pretraining = PRETRAINING) -> Path:
    return cache_dir() / f"{size}-{fingerprint(size, settings)}.pt"


def lm_loss(model: Any, documents: Any) -> float:
    """Mean next-token cross-entropy (nats) of ``model`` on ``documents`` (n x length), no gradient."""
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=documents, labels=documents).loss
    model.train(was_training)
    return float(loss)


def eval_documents(settings: Pretraining = PRETRAINING) -> Any:
    return pretraining_documents(settings.eval_documents, seed=EVAL_DOCUMENT_SEED)


def _lr_at(step: int, settings: Pretraining) -> float:
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class PretrainingResult:
    size: str
    parameters: int
    final_train_loss: float
    eval_loss: float
    tokens: int


def pretrain(size: str, settings: Pretraining = PRETRAINING, progress: bool = True) -> tuple[Any, PretrainingResult]:
    """Train a lab size from scratch on the lab corpus; returns the model (eval mode) and its losses.

    Batch ``i`` is :func:`pretraining_documents` with seed ``settings.seed * 100_000 + i``: a fixed data order.
    Run on one thread (the caller sets it) for the same bytes everywhere."""
    import torch
    from tqdm import tqdm

    from survey_utils.zoo import build_model

    model = build_model(lab_config(size), device="cpu", seed=settings.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    losses = []
    bar = tqdm(range(settings.steps), desc=f"pretrain {size}", file=sys.stderr, disable=not progress,
               mininterval=2.0, leave=False)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, settings)
        batch = pretraining_documents(settings.batch_size, seed=settings.seed * 100_000 + step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-20:]
    result = PretrainingResult(size, sum(p.numel() for p in model.parameters()), sum(tail) / len(tail),
                               lm_loss(model, eval_documents(settings)),
                               settings.steps * settings.batch_size * DOCUMENT_LEN)
    return model, result


def pretrained(size: str, settings: Pretraining = PRETRAINING, progress: bool = True) -> Any:
    """The pretrained model of a lab size, from the cache or trained now (and cached)."""
    return pretrained_with_summary(size, settings, progress)[0]


def pretrained_with_summary(size: str, settings: Pretraining = PRETRAINING,
                            progress: bool = True) -> tuple[Any, PretrainingResult]:
    """The pretrained model and its :class:`PretrainingResult`, both cached (weights ``.pt``, summary ``.json``)."""
    import torch

    from survey_utils.zoo import build_model

    path = checkpoint_path(size, settings)
    summary = path.with_suffix(".json")
    if path.is_file() and summary.is_file():
        model = build_model(lab_config(size), device="cpu", seed=settings.seed)
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model.eval(), PretrainingResult(**json.loads(summary.read_text(encoding="utf-8")))
        except (RuntimeError, OSError, EOFError, ValueError, TypeError) as error:
            print(f"cached weights {path} unreadable ({str(error).splitlines()[0][:80]}); pretraining again",
                  file=sys.stderr)
    trained, result = pretrain(size, settings, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, save in ((path, lambda f: torch.save(trained.state_dict(), f)),
                         (summary, lambda f: f.write_text(json.dumps(asdict(result)), encoding="utf-8"))):
        partial = target.with_suffix(target.suffix + ".tmp")
        save(partial)
        partial.replace(target)  # atomic: a half-written file is never taken for a cache entry
    return trained, result


def load_model(size_or_folder: str, progress: bool = True) -> Any:
    """A lab size (pretrained here) or a folder of real ``from_pretrained`` weights (vocabulary >= 96)."""
    if size_or_folder in SIZES:
        return pretrained(size_or_folder, progress=progress)
    folder = Path(size_or_folder)
    if not (folder / "config.json").is_file():
        raise SurveyError(f"model {size_or_folder!r} is neither a lab size ({', '.join(SIZES)}) nor a folder "
                          "with config.json and weights")
    from survey_utils.zoo import load_pretrained

    model = load_pretrained(folder, weights=folder)
    if model.config.vocab_size < VOCAB_SIZE:
        raise SurveyError(f"model {size_or_folder!r} has a vocabulary of {model.config.vocab_size} ids; the lab "
                          f"needs {VOCAB_SIZE}")
    return model
