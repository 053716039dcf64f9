"""The lab's grid: every registered method that applies, on every task and size, one budget (chapter 09).

The protocol (stated in the chapter, section "The budget"):

1. **Learning rate.** Each method is trained at every rate of :data:`LEARNING_RATES` on every task at the smallest
   size (:data:`TUNING_SIZE`, seed 0; a method that does not apply there, at the next size where it does); the
   rate with the best mean validation accuracy over the tasks is the method's rate everywhere (one rate per
   method, as a practitioner with a small budget would pick it).
2. **Sizes.** Every method at its rate on every task at the other sizes (seed 0).
3. **Seeds.** :data:`SEED_METHODS` again with seeds 1 and 2 at :data:`SEED_SIZE`: the spread a seed alone makes.
4. **Ranks.** LoRA at ranks :data:`RANKS` at :data:`SEED_SIZE`.
5. **Memory.** Per method and size, the measured peak of a real CPU training step (the memory package's tracked
   step at the lab's batch and longest input) beside the estimate.

Every cell runs in a worker process on one thread (the same bytes whatever the machine's core count) and
writes rows of ``data/lab/*.csv``. ``python -m survey_utils.lab results`` makes them all; step times go to
``timings.csv``, the only file that differs from run to run.
"""

from __future__ import annotations

import copy
import csv
import io
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from survey_utils.errors import SurveyError
from survey_utils.lab.loop import BUDGET, Budget, fine_tune
from survey_utils.lab.models import (
    PRETRAINING,
    SIZES,
    Pretraining,
    check_size,
    eval_documents,
    lab_config,
    lm_loss,
)
from survey_utils.lab.tasks import TASKS, check_task, task_length

LEARNING_RATES = (3e-4, 3e-3, 3e-2)
TUNING_SIZE = "lab-s"
SEED_SIZE = "lab-m"
SEED_METHODS = ("full", "lora", "prompt_tuning")
EXTRA_SEEDS = (1, 2)
RANK_METHOD = "lora"
RANKS = (1, 2, 4, 16, 32)
COMMAND = "python -m survey_utils.lab results"

RUN_COLUMNS = ("size", "parameters", "method", "chapter", "task", "phase", "settings", "lr", "seed", "status",
               "trainable", "trainable_pct", "validation_accuracy", "test_accuracy", "test_loss",
               "final_train_loss", "forgetting_nats", "command")
CURVE_COLUMNS = ("size", "method", "task", "settings", "lr", "seed", "step", "train_loss")
MEMORY_COLUMNS = ("size", "method", "batch_size", "seq_len", "measured_bytes", "estimated_bytes", "error_pct",
                  "note", "command")
PRETRAINING_COLUMNS = ("size", "parameters", "hidden_size", "layers", "steps", "tokens", "final_train_loss",
                       "eval_loss", "command")
TIMING_COLUMNS = ("size", "method", "task", "settings", "lr", "seed", "median_step_seconds", "command")


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the grid."""

    size: str
    method: str
    task: str
    lr: float
    seed: int = 0
    phase: str = "grid"
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def settings_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings)


@dataclass
class CellResult:
    """A cell's CSV row, loss curve and step time; ``status`` is ``ok`` or why the method did not run."""

    cell: Cell
    row: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list)
    step_seconds: float | None = None


@dataclass(frozen=True)
class Plan:
    """What a grid run covers; :data:`FULL_PLAN` is the committed one, :func:`smoke_plan` the CI one."""

    methods: tuple[str, ...]
    sizes: tuple[str, ...] = tuple(SIZES)
    tasks: tuple[str, ...] = TASKS
    learning_rates: tuple[float, ...] = LEARNING_RATES
    budget: Budget = BUDGET
    pretraining: Pretraining = PRETRAINING
    seed_methods: tuple[str, ...] = SEED_METHODS
    extra_seeds: tuple[int, ...] = EXTRA_SEEDS
    ranks: tuple[int, ...] = RANKS
    measure_memory: bool = True
    command: str = COMMAND
    tuning_size: str = TUNING_SIZE
    seed_size: str = SEED_SIZE


