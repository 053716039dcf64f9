r"""Chapter 09's reading of the lab's results: tables, plots and the findings table, from ``data/lab/*.csv``.

The chapter trains nothing for minutes: ``python -m survey_utils.lab results`` (``make lab-results``) writes the
CSVs, and every function here reads them. Each helper names the section of ``notebooks/09_fine_tuning_lab.py``
that shows it. Accuracies are test-set accuracies (512 fixed examples per task) of the grid's runs at each
method's chosen learning rate (the ``grid`` phase), unless a function says otherwise.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from survey_utils.errors import SurveyError
from survey_utils.lab.tasks import LABEL_TOKENS, TASKS
from survey_utils.zoo import DATA_DIR

LAB_DIR = DATA_DIR / "lab"
MAKE_COMMAND = "make lab-results (python -m survey_utils.lab results)"
SCALE_METHODS = ("full", "lora", "prompt_tuning")

Row = dict[str, str]


@dataclass(frozen=True)
class LabResults:
    """The lab's committed CSVs, as rows of strings (the chapter's one input)."""

    runs: list[Row]
    curves: list[Row]
    memory: list[Row]
    pretraining: list[Row]
    timings: list[Row]

    @property
    def sizes(self) -> list[str]:
        return list(dict.fromkeys(r["size"] for r in self.pretraining))

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(r["method"] for r in self.runs))

    def grid(self, size: str | None = None, task: str | None = None, ok: bool = True) -> list[Row]:
        """Rows of the ``grid`` phase (seed 0, each method at its rate), filtered."""
        return [r for r in self.runs if r["phase"] == "grid" and (size is None or r["size"] == size)
                and (task is None or r["task"] == task) and (not ok or r["status"] == "ok")]


def _read(path: Path) -> list[Row]:
    if not path.is_file():
        raise SurveyError(f"{path.name} is missing from {path.parent}: run {MAKE_COMMAND}")
    try:
        with path.open(encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise SurveyError(f"{path} is not a readable CSV ({error}): run {MAKE_COMMAND}") from None


def load(folder: Path = LAB_DIR) -> LabResults:
    """Read every lab CSV; a missing or corrupt file is one line naming it and the command that makes it."""
    return LabResults(*(_read(folder / f"{name}.csv") for name in
                        ("runs", "curves", "memory", "pretraining", "timings")))


def chance(task: str) -> float:
    return 1 / len(LABEL_TOKENS[task])


def check_choice(value: str, options: Sequence[str], what: str) -> str:
    if value not in options:
        raise SurveyError(f"{what} {value!r} is not one of {', '.join(options)}")
    return value


# --- tables ----------------------------------------------------------------------------------------------------

def not_applicable(results: LabResults) -> list[dict[str, str]]:
    """Methods that did not run, with their one-line reason (chapter 09, "What ran")."""
    seen: dict[str, str] = {}
    for r in results.runs:
        if r["status"] != "ok" and r["method"] not in seen:
            seen[r["method"]] = r["status"].removeprefix("does not apply: ")
    return [{"method": m, "reason": reason} for m, reason in seen.items()]


def accuracy_table(results: LabResults, size: str) -> list[dict[str, Any]]:
    """One row per method at ``size``: % trainable, test accuracy per task, their mean, the chosen rate."""
    table = []
    for method in results.methods:
        rows = {r["task"]: r for r in results.grid(size) if r["method"] == method}
        if not rows:
            continue
        accuracies = [float(rows[t]["test_accuracy"]) for t in TASKS if t in rows]
        first = next(iter(rows.values()))
        table.append({"method": method, "chapter": first["chapter"][:2], "% trainable": float(first["trainable_pct"]),
                      **{t: float(rows[t]["test_accuracy"]) for t in TASKS if t in rows},
                      "mean": sum(accuracies) / len(accuracies), "lr": first["lr"]})
    return sorted(table, key=lambda row: -row["mean"])


def seed_spread(results: LabResults, method: str, task: str) -> float | None:
    """Max - min test accuracy over the seeds run for ``method`` on ``task`` (``None`` when only one seed)."""
    values = [float(r["test_accuracy"]) for r in results.runs if r["method"] == method and r["task"] == task
              and r["phase"] in ("grid", "seeds") and r["status"] == "ok" and r["size"] == _seed_size(results)
              and r["settings"] == ""]
    return max(values) - min(values) if len(values) > 1 else None


def _seed_size(results: LabResults) -> str:
    sizes = [r["size"] for r in results.runs if r["phase"] == "seeds"]
    return sizes[0] if sizes else ""


def noise_level(results: LabResults) -> float:
    """The largest seed spread over the seed runs: a difference smaller than this is not a finding."""
    spreads = [seed_spread(results, m, t) for m in dict.fromkeys(r["method"] for r in results.runs
                                                                   if r["phase"] == "seeds") for t in TASKS]
    values = [s for s in spreads if s is not None]
    if not values:
        raise SurveyError(f"runs.csv has no seed runs: run {MAKE_COMMAND}")
    return max(values)


def mean_noise_level(results: LabResults) -> float:
    """The seed noise of a mean over the tasks (what the findings compare): for each method run with several seeds,
    the max - min over seeds of its mean test accuracy over the tasks; the largest of these."""
    size = _seed_size(results)
    spreads = []
    for method in dict.fromkeys(r["method"] for r in results.runs if r["phase"] == "seeds"):
        by_seed: dict[str, list[float]] = {}
        for r in results.runs:
            if (r["method"] == method and r["size"] == size and r["phase"] in ("grid", "seeds")
                    and r["settings"] == "" and r["status"] == "ok"):
                by_seed.setdefault(r["seed"], []).append(float(r["test_accuracy"]))
        means = [sum(v) / len(v) for v in by_seed.values() if len(v) == len(TASKS)]
        if len(means) > 1:
            spreads.append(max(means) - min(means))
    if not spreads:
        raise SurveyError(f"runs.csv has no seed runs: run {MAKE_COMMAND}")
    return max(spreads)


def memory_errors(results: LabResults) -> dict[str, float]:
    """Estimate vs measured peak: median and worst absolute error (%), and how many pairs were compared."""
    errors = [abs(float(r["error_pct"])) for r in results.memory if r["error_pct"]]
    if not errors:
        raise SurveyError(f"memory.csv has no measured rows: run {MAKE_COMMAND}")
    return {"median": statistics.median(errors), "worst": max(errors), "pairs": len(errors)}


# --- findings --------------------------------------------------------------------------------------------------

def _mean_accuracy(results: LabResults, size: str, method: str) -> float | None:
    rows = [r for r in results.grid(size) if r["method"] == method]
    return sum(float(r["test_accuracy"]) for r in rows) / len(rows) if len(rows) == len(TASKS) else None


def _direction(difference: float, noise: float) -> str:
    """``supports`` when ``difference`` (oriented so that positive agrees with the claim) exceeds the noise,
    ``contradicts`` when it is below minus the noise, else ``cannot decide``."""
    if difference > noise:
        return "supports"
    return "contradicts" if difference < -noise else "cannot decide"


def _no_difference(spread: float, noise: float) -> str:
    """For a claim that something makes *no* difference: a spread beyond the noise contradicts it; within the
    noise it supports it only when the noise itself is small (:data:`RESOLUTION`)."""
    if spread > noise:
        return "contradicts"
    return "supports" if noise <= RESOLUTION else "cannot decide"


# Below this seed spread (in accuracy), "no difference beyond the noise" is evidence of no difference.
RESOLUTION = 0.05


def _forgetting_noise(results: LabResults) -> float:
    """The largest max - min of the forgetting (nats) over the seeds of one method and task."""
    size = _seed_size(results)
    spreads = []
    for method in dict.fromkeys(r["method"] for r in results.runs if r["phase"] == "seeds"):
        for task in TASKS:
            values = [float(r["forgetting_nats"]) for r in results.runs if r["method"] == method and r["task"] == task
                      and r["size"] == size and r["phase"] in ("grid", "seeds") and r["settings"] == ""
                      and r["status"] == "ok" and not r["forgetting_nats"].startswith("n/a")]
            if len(values) > 1:
                spreads.append(max(values) - min(values))
    return max(spreads, default=0.0)


def findings(results: LabResults) -> list[dict[str, str]]:
    """The findings table of chapter 09 ("Findings"): each row a claim from the surveys, the numbers the runs give
    and a verdict. Means are over the three tasks at the largest size unless a row says otherwise. A difference
    within the seed noise of such a mean (:func:`mean_noise_level`) is "cannot decide"; a claim of *no* difference
    is supported only when that noise is below :data:`RESOLUTION`."""
    noise = mean_noise_level(results)
    largest, smallest = results.sizes[-1], results.sizes[0]
    rows = []
    full = _mean_accuracy(results, largest, "full")
    peft = [(m, a) for m in results.methods if m != "full"
            for a in [_mean_accuracy(results, largest, m)] if a is not None]
    if full is not None and peft:
        median = statistics.median(a for _, a in peft)
        best_m, best_a = max(peft, key=lambda p: p[1])
        rows.append({
            "claim": "PEFT methods reach the accuracy of full fine-tuning while training a small fraction of the "
                     "parameters (Xu et al. 2023; Wang et al. 2024)",
            "numbers": f"{largest}: full {full:.3f}; median of {len(peft)} PEFT methods {median:.3f}; best "
                       f"({best_m}) {best_a:.3f}; seed noise {noise:.3f}",
            "verdict": "contradicts" if median - full < -noise else "supports" if median - full > noise
            else _no_difference(0.0, noise)})
    gaps = {}
    for size in results.sizes:
        f, p = _mean_accuracy(results, size, "full"), _mean_accuracy(results, size, "prompt_tuning")
        if f is not None and p is not None:
            gaps[size] = f - p
    if len(gaps) >= 2 and smallest in gaps and largest in gaps:
        rows.append({
            "claim": "Prompt tuning's gap to full fine-tuning shrinks as the model grows (Lester et al. 2021, "
                     "cited by all three surveys)",
            "numbers": "full - prompt tuning: " + ", ".join(f"{s} {g:+.3f}" for s, g in gaps.items())
                       + f"; seed noise {noise:.3f}",
            "verdict": _direction(gaps[smallest] - gaps[largest], noise)})
    lora = _mean_accuracy(results, largest, "lora")
    if lora is not None and full is not None:
        rows.append({
            "claim": "LoRA matches full fine-tuning (Hu et al. 2021, as summarised by Xu et al. and Lialin et al.)",
            "numbers": f"{largest}: LoRA {lora:.3f}, full {full:.3f}; seed noise {noise:.3f}",
            "verdict": "contradicts" if lora - full < -noise else "supports" if lora - full > noise
            else _no_difference(abs(lora - full), noise)})
        better = [m for m, a in peft if a - lora > noise]
        rows.append({
            "claim": "Methods reported to beat LoRA do not, under a small hyper-parameter budget (Lialin et al. "
                     "2023, second version)",
            "numbers": f"{largest}: {len(better)} of {len(peft) - 1} other PEFT methods beat LoRA by more than the "
                       f"seed noise ({noise:.3f})" + (f": {', '.join(better)}" if better else ""),
            "verdict": "contradicts" if better else _no_difference(0.0, noise)})
    ranks = [r for r in results.runs if r["method"] == "lora" and r["phase"] in ("ranks", "grid")
             and r["size"] == _seed_size(results) and r["seed"] == "0" and r["status"] == "ok"]
    by_rank: dict[str, list[float]] = {}
    for r in ranks:
        by_rank.setdefault(r["settings"] or "r=8", []).append(float(r["test_accuracy"]))
    means = {k: sum(v) / len(v) for k, v in by_rank.items() if len(v) == len(TASKS)}
    if len(means) >= 2:
        rows.append({
            "claim": "A small LoRA rank is enough; higher ranks add little (Hu et al. 2021, Table 6)",
            "numbers": f"{_seed_size(results)}: mean accuracy by rank " + ", ".join(
                f"{k} {v:.3f}" for k, v in sorted(means.items(), key=lambda kv: int(kv[0].split('=')[1])))
                + f"; seed noise {noise:.3f}",
            "verdict": _no_difference(max(means.values()) - min(means.values()), noise)})
    forgetting = {m: statistics.mean(float(r["forgetting_nats"]) for r in results.grid(largest)
                                     if r["method"] == m and not r["forgetting_nats"].startswith("n/a"))
                  for m in results.methods if any(r["method"] == m for r in results.grid(largest))}
    if "full" in forgetting and len(forgetting) > 1:
        peft_forgetting = statistics.median(v for m, v in forgetting.items() if m != "full")
        forgetting_noise = _forgetting_noise(results)
        rows.append({
            "claim": "Freezing the backbone limits forgetting of what pretraining taught (Wang et al. 2024; "
                     "Xu et al. 2023)",
            "numbers": f"{largest}: pretraining-loss increase, full {forgetting['full']:.3f} nats vs median PEFT "
                       f"{peft_forgetting:.3f} nats; seed noise {forgetting_noise:.3f} nats",
            "verdict": _direction(forgetting["full"] - peft_forgetting, forgetting_noise)})
    return rows


# --- plots -----------------------------------------------------------------------------------------------------

def _figure(figsize: tuple[float, float]) -> Any:
    import matplotlib.pyplot as plt

    with plt.ioff():
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


def chapter_colors(results: LabResults) -> dict[str, str]:
    chapters = sorted({r["chapter"] for r in results.runs})
    return {c: f"C{i % 10}" for i, c in enumerate(chapters)}


def plot_tradeoff(results: LabResults, task: str, size: str, methods: Sequence[str] | None = None) -> Any:
    """Test accuracy against % trainable (log scale), one dot per method, coloured by the chapter (family) that
    explains it; chance dashed. Chapter 09, "The trade-off"."""
    check_choice(task, TASKS, "task")
    check_choice(size, results.sizes, "size")
    fig, ax = _figure((7.5, 4))
    colors = chapter_colors(results)
    shown = [r for r in results.grid(size, task) if methods is None or r["method"] in methods]
    for chapter in sorted({r["chapter"] for r in shown}):
        own = [r for r in shown if r["chapter"] == chapter]
        ax.scatter([float(r["trainable_pct"]) for r in own], [float(r["test_accuracy"]) for r in own],
                   color=colors[chapter], label=chapter.replace("_", " "), s=28)
        for r in own:
            ax.annotate(r["method"], (float(r["trainable_pct"]), float(r["test_accuracy"])), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
    ax.axhline(chance(task), color="0.4", ls="--", lw=1, label=f"chance (1 in {len(LABEL_TOKENS[task])})")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the model)")
    ax.set_ylabel(f"{task}: test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{size}, {task}: data/lab/runs.csv (grid phase)", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_scale(results: LabResults, task: str, methods: Sequence[str] = SCALE_METHODS) -> Any:
    """Test accuracy against model parameters for a few methods (Lester et al.'s question). Chapter 09, "Scale"."""
    check_choice(task, TASKS, "task")
    fig, ax = _figure((6, 3.6))
    params = {r["size"]: int(r["parameters"]) for r in results.pretraining}
    for method in methods:
        rows = {r["size"]: r for r in results.grid(task=task) if r["method"] == method}
        sizes = [s for s in results.sizes if s in rows]
        ax.plot([params[s] for s in sizes], [float(rows[s]["test_accuracy"]) for s in sizes], "o-", label=method)
    ax.axhline(chance(task), color="0.4", ls="--", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel(f"{task}: test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("accuracy against model size (seed 0)", fontsize=9)
    return fig


def plot_ranks(results: LabResults) -> Any:
    """LoRA's test accuracy against its rank, one line per task. Chapter 09, "Rank"."""
    fig, ax = _figure((6, 3.4))
    size = _seed_size(results)
    for task in TASKS:
        rows = [r for r in results.runs if r["method"] == "lora" and r["task"] == task and r["size"] == size
                and r["seed"] == "0" and r["phase"] in ("grid", "ranks") and r["status"] == "ok"]
        points = sorted((int((r["settings"] or "r=8").split("=")[1]), float(r["test_accuracy"])) for r in rows)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=task)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LoRA rank r (r=8 is peft's default, from the grid)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"{size}: data/lab/runs.csv (ranks phase)", fontsize=9)
    return fig


def plot_memory(results: LabResults, size: str) -> Any:
    """Estimated against measured peak bytes of a training step, one dot per method; the diagonal is a perfect
    estimate. Chapter 09, "Memory"."""
    check_choice(size, results.sizes, "size")
    fig, ax = _figure((5.5, 4))
    rows = [r for r in results.memory if r["size"] == size and r["measured_bytes"]]
    measured = [int(r["measured_bytes"]) / 2**20 for r in rows]
    estimated = [int(r["estimated_bytes"]) / 2**20 for r in rows]
    ax.scatter(measured, estimated, s=20)
    for r, x, y in zip(rows, measured, estimated, strict=True):
        ax.annotate(r["method"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    if measured:
        low, high = min(measured + estimated) * 0.95, max(measured + estimated) * 1.05
        ax.plot([low, high], [low, high], color="0.4", lw=1, ls="--", label="estimate = measured")
    ax.set_xlabel("measured peak (MiB, real CPU step, tracked)")
    ax.set_ylabel("estimated peak (MiB)")
    ax.legend(fontsize=7)
    ax.set_title(f"{size}: data/lab/memory.csv", fontsize=9)
    return fig


def _per_method_mean(rows: Sequence[Row], column: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for r in rows:
        if r[column] and not r[column].startswith("n/a"):
            values.setdefault(r["method"], []).append(float(r[column]))
    return {m: sum(v) / len(v) for m, v in values.items()}


def plot_bars(results: LabResults, size: str, what: str) -> Any:
    """Per method, the mean over the tasks of ``what``: ``step_seconds`` (timings.csv) or ``forgetting``
    (runs.csv), sorted. Chapter 09, "Step time" and "Forgetting"."""
    check_choice(size, results.sizes, "size")
    if what == "step_seconds":
        rows = [r for r in results.timings if r["size"] == size and r["seed"] == "0" and r["settings"] == ""]
        chosen = {(r["method"], r["lr"]) for r in results.grid(size)}
        values = _per_method_mean([r for r in rows if (r["method"], r["lr"]) in chosen], "median_step_seconds")
        values = {m: v * 1000 for m, v in values.items()}
        label, source = "median step time (ms, one CPU thread)", "timings.csv"
    elif what == "forgetting":
        values = _per_method_mean(results.grid(size), "forgetting_nats")
        label, source = "pretraining loss increase (nats)", "runs.csv"
    else:
        raise SurveyError(f"what={what!r} is not 'step_seconds' or 'forgetting'")
    ordered = sorted(values.items(), key=lambda kv: kv[1])
    fig, ax = _figure((9, 3.2))
    ax.bar(range(len(ordered)), [v for _, v in ordered])
    ax.set_xticks(range(len(ordered)), [m for m, _ in ordered], rotation=70, fontsize=7)
    ax.set_ylabel(label)
    ax.set_title(f"{size}, mean over the tasks: data/lab/{source}", fontsize=9)
    return fig


def plot_curves(results: LabResults, size: str, task: str, methods: Sequence[str]) -> Any:
    """Training-loss curves of the grid runs of ``methods``. Chapter 09, "Training curves"."""
    check_choice(size, results.sizes, "size")
    check_choice(task, TASKS, "task")
    fig, ax = _figure((6, 3.4))
    rates = {r["method"]: r["lr"] for r in results.grid(size, task)}
    for method in methods:
        rows = [r for r in results.curves if r["size"] == size and r["task"] == task and r["method"] == method
                and r["seed"] == "0" and r["settings"] == "" and r["lr"] == rates.get(method)]
        ax.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.legend(fontsize=7)
    ax.set_title(f"{size}, {task}: data/lab/curves.csv", fontsize=9)
    return fig
