"""Checks of a from-scratch method against HF peft on real tensors (every method chapter uses them).

``parity(model, method, **hp)`` builds a tiny model twice from the same seed, applies our method to one and
peft's to the other, gives both the same non-trivial adapter values (peft's initial values would make many
updates zero and the check vacuous), and compares the outputs; for mergeable methods it also compares the
merged model with the unmerged one. The method maps its parameter names to peft's through
``Method.peft_param_map``, e.g. ``{"lora_A": "lora_A.default.weight"}``, or, where its modules sit
elsewhere than peft's (soft prompts), copies peft's values into its own with ``Method.peft_state_sync``.
A task-head model (``...ForSequenceClassification``) is wrapped with its peft task type (``counting.peft_model``), so
peft's copy of the head (``modules_to_save``) starts from the same values as ours. A sequence-classification head
scores each row's last token that is not padding, and transformers refuses a batch of more than one row without a
``pad_token_id`` to find it: :func:`with_pad_token` gives the check's copy of such a config one (see there why).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from survey_utils.architecture import layout
from survey_utils.counting import apply_method, model_name, peft_model
from survey_utils.errors import SurveyError
from survey_utils.methods.common import merge, unmerge
from survey_utils.methods.registry import Method, get_method
from survey_utils.zoo import build_model, load_config


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute output differences: ours vs peft, and merged vs unmerged (None if not mergeable)."""

    model: str
    method: str
    copied_tensors: int
    max_diff_vs_peft: float
    max_diff_merged: float | None
    atol: float

    @property
    def ok(self) -> bool:
        merged_ok = self.max_diff_merged is None or self.max_diff_merged <= self.atol
        return self.copied_tensors > 0 and self.max_diff_vs_peft <= self.atol and merged_ok


def example_inputs(config: PretrainedConfig, batch: int = 2, seq_len: int = 12, seed: int = 0) -> dict[str, Any]:
    """Random token ids (and decoder ids for encoder-decoder models) for a forward pass.

    An encoder-decoder sequence classifier (T5's, BART's) builds its decoder ids itself, by shifting the input ids
    right, and scores each row's decoder state at its last end-of-sequence token, refusing rows with different
    numbers of them: its rows get one end-of-sequence token each, at the end, and no decoder ids.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, : seq_len // 4] = 0  # a left-padded row: prompt methods must extend the mask as peft does
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if not getattr(config, "is_encoder_decoder", False):
        return inputs
    eos = getattr(config, "eos_token_id", None)
    if layout(config).task_type == "SEQ_CLS" and isinstance(eos, int):
        ids[ids == eos] = (eos + 1) % config.vocab_size
        ids[:, -1] = eos
    else:
        inputs["decoder_input_ids"] = torch.randint(0, config.vocab_size, (batch, seq_len // 2), generator=generator)
    return inputs


def with_pad_token(config: PretrainedConfig) -> PretrainedConfig:
    """``config``, or for a sequence-classification head without a ``pad_token_id``, a copy with one: the config's
    end-of-sequence token (what a tokenizer without a pad token pads with), else its beginning-of-sequence token,
    else token 0.

    Why a pad token rather than a batch of one: :func:`example_inputs`' two rows are the check's power, a full row
    beside a left-padded one (prompt methods must extend the attention mask as peft does) and two task ids for
    multi-task methods; a single row would test neither. Which token pads does not matter here: both models are
    built from the same copy and read the same inputs, and the head scores each row's last token that is not the pad
    token (the random ids' last token, but for a 1-in-vocab_size draw).
    """
    if layout(config).task_type != "SEQ_CLS" or getattr(config, "pad_token_id", None) is not None:
        return config
    candidates = [getattr(config, name, None) for name in ("eos_token_id", "bos_token_id")]
    ids = [c[0] if isinstance(c, (list, tuple)) and c else c for c in candidates]
    edited = copy.deepcopy(config)  # the zoo's configs are shared and read-only; the caller's stays as given
    edited.pad_token_id = next((i for i in ids if isinstance(i, int) and 0 <= i < config.vocab_size), 0)
    return edited


def forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The model's output to compare: its logits (a question-answering head's start and end logits side by side),
    else the last hidden state."""
    with torch.no_grad():
        out = model(**inputs)
    if getattr(out, "start_logits", None) is not None:
        return torch.cat((out.start_logits, out.end_logits), dim=-1)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomise_method_params(model: nn.Module, method: Method, seed: int = 1, std: float = 0.05) -> int:
    """Give the method's own parameters non-trivial values (zero-initialised factors make parity vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(prefix in name for prefix in method.param_prefixes):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
                count += 1
    return count


def copy_into_peft(ours: nn.Module, theirs: nn.Module, method: Method) -> int:
    """Copy our method's parameter values into peft's model through ``Method.peft_param_map``."""
    mapping: dict[str, str] = dict(method.peft_param_map)
    if not mapping:
        raise SurveyError(f"method '{method.name}' declares no peft_param_map for output parity")
    their_params = dict(theirs.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            module_path, _, leaf = name.rpartition(".")
            if leaf not in mapping:
                continue
            target = f"base_model.model.{module_path}.{mapping[leaf]}"
            if target not in their_params:
                raise SurveyError(f"peft model has no parameter '{target}' to match our '{name}'")
            their_params[target].copy_(parameter.reshape(their_params[target].shape))
            copied += 1
    return copied


def parity(model: str | os.PathLike[str] | PretrainedConfig, method: str | Method, atol: float = 1e-5,
           **overrides: Any) -> ParityReport:
    """Our method vs peft's on real tensors of a tiny model, with equal adapter values (the report names the model
    by :func:`~survey_utils.counting.model_name`)."""
    method = get_method(method) if isinstance(method, str) else method
    config = with_pad_token(load_config(model))
    ours = apply_method(build_model(config, device="cpu", seed=0, dtype=torch.float64), method, **overrides)
    theirs = peft_model(build_model(config, device="cpu", seed=0, dtype=torch.float64), method, **overrides)
    if method.peft_state_sync is not None:
        copied = method.peft_state_sync(ours, theirs)
    else:
        randomise_method_params(ours, method)
        copied = copy_into_peft(ours, theirs, method)
    inputs = example_inputs(config)
    if method.takes_task_ids:  # one task per example, cycling through the tasks the method serves
        tasks = method.resolve(config, **overrides)[method.tasks_hp]
        inputs["task_ids"] = torch.arange(len(inputs["input_ids"])) % tasks
    ours.eval()
    theirs.eval()
    reference = forward(ours, inputs)
    diff = (reference - forward(theirs, inputs)).abs().max().item()
    merged_diff = None
    if method.mergeable:
        merged = forward(merge(ours), inputs)
        merged_diff = (reference - merged).abs().max().item()
        unmerge(ours)
    return ParityReport(model_name(model), method.name, copied, diff, merged_diff, atol)
