"""Opening and saving a chapter changes no byte of it, without a browser (the browser test checks it too).

JupyterLab saves a chapter through jupytext's contents manager, with the running kernel's name, display name
and language info in the notebook metadata, and outputs and execution counts in its cells. The chapters
carry no jupytext header, so jupytext reads them with ``notebook_metadata_filter`` and
``cell_metadata_filter`` set to ``-all`` and writes none of that back (no kernel name, no jupytext version),
and nothing pairs them with an ``.ipynb``. These tests save every chapter the way the lab does, into a copy
of the lab's root, and convert it to ``.ipynb`` and back with the jupytext command line.
"""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from jupytext.async_contentsmanager import AsyncTextFileContentsManager
from jupytext.cli import jupytext as jupytext_cli

from tests.browser.conftest import REPO, changes, chapter_paths, copy_chapters, stray_notebooks

CHAPTERS = chapter_paths()
# What a kernel other than the one the chapters were written with puts in the notebook metadata.
OTHER_KERNEL = {"display_name": "Python 3 (some other name)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "nbconvert_exporter": "python",
                 "pygments_lexer": "ipython3", "version": "3.11.2"}


async def _open_run_and_save(root: Path, path: str) -> None:
    manager = AsyncTextFileContentsManager(root_dir=str(root))
    notebook = (await manager.get(path))["content"]
    notebook.metadata["kernelspec"] = OTHER_KERNEL
    notebook.metadata["language_info"] = LANGUAGE_INFO
    for count, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        cell.execution_count = count + 1
        cell.outputs = [{"output_type": "stream", "name": "stdout", "text": "ran\n"}]
        cell.metadata["scrolled"] = True
    await manager.save({"type": "notebook", "content": notebook}, path)


@pytest.mark.parametrize("lab_root", ["chapters-only", "repository"])
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_saving_in_jupyterlab_changes_no_byte(chapter: Path, lab_root: str, tmp_path: Path) -> None:
    """As in the browser test's root (no jupytext config in it), and in a lab started at the repository's
    root, where jupytext reads ``pyproject.toml``'s ``[tool.jupytext]``."""
    copy_chapters(tmp_path)
    if lab_root == "repository":
        shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = f"notebooks/{chapter.name}"
    # In a thread of its own: in one pytest process with the browser test, Playwright's loop is running here.
    with ThreadPoolExecutor(max_workers=1) as thread:
        thread.submit(asyncio.run, _open_run_and_save(tmp_path, path)).result()
    saved = (tmp_path / path).read_bytes()
    assert saved == chapter.read_bytes(), (
        f"saving {chapter.name} through jupytext's contents manager changed it:\n"
        f"{changes(chapter.read_bytes(), saved)}")
    assert stray_notebooks(tmp_path) == []


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_ipynb_round_trip_is_byte_identical(chapter: Path, tmp_path: Path) -> None:
    """``jupytext --to ipynb`` then ``--to py:percent`` gives back the chapter, byte for byte."""
    ipynb, back = tmp_path / f"{chapter.stem}.ipynb", tmp_path / chapter.name
    assert jupytext_cli(["--quiet", "--to", "ipynb", "-o", str(ipynb), str(chapter)]) == 0
    assert jupytext_cli(["--quiet", "--to", "py:percent", "-o", str(back), str(ipynb)]) == 0
    assert back.read_bytes() == chapter.read_bytes(), (
        f"{chapter.name} -> .ipynb -> .py changed it:\n{changes(chapter.read_bytes(), back.read_bytes())}")

