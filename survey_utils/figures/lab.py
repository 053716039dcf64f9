"""The fine-tuning lab's figure: test accuracy against % trainable on each task (chapter 09's central plot).

Drawn from the committed ``data/lab/runs.csv`` (``make lab-results`` makes it); the figure trains nothing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from survey_utils.errors import SurveyError
from survey_utils.experiments import ch09_lab as lab
from survey_utils.figures.base import FigureUnavailable, figure
from survey_utils.lab.tasks import LABEL_TOKENS, TASKS
from survey_utils.plotting import save_figure


@figure("lab_tradeoff", title="The lab: test accuracy against % trainable, every method, three tasks",
        shows="for the largest lab model, each method's test accuracy (grid phase: seed 0, its chosen learning "
              "rate) against its % trainable parameters, one panel per task, coloured by the chapter that "
              "explains the method; chance dashed",
        source="data/lab/runs.csv (python -m survey_utils.lab results)",
        survey_counterpart="Xu et al. 2023, Sec. 6 (accuracy and memory of eleven methods); Lialin et al. 2023 v2 "
                           "(fifteen methods under a small hyper-parameter budget)")
def lab_tradeoff(out_dir: Path) -> list[Path]:
    try:
        results = lab.load()
    except SurveyError as error:
        raise FigureUnavailable(str(error)) from None
    fig = tradeoff_figure(results)
    paths = save_figure(fig, out_dir, "lab_tradeoff", dpi=110)
    plt.close(fig)
    return paths


def tradeoff_figure(results: lab.LabResults) -> Figure:
    """One panel per task: the largest size's grid rows, test accuracy against % trainable."""
    size = results.sizes[-1]
    colors = lab.chapter_colors(results)
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 4.2), sharey=True, layout="constrained")
    for ax, task in zip(axes, TASKS, strict=True):
        rows = results.grid(size, task)
        for chapter in sorted({r["chapter"] for r in rows}):
            own = [r for r in rows if r["chapter"] == chapter]
            ax.scatter([float(r["trainable_pct"]) for r in own], [float(r["test_accuracy"]) for r in own], s=22,
                       color=colors[chapter], label=chapter.replace("_", " "))
            for r in own:
                ax.annotate(r["method"], (float(r["trainable_pct"]), float(r["test_accuracy"])), fontsize=5,
                            xytext=(2, 2), textcoords="offset points")
        ax.axhline(lab.chance(task), color="0.4", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("trainable parameters (% of the model)")
        ax.set_title(f"{task} (chance 1 in {len(LABEL_TOKENS[task])})", fontsize=9)
    axes[0].set_ylabel(f"test accuracy, {size}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right center")
    return fig
