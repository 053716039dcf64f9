"""Every chapter executes headless with no error output (chapters join by existing in notebooks/)."""

from __future__ import annotations

import pytest

from survey_utils.notebooks import chapters, error_outputs, execute_chapter


def test_there_are_chapters() -> None:
    assert chapters(), "notebooks/ holds no chapter"


@pytest.mark.notebook
@pytest.mark.parametrize("path", chapters(), ids=[p.stem for p in chapters()])
def test_chapter_executes(path) -> None:
    notebook, seconds = execute_chapter(path)
    assert error_outputs(notebook) == []
    print(f"{path.stem}: {seconds:.1f} s")


def test_no_executed_notebooks_are_committed() -> None:
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], capture_output=True, text=True).stdout.split()
    assert tracked == []