def lab_methods() -> tuple[str, ...]:
    """Every registered method except those that need task ids (they train several tasks at once; the lab trains
    one task per run) and those that compose sources trained on other tasks (:attr:`Method.
    composes_trained_sources`; with fresh sources they have nothing to compose). Chapter 08 trains both kinds."""
    from survey_utils.methods import list_methods

    return tuple(m.name for m in list_methods() if not m.takes_task_ids and not m.composes_trained_sources)


def left_out() -> list[dict[str, str]]:
    """The registered methods the lab does not train, each with why (chapter 09, "What ran")."""
    from survey_utils.methods import list_methods

    return [{"method": m.name, "reason": "trains several tasks at once (task ids); see chapter 08"
             if m.takes_task_ids else "composes modules trained beforehand on other tasks; see chapter 08"}
            for m in list_methods() if m.takes_task_ids or m.composes_trained_sources]


def full_plan() -> Plan:
    return Plan(methods=lab_methods())


def smoke_plan() -> Plan:
    """A few seconds of the same pipeline (CI): two methods, one task, the smallest size, three steps."""
    return Plan(methods=("lora", "bitfit"), sizes=(TUNING_SIZE,), tasks=("sentiment",), learning_rates=(3e-3,),
                budget=Budget(steps=3, validation_examples=16, test_examples=16, curve_every=1),
                pretraining=replace(PRETRAINING, steps=3, eval_documents=4), seed_methods=(), ranks=(),
                command="python -m survey_utils.lab smoke", seed_size=TUNING_SIZE)


# --- one cell, in a worker -------------------------------------------------------------------------------------

_BASES: dict[tuple[str, Pretraining], tuple[Any, float]] = {}


def _base(size: str, pretraining: Pretraining) -> tuple[Any, float]:
    """The pretrained model of ``size`` and its held-out LM loss, loaded once per worker."""
    from survey_utils.lab.models import pretrained

    key = (size, pretraining)
    if key not in _BASES:
        model = pretrained(size, pretraining, progress=False)
        _BASES[key] = (model, lm_loss(model, eval_documents(pretraining)))
    return _BASES[key]


