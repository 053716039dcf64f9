"""Chapter 03's experiments: parameters trained, changed and stored; a few real steps that leave the rest untouched.

Each helper names the section of ``notebooks/03_selective.py`` that shows it. The methods themselves live in
:mod:`survey_utils.methods.selective`; nothing here is part of a method's contract.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from survey_utils.counting import changed_params, closed_form
from survey_utils.errors import SurveyError
from survey_utils.methods.registry import Method, get_method, list_methods
from survey_utils.units import DTYPE_BYTES
from survey_utils.zoo import load_config


@dataclass(frozen=True)
class Footprint:
    """Parameters trained, changed after merging, and the bytes to store the task, for one method on one model."""

    model: str
    method: str
    trained: int
    changed: int
    total: int
    stored: dict[str, int]

    @property
    def best(self) -> tuple[str, int]:
        """The smallest way to store the task (format, bytes)."""
        return min(self.stored.items(), key=lambda kv: kv[1])

    def percent(self, count: int) -> float:
        return 100.0 * count / self.total


def storage_formats(trained: int, changed: int, total: int, adds_parameters: bool, dtype: str = "bf16",
                    touched: int | None = None) -> dict[str, int]:
    """Bytes to store one task, four ways (values in ``dtype``).

    - ``dense delta``: the difference to the base model, every parameter (a whole checkpoint's size);
    - ``changed tensors``: only the tensors that differ, dense (BitFit's biases, a merged LoRA's matrices):
      ``touched`` elements (default ``changed``: changes are whole tensors; a sparse mask changes a few entries
      of many tensors);
    - ``bitmask + values``: one bit per base parameter saying which changed, then the changed values;
    - ``COO``: each changed value with its flat index (int32 below 2^32 parameters, else int64);
    - ``method's parameters``: for a method that adds parameters, storing them unmerged (LoRA's A and B).

    CSR (a row pointer per row plus a column index per value) always costs the COO's bytes plus the row pointers
    when the flat index fits int32, so it is not listed.
    Defined for chapter 03, section "Trained, changed, stored".
    """
    b = DTYPE_BYTES[dtype]
    index = 4 if total < 2**32 else 8
    formats = {"dense delta": total * b, "changed tensors": (changed if touched is None else touched) * b,
               "bitmask + values": math.ceil(total / 8) + changed * b, "COO": changed * (index + b)}
    if adds_parameters:
        formats["method's parameters"] = trained * b
    return formats


def footprint(model: str, method: str | Method, dtype: str = "bf16", **hp: Any) -> Footprint:
    """Trained (closed form), changed (measured on the model built on ``meta``: tensors a merge writes, base
    tensors that train, added tensors that stay) and stored bytes for ``method`` at its defaults.

    Defined for chapter 03, section "Trained, changed, stored".
    """
    chosen = get_method(method) if isinstance(method, str) else method
    if hp:
        raise SurveyError("footprint measures a method at its defaults (as chapter 07's table does)")
    count = closed_form(load_config(model), chosen)
    config = load_config(model)
    changed, base_total = changed_params(model, chosen.name)
    stored = storage_formats(count.trainable, changed, base_total, chosen.adds_parameters, dtype,
                             touched=touched_params(config, chosen, changed))
    return Footprint(model, chosen.name, count.trainable, changed, base_total, stored)


def touched_params(config: Any, method: Method, changed: int, **overrides: Any) -> int:
    """Elements of the tensors that hold a change: the masked weights (:attr:`Method.mask_kept`), the weights a
    sparse delta is merged into (a method that adds parameters yet changes fewer than it trains), else ``changed``
    (changes are whole tensors). Defined for chapter 03, section "Trained, changed, stored"."""
    hp = method.resolve(config, **overrides)
    if method.mask_kept is not None and method.unfrozen_params is not None:
        return sum(dict(spec.params)[name] for spec, name in method.unfrozen_params(config, **hp) if not spec.tied_to)
    sites = method.sites(config, **hp)
    if method.adds_parameters and isinstance(sites, list) and changed < method.trainable_params(config, **hp):
        return max(changed, sum(s.in_features * s.out_features for s in sites))
    return changed


def footprint_table(models: tuple[str, ...] = ("llama-2-7b", "roberta-base"), dtype: str = "bf16",
                    methods: tuple[str, ...] | None = None) -> list[Footprint | tuple[str, str, str]]:
    """:func:`footprint` of every registered method (or of ``methods``) on each model; ``(model, method, reason)``
    where a method does not apply (BitFit on Llama). Defined for chapter 03, section "Summary"."""
    rows: list[Footprint | tuple[str, str, str]] = []
    chosen = list_methods() if methods is None else [get_method(name) for name in methods]
    for model in models:
        for method in chosen:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    rows.append(footprint(model, method, dtype))
            except SurveyError as error:
                rows.append((model, method.name, str(error)))
    return rows


def format_footprints(rows: list[Footprint | tuple[str, str, str]]) -> str:
    """A fixed-width table of :func:`footprint_table` rows. Defined for chapter 03, section "Summary"."""
    from survey_utils.units import format_bytes

    head = f"{'model':<14}{'method':<16}{'% trained':>11}{'% changed':>11}  {'stored (smallest way)':<34}"
    lines = [head, "-" * len(head)]
    for row in rows:
        if isinstance(row, tuple):
            lines.append(f"{row[0]:<14}{row[1]:<16}{'refused: ' + row[2][:70]}")
            continue
        name, size = row.best
        lines.append(f"{row.model:<14}{row.method:<16}{row.percent(row.trained):>10.3g}%{row.percent(row.changed):>10.3g}%"
                     f"  {format_bytes(size):>10} as {name}")
    return "\n".join(lines)


@dataclass(frozen=True)
class StepReport:
    """What a few real training steps did to a tiny model's parameters."""

    model: str
    method: str
    steps: int
    trained: int
    changed: int
    frozen: int
    frozen_identical: bool
    total: int


