r"""One training loop for every method (chapter 09, "The budget"), built on ``accelerate``.

The same code runs on the CPU (the committed results), one GPU or several (``accelerate launch``): the model,
optimizer and data loader go through ``Accelerator.prepare`` and the loss through ``Accelerator.backward``.

A step: a batch of a task's inputs, the logits of the task's label tokens at the last position, cross-entropy
against the label, AdamW (no weight decay, constant learning rate) on the parameters that require gradients,

.. math:: \mathcal{L} = -\log \operatorname{softmax}\big(z_{L}[\,\text{labels}\,]\big)_{y}.

Validation (model selection) and test (reported) examples are fixed sets, the same for every run; a run's seed
draws its training examples and the method's initialisation.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from survey_utils.errors import SurveyError
from survey_utils.lab.tasks import LABEL_TOKENS, TEST_OFFSET, VALIDATION_OFFSET, check_task, make_task


@dataclass(frozen=True)
class Budget:
    """The same small budget for every method: steps, batch, and the evaluation sets' sizes."""

    steps: int = 100
    batch_size: int = 16
    validation_examples: int = 256
    test_examples: int = 512
    curve_every: int = 5

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "validation_examples", "test_examples", "curve_every"):
            if getattr(self, name) < 1:
                raise SurveyError(f"budget {name}={getattr(self, name)}: must be at least 1")


BUDGET = Budget()


@dataclass
class RunOutcome:
    """What one fine-tuning run measured; losses in nats, accuracies in [0, 1]."""

    curve: list[tuple[int, float]]
    validation_accuracy: float
    validation_loss: float
    test_accuracy: float
    test_loss: float
    step_seconds: float
    notes: list[str] = field(default_factory=list)


def label_logits(model: Any, input_ids: Any, task: str) -> Any:
    """The logits of ``task``'s label tokens at the last position (batch x labels)."""
    return model(input_ids=input_ids, logits_to_keep=1).logits[:, -1, list(LABEL_TOKENS[task])]


def evaluate(model: Any, task: str, examples: int, seed: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``examples`` examples of ``task`` drawn with ``seed``."""
    import torch
    import torch.nn.functional as F

    batch = make_task(task, examples, seed=seed)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = label_logits(model, batch.input_ids, task)
    model.train(was_training)
    return float(F.cross_entropy(logits, batch.labels)), float((logits.argmax(-1) == batch.labels).float().mean())


def make_accelerator() -> Any:
    """An ``Accelerator`` on the GPU where there is one, else the CPU."""
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def fine_tune(model: Any, task: str, lr: float, budget: Budget = BUDGET, seed: int = 0, accelerator: Any = None,
              progress: bool = True, desc: str = "") -> RunOutcome:
    """Train the parameters of ``model`` that require gradients on ``task`` for ``budget.steps`` steps.

    ``model`` already carries its method (applied by the caller, after seeding). Returns the loss curve (every
    ``budget.curve_every`` steps, the mean of the steps since the last point), validation and test metrics and
    the median step time."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from tqdm import tqdm

    check_task(task)
    if not lr > 0:
        raise SurveyError(f"learning rate {lr}: must be positive")
    accelerator = accelerator or make_accelerator()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SurveyError("the method left no parameter to train")
    data = make_task(task, budget.steps * budget.batch_size, seed=seed)
    loader = DataLoader(TensorDataset(data.input_ids, data.labels), batch_size=budget.batch_size, shuffle=False)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    curve: list[tuple[int, float]] = []
    window: list[float] = []
    seconds: list[float] = []
    bar = tqdm(loader, desc=desc or task, file=sys.stderr, disable=not progress, leave=False, mininterval=1.0)
    for step, (inputs, labels) in enumerate(bar, start=1):
        start = time.perf_counter()
        loss = F.cross_entropy(label_logits(prepared, inputs, task), labels)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        seconds.append(time.perf_counter() - start)
        window.append(loss.item())
        if step % budget.curve_every == 0 or step == budget.steps:
            curve.append((step, sum(window) / len(window)))
            window = []
    trained = accelerator.unwrap_model(prepared)
    val_loss, val_acc = evaluate(trained, task, budget.validation_examples, VALIDATION_OFFSET)
    test_loss, test_acc = evaluate(trained, task, budget.test_examples, TEST_OFFSET)
    accelerator.free_memory()
    # The first steps pay for lazy initialisation (optimizer states, kernels): the median of the rest.
    steady = seconds[3:] or seconds
    return RunOutcome(curve, val_acc, val_loss, test_acc, test_loss, statistics.median(steady))