def one_thread() -> None:
    """One intra-op thread and deterministic kernels: the same bytes on every run (the workers' initializer)."""
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def run_cell(cell: Cell, budget: Budget = BUDGET, pretraining: Pretraining = PRETRAINING,
             progress: bool = False) -> CellResult:
    """Fine-tune one cell and return its row; a method that does not apply gets a row saying why."""
    import torch

    from survey_utils.counting import apply_method, count_parameters
    from survey_utils.methods import get_method

    method = get_method(cell.method)
    base, base_loss = _base(cell.size, pretraining)
    row = _row_start(cell, base)
    try:
        hp = method.resolve(base.config, **dict(cell.settings))
        torch.manual_seed(cell.seed)
        model = apply_method(copy.deepcopy(base), method, **hp)
        outcome = fine_tune(model, cell.task, cell.lr, budget, cell.seed, progress=progress,
                            desc=f"{cell.size} {cell.method} {cell.task} lr={cell.lr:g}")
    except SurveyError as error:
        return CellResult(cell, {**row, "status": f"does not apply: {error}"})
    except Exception as error:  # noqa: BLE001  (a bug in a method must not lose the other runs: the row says it)
        return CellResult(cell, {**row, "status": f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"})
    trainable = count_parameters(model).trainable  # a masked tensor counts the entries its mask keeps
    total = sum(p.numel() for p in base.parameters())
    try:
        forgetting = f"{lm_loss(model, eval_documents(pretraining)) - base_loss:.4f}"
    except (RuntimeError, TypeError, ValueError) as error:
        forgetting = f"n/a: {str(error).splitlines()[0][:80]}"
    row.update(status="ok", trainable=_exact_trainable(method, base.config, hp, trainable),
               trainable_pct=f"{100 * trainable / total:.4f}",
               validation_accuracy=f"{outcome.validation_accuracy:.4f}", test_accuracy=f"{outcome.test_accuracy:.4f}",
               test_loss=f"{outcome.test_loss:.4f}", final_train_loss=f"{outcome.curve[-1][1]:.4f}",
               forgetting_nats=forgetting)
    return CellResult(cell, row, outcome.curve, outcome.step_seconds)


def _exact_trainable(method: Any, config: Any, hp: dict[str, Any], built: int) -> int:
    """The built model's count; the closed form must agree (the lab is one more place the counts are checked)."""
    closed = method.count(config, **hp)
    if closed != built:
        raise AssertionError(f"{method.name} on {config.name_or_path}: closed form {closed} != built {built}")
    return built


def _row_start(cell: Cell, base: Any) -> dict[str, Any]:
    from survey_utils.methods import get_method

    return {"size": cell.size, "parameters": sum(p.numel() for p in base.parameters()), "method": cell.method,
            "chapter": get_method(cell.method).chapter, "task": cell.task, "phase": cell.phase,
            "settings": cell.settings_text, "lr": f"{cell.lr:g}", "seed": cell.seed, "status": "", "trainable": "",
            "trainable_pct": "", "validation_accuracy": "", "test_accuracy": "", "test_loss": "",
            "final_train_loss": "", "forgetting_nats": "", "command": ""}


def memory_row(size: str, method_name: str, batch_size: int, seq_len: int) -> dict[str, Any]:
    """Measured (real CPU step, tracked) and estimated peak of one training step of a method on a lab size."""
    from survey_utils.memory import estimate, measure

    row = {"size": size, "method": method_name, "batch_size": batch_size, "seq_len": seq_len, "measured_bytes": "",
           "estimated_bytes": "", "error_pct": "", "note": "", "command": COMMAND}
    config = lab_config(size)
    settings = dict(batch_size=batch_size, seq_len=seq_len, dtype="fp32", optimizer="adamw")
    try:
        predicted = estimate(config, method_name, device="cpu", **settings).total
        row["estimated_bytes"] = predicted
        measured = measure(config, method_name, device="cpu", **settings).allocated
    except SurveyError as error:
        row["note"] = str(error)
        return row
    row.update(measured_bytes=measured, error_pct=f"{100 * (predicted - measured) / measured:.2f}")
    return row


# --- the whole grid --------------------------------------------------------------------------------------------

def _run_many(cells: Sequence[Cell], plan: Plan, workers: int, label: str) -> list[CellResult]:
    """Run cells on ``workers`` processes (one thread each), with a progress bar naming the last finished cell."""
    from tqdm import tqdm

    bar = tqdm(total=len(cells), desc=label, file=sys.stderr, mininterval=1.0)
    results: list[CellResult] = []

    def done(result: CellResult) -> None:
        c = result.cell
        bar.set_postfix_str(f"{c.size} {c.method} {c.task} lr={c.lr:g} {c.settings_text}".strip())
        bar.update()
        results.append(result)

    if workers <= 1:
        one_thread()
        for cell in cells:
            done(run_cell(cell, plan.budget, plan.pretraining))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=one_thread) as pool:
            for result in pool.map(run_cell, cells, [plan.budget] * len(cells), [plan.pretraining] * len(cells)):
                done(result)
    bar.close()
    return results


def _map(function: Callable[..., Any], arguments: list[list[Any]], workers: int, label: str) -> list[Any]:
    """``[function(*a) for a in zip(*arguments)]`` on ``workers`` processes (one thread each), in order."""
    from tqdm import tqdm

    calls = list(zip(*arguments, strict=True))
    if workers <= 1:
        one_thread()
        return [function(*a) for a in tqdm(calls, desc=label, file=sys.stderr, mininterval=1.0)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread) as pool:
        return list(tqdm(pool.map(function, *arguments), total=len(calls), desc=label, file=sys.stderr,
                         mininterval=1.0))


def _pretrain_all(plan: Plan, workers: int) -> list[dict[str, Any]]:
    """Pretrain (or load) every size in the workers; returns the pretraining rows."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    sizes = list(plan.sizes)
    if workers <= 1:
        one_thread()
        return [pretraining_row(s, plan.pretraining) for s in sizes]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=one_thread) as pool:
        # the biggest first: it takes longest
        order = sorted(sizes, key=lambda s: -SIZES[s].hidden_size * SIZES[s].num_hidden_layers)
        rows = dict(zip(order, pool.map(pretraining_row, order, [plan.pretraining] * len(order)), strict=True))
    return [rows[s] for s in sizes]


def pretraining_row(size: str, pretraining: Pretraining = PRETRAINING) -> dict[str, Any]:
    """Pretrain (or load from the cache) one size and describe it."""
    from survey_utils.lab.models import pretrained_with_summary

    check_size(size)
    _, result = pretrained_with_summary(size, pretraining, progress=True)
    s = SIZES[size]
    return {"size": size, "parameters": result.parameters, "hidden_size": s.hidden_size,
            "layers": s.num_hidden_layers, "steps": pretraining.steps, "tokens": result.tokens,
            "final_train_loss": f"{result.final_train_loss:.4f}", "eval_loss": f"{result.eval_loss:.4f}",
            "command": COMMAND}


def best_rates(results: Iterable[CellResult]) -> dict[str, float]:
    """Each method's rate: the best mean validation accuracy over the tasks (ties: the smaller rate)."""
    scores: dict[str, dict[float, list[float]]] = {}
    for r in results:
        if r.row["status"] == "ok":
            scores.setdefault(r.cell.method, {}).setdefault(r.cell.lr, []).append(float(r.row["validation_accuracy"]))
    return {m: max(sorted(by_lr), key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr])) for m, by_lr in scores.items()}