def train_and_compare(model: str, method: str, steps: int = 3, seed: int = 0, **hp: Any) -> StepReport:
    """Apply ``method`` to a tiny model with real fp32 tensors, take ``steps`` AdamW steps on random tokens, and
    compare every parameter with its pretrained value element by element: the trained ones move, every other
    one must be bit-identical (``torch.equal``).

    Defined for chapter 03, section "Checked on real tensors".
    """
    import torch

    from survey_utils.counting import apply_method, count_parameters
    from survey_utils.memory.simulation import make_batch
    from survey_utils.zoo import build_model

    config = load_config(model)
    built = build_model(config, device="cpu", seed=seed, dtype=torch.float32)
    snapshot = {name: p.detach().clone() for name, p in built.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_method(built, method, **hp)
    params = dict(built.named_parameters())
    if set(params) != set(snapshot):
        raise SurveyError(f"method '{method}' adds parameters: this check is for methods that only unfreeze")
    trainable = [p for p in params.values() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)  # decay would move masked-out entries
    torch.manual_seed(seed)
    batch = make_batch(load_config(model, full=True), 2, 16, "cpu")
    built.train()
    for _ in range(steps):
        loss = built(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    frozen = [n for n, p in params.items() if not p.requires_grad]
    changed = sum(int((p.detach() != snapshot[n]).sum()) for n, p in params.items())
    masked_out = _masked_out_identical(built, snapshot)  # entries a fixed gradient mask leaves out
    trained = count_parameters(built).trainable
    return StepReport(
        model=model, method=method, steps=steps, trained=trained, changed=changed,
        frozen=sum(p.numel() for p in params.values()) - trained,
        frozen_identical=all(torch.equal(params[n].detach(), snapshot[n]) for n in frozen) and masked_out,
        total=sum(p.numel() for p in params.values()))


def _masked_out_identical(model: Any, snapshot: dict[str, Any]) -> bool:
    """Every entry outside a fixed gradient mask's index equals its pretrained value (resampled masks excluded)."""
    import torch

    from survey_utils.methods.registry import MASK_INDEX_SUFFIX

    for prefix, module in model.named_modules():
        for key, index in module._buffers.items():
            if not key.endswith(MASK_INDEX_SUFFIX):
                continue
            leaf = key[:-len(MASK_INDEX_SUFFIX)]
            parameter = getattr(module, leaf)
            if getattr(parameter, "mask_resampled", False):
                continue
            outside = torch.ones(parameter.numel(), dtype=torch.bool)
            outside[index] = False
            before = snapshot[f"{prefix}.{leaf}" if prefix else leaf].reshape(-1)
            if not torch.equal(parameter.detach().reshape(-1)[outside], before[outside]):
                return False
    return True


@dataclass(frozen=True)
class DiffReport:
    """Diff pruning on a tiny model: trained while the gate learns, kept by pruning, changed after merging."""

    model: str
    trained: int
    kept: int
    changed: int
    total: int


def diff_pruning_run(model: str, steps: int = 3, density: float = 0.005, l0_weight: float = 1e-6,
                     seed: int = 0) -> DiffReport:
    """Apply diff pruning to a tiny model with real fp32 tensors, take ``steps`` AdamW steps on random tokens with
    the L0 penalty, magnitude-prune to ``density``, merge, and count the base elements that differ.

    Defined for chapter 03, section "Diff pruning on real tensors".
    """
    import torch

    from survey_utils.counting import apply_method, count_parameters
    from survey_utils.memory.simulation import make_batch
    from survey_utils.methods.common import merge
    from survey_utils.methods.layers.selective import l0_penalty, prune_diff
    from survey_utils.zoo import build_model

    built = build_model(load_config(model), device="cpu", seed=seed, dtype=torch.float32)
    before = {name: p.detach().clone() for name, p in built.named_parameters()}
    apply_method(built, "diff_pruning", density=density)
    trained = count_parameters(built).trainable
    optimizer = torch.optim.AdamW([p for p in built.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    torch.manual_seed(seed)
    batch = make_batch(load_config(model, full=True), 2, 16, "cpu")
    built.train()
    for _ in range(steps):
        (built(**batch).loss + l0_weight * l0_penalty(built)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    kept = prune_diff(built)
    built.eval()
    merge(built)
    after = {name.replace(".base_layer.", "."): p for name, p in built.named_parameters() if "diff_" not in name}
    changed = sum(int((after[name] != value).sum()) for name, value in before.items())
    return DiffReport(model, trained, kept, changed, sum(v.numel() for v in before.values()))
