"""Execute the chapters: jupytext percent ``.py`` sources -> executed ``.ipynb`` (``make figures``).

The ``.py`` files in ``notebooks/`` are the source of truth; executed notebooks are build products written
to ``_build/notebooks`` and never committed. Tests execute each chapter with :func:`execute_chapter`.
"""

from __future__ import annotations

import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

from survey_utils.errors import SurveyError

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# The chapters carry no jupytext header (so saving one in JupyterLab changes no byte); the executed
# notebooks get the kernel they ran on, so that Jupyter opens them without asking.
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (PEFT companion)", "language": "python"}


def chapters() -> list[Path]:
    """The chapter sources, in book order (``00_preliminaries.py`` ... ``08_fine_tuning_lab.py``)."""
    return sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


def find_chapter(name: str) -> Path:
    for path in chapters():
        if path.stem == name or path.stem.startswith(f"{name}_") or path.name == name:
            return path
    raise SurveyError(f"unknown chapter '{name}'; chapters: {', '.join(p.stem for p in chapters())}")


def execute_chapter(path: str | Path, timeout: int = 300) -> tuple[nbformat.NotebookNode, float]:
    """Run every cell of a chapter in a fresh kernel, in the notebooks folder; return it and the seconds."""
    path = Path(path)
    notebook = jupytext.read(path)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    return notebook, time.perf_counter() - start


def error_outputs(notebook: nbformat.NotebookNode) -> list[str]:
    """Every error output of an executed notebook, as ``ename: evalue`` lines."""
    return [f"{out.get('ename')}: {out.get('evalue')}" for cell in notebook.cells
            for out in cell.get("outputs", []) if out.get("output_type") == "error"]


def build_all(out_dir: str | Path, only: list[str] | None = None) -> dict[str, float]:
    """Execute the chapters into ``out_dir``; return seconds per chapter."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [find_chapter(name) for name in only] if only else chapters()
    timings: dict[str, float] = {}
    for path in tqdm(paths, desc="chapters", unit="chapter"):
        notebook, seconds = execute_chapter(path)
        nbformat.write(notebook, out / f"{path.stem}.ipynb")
        timings[path.stem] = seconds
        tqdm.write(f"{path.stem}: {seconds:.1f} s")
    return timings