def run_grid(plan: Plan, workers: int = 2) -> dict[str, str]:
    """Run the plan; returns CSV texts keyed by file name (``runs.csv``, ``curves.csv``, ...)."""
    for task in plan.tasks:
        check_task(task)
    for size in (*plan.sizes, plan.tuning_size, plan.seed_size):
        check_size(size)
    if plan.tuning_size not in plan.sizes or plan.seed_size not in plan.sizes:
        raise SurveyError(f"the tuning size {plan.tuning_size} and the seed size {plan.seed_size} must be among "
                          f"the plan's sizes ({', '.join(plan.sizes)})")
    if plan.budget.steps < 1:
        raise SurveyError(f"budget of {plan.budget.steps} steps: need at least 1")
    pretraining_rows = [{**row, "command": plan.command} for row in _pretrain_all(plan, workers)]
    # the rate grid runs at the tuning size; a method that does not apply there tries the next sizes in turn
    sizes_to_try = [plan.tuning_size] + [s for s in plan.sizes if s != plan.tuning_size]
    results: list[CellResult] = []
    rates: dict[str, float] = {}
    pending = list(plan.methods)
    for size in sizes_to_try:
        if not pending:
            break
        cells = [Cell(size, m, t, lr, phase="learning-rate grid") for m in pending for t in plan.tasks
                 for lr in plan.learning_rates]
        batch = _run_many(cells, plan, workers, f"lr grid at {size}")
        found = best_rates(batch)
        rates.update(found)
        last = size == sizes_to_try[-1]
        for r in batch:  # the tuning size's reported runs are those at the chosen rate
            if r.cell.lr == rates.get(r.cell.method, plan.learning_rates[0]):
                r.row["phase"] = "grid"
        # a method that does not apply says so once per task and size, not once per rate; a method that applies
        # at a later size keeps its refusal here
        results += [r for r in batch if r.row["status"] == "ok" or r.row["phase"] == "grid"]
        pending = [m for m in pending if m not in found]
        if last:
            break
    runnable = [m for m in plan.methods if m in rates]
    done = {(r.cell.size, r.cell.method) for r in results}
    later = [Cell(s, m, t, rates[m]) for s in plan.sizes for m in plan.methods if (s, m) not in done
             and m in rates for t in plan.tasks]
    # methods that apply nowhere already say why at every size they were tried
    later += [Cell(plan.seed_size, m, t, rates[m], seed=seed, phase="seeds") for m in plan.seed_methods if m in rates
              for t in plan.tasks for seed in plan.extra_seeds]
    later += [Cell(plan.seed_size, RANK_METHOD, t, rates[RANK_METHOD], phase="ranks", settings=(("r", r),))
              for r in plan.ranks if RANK_METHOD in rates for t in plan.tasks]
    results += _run_many(later, plan, workers, "sizes, seeds, ranks")
    results = [r for r in results if r.row["status"] == "ok" or r.row["phase"] == "grid"]
    results.sort(key=lambda r: _order(r.cell, plan))
    for r in results:
        r.row["command"] = plan.command
    memory = []
    if plan.measure_memory:
        seq_len = max(task_length(t) for t in plan.tasks)
        pairs = [(s, m) for s in plan.sizes for m in runnable]
        measured = _map(memory_row, [[s for s, _ in pairs], [m for _, m in pairs], [plan.budget.batch_size] * len(pairs),
                                     [seq_len] * len(pairs)], workers, "memory")
        memory = [{**row, "command": plan.command} for row in measured]
    return {
        "runs.csv": _csv(RUN_COLUMNS, [r.row for r in results]),
        "curves.csv": _csv(CURVE_COLUMNS, [
            {"size": r.cell.size, "method": r.cell.method, "task": r.cell.task, "settings": r.cell.settings_text,
             "lr": f"{r.cell.lr:g}", "seed": r.cell.seed, "step": step, "train_loss": f"{loss:.4f}"}
            for r in results for step, loss in r.curve]),
        "memory.csv": _csv(MEMORY_COLUMNS, memory),
        "pretraining.csv": _csv(PRETRAINING_COLUMNS, pretraining_rows),
        "timings.csv": _csv(TIMING_COLUMNS, [
            {"size": r.cell.size, "method": r.cell.method, "task": r.cell.task, "settings": r.cell.settings_text,
             "lr": f"{r.cell.lr:g}", "seed": r.cell.seed, "median_step_seconds": f"{r.step_seconds:.5f}",
             "command": plan.command} for r in results if r.step_seconds is not None]),
    }


