"""The chapters and the headless build that executes them (``make notebooks``: ``survey_utils.notebooks``).

Every chapter is executed once in ``make test``, in JupyterLab (``tests/browser/test_chapters_in_browser.py``):
every code cell must run and ``error_outputs`` must find nothing in the notebook the page holds afterwards. This
file used to execute each chapter a second time headless (nbclient) for that same check, 220 s of CPU per run
on the two cores; it now runs the headless path itself on a probe chapter that does what chapters do (a widget
backend, an ipywidgets slider beside an ipympl figure, an import of ``survey_utils``).
"""

from __future__ import annotations

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from survey_utils.notebooks import KERNELSPEC, chapters, error_outputs, execute_chapter

PROBE = '''# %% [markdown]
# A probe chapter: what the chapters do, in two cells.

# %%
# %matplotlib widget
import ipywidgets as widgets
import matplotlib.pyplot as plt

from survey_utils.notebooks import chapters

# %%
fig, ax = plt.subplots()
ax.plot(range(len(chapters())))
slider = widgets.IntSlider(value=len(chapters()), continuous_update=False)
display(widgets.VBox([slider, fig.canvas]))
print("chapters", slider.value)
'''


def test_there_are_chapters() -> None:
    assert chapters(), "notebooks/ holds no chapter"


@pytest.mark.notebook
def test_the_headless_build_executes_a_chapter(tmp_path) -> None:
    probe = tmp_path / "99_probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    notebook, seconds = execute_chapter(probe)
    assert error_outputs(notebook) == []
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == [1, 2]
    outputs = code[1].outputs
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
    assert any(o.get("text") == f"chapters {len(chapters())}\n" for o in outputs), outputs
    assert notebook.metadata["kernelspec"] == KERNELSPEC
    print(f"probe: {seconds:.1f} s")


@pytest.mark.notebook
def test_the_headless_build_stops_at_an_error(tmp_path) -> None:
    probe = tmp_path / "99_probe.py"
    probe.write_text('# %%\nraise ValueError("the probe fails here")\n', encoding="utf-8")
    with pytest.raises(CellExecutionError, match="the probe fails here"):
        execute_chapter(probe)


def test_error_outputs_lists_each_error_output() -> None:
    """What the browser test applies to each executed chapter finds an error output, and only that."""
    new = nbformat.v4
    notebook = new.new_notebook(cells=[
        new.new_code_cell("print(1)", outputs=[new.new_output("stream", name="stderr", text="a warning\n")]),
        new.new_code_cell("1 / 0", outputs=[new.new_output("error", ename="ZeroDivisionError",
                                                           evalue="division by zero", traceback=[])]),
        new.new_markdown_cell("text"),
    ])
    assert error_outputs(notebook) == ["ZeroDivisionError: division by zero"]
    assert error_outputs(new.new_notebook(cells=notebook.cells[:1])) == []


def test_no_executed_notebooks_are_committed() -> None:
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], capture_output=True, text=True).stdout.split()
    assert tracked == []