def _order(cell: Cell, plan: Plan) -> tuple[Any, ...]:
    return (plan.sizes.index(cell.size), plan.methods.index(cell.method), plan.tasks.index(cell.task), cell.seed,
            cell.settings, cell.lr)


def _csv(columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def write(files: dict[str, str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written


def reproduce_row(committed: Path, size: str = TUNING_SIZE, method: str = "lora", task: str = "sentiment",
                  run: Callable[..., CellResult] = run_cell) -> tuple[dict[str, str], dict[str, Any]]:
    """Rerun one committed grid cell and return (committed row, new row): the main job's reproduction check."""
    path = committed / "runs.csv"
    if not path.is_file():
        raise SurveyError(f"{path} does not exist: run `make lab-results` (python -m survey_utils.lab results)")
    with path.open(encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if (r["size"], r["method"], r["task"], r["phase"], r["seed"])
                == (size, method, task, "grid", "0")]
    if not rows:
        raise SurveyError(f"{path} has no grid row for {size} {method} {task}")
    one_thread()
    cell = Cell(size, method, task, float(rows[0]["lr"]), phase="grid")
    new = run(cell)
    # the committed rows come from the full plan, whose command every row records
    return rows[0], {k: str(v) for k, v in {**new.row, "command": COMMAND}.items()}
