"""Every chapter, in JupyterLab, in headless chromium: open it, run all cells, move a slider, see the plot redraw.

For each ``notebooks/NN_name.py`` (new chapters join by existing) the test

1. opens ``/lab/tree/notebooks/NN_name.py?reset``, which jupytext's extension shows as a notebook;
2. runs Run > Run All Cells from the menu and waits until every code cell has run (or one failed), then reads
   the executed notebook from the page (``window.jupyterapp``) and asserts what the headless build needs:
   every code cell ran and ``survey_utils.notebooks.error_outputs`` finds no error output in it. This is the
   chapters' one execution in ``make test``: ``tests/test_notebooks.py`` used to run each chapter a second
   time headless (nbclient) for the same check, 220 s of CPU on the two cores; it now runs the headless path
   on a probe notebook;
3. takes the first ipympl figure that follows a slider, waits until it has drawn, screenshots it;
4. focuses the slider's handle and presses ArrowRight (ArrowLeft when it is at its maximum): sliders
   with ``continuous_update=False`` send the value on a keyboard change;
5. waits for the figure to redraw, screenshots it again and asserts that its pixels changed;
6. asserts that nothing is an error: no traceback in a cell, no widget that failed to render, no
   traceback from a widget callback (JupyterLab shows those in its log console), no dead kernel, no
   JavaScript error on the page.
7. saves the notebook (File > Save Notebook), waits for the file to be written, and asserts that the
   chapter in the lab's root is byte-identical to the repository's and that no ``.ipynb`` appeared:
   reading a chapter in JupyterLab must leave a clone unmodified.

Screenshots (``NN_name-before.png``, ``-after.png``, ``-page.png``) go to ``tests/browser/screenshots/``
(git-ignored) for a person to look at, with ``timings.json``: the seconds per chapter of this run (also in
each test's ``browser_seconds`` property, e.g. in ``--junitxml``) and its outcome. Every explorer of the
chapter (an ipympl figure in a box with an enabled slider) is also shot before and after one keyboard step of
its first slider (``NN_name-explorerK-before.png`` / ``-after.png``); the outcome lists, per explorer, the
slider, its values and whether the pixels changed.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from PIL import Image, ImageChops

from survey_utils.notebooks import error_outputs
from tests.browser.conftest import CHAPTERS_DIR, LabServer, changes, chapter_paths, stray_notebooks

CHAPTERS = chapter_paths()
RUN_TIMEOUT_S = 180        # a chapter ran in 12-28 s headless under make test; the browser adds kernel start and
                           # rendering
REDRAW_TIMEOUT_S = 30
SAVE_TIMEOUT_S = 30
SLIDER_HANDLE = ".widget-slider .noUi-handle"
FIGURE = ".jupyter-matplotlib-canvas-div"
FIGURE_CANVAS = "canvas"   # the first canvas of the figure holds the image; the second is the zoom rubber band
MIN_COLOURS_DRAWN = 16     # a blank canvas has 1 colour; a drawn plot has antialiased text and lines
ERROR_TEXTS = ("Traceback (most recent call last)", "Error displaying widget", "Failed to display model",
               "Could not create a view", "Model not found", "Error rendering output item")

pytestmark = [pytest.mark.browser, pytest.mark.xdist_group("browser")]


def test_there_are_chapters() -> None:
    assert CHAPTERS, f"no chapter (NN_name.py) in {CHAPTERS_DIR}: the browser test has nothing to open"


# Marks the first slider handle that has an ipympl figure after it in the page, and that figure.
_MARK_SLIDER_AND_FIGURE = """([handleSel, figureSel]) => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const figures = [...panel.querySelectorAll(figureSel)];
  for (const handle of panel.querySelectorAll(handleSel)) {
    const figure = figures.find(f => handle.compareDocumentPosition(f) & Node.DOCUMENT_POSITION_FOLLOWING);
    if (figure) {
      handle.setAttribute('data-browser-test', 'slider');
      figure.setAttribute('data-browser-test', 'figure');
      const slider = handle.closest('.widget-slider');
      return {description: (slider.querySelector('.widget-label')?.textContent || '').trim(),
              sliders: panel.querySelectorAll(handleSel).length, figures: figures.length};
    }
  }
  return {sliders: panel.querySelectorAll(handleSel).length, figures: figures.length};
}"""

_CELL_STATE = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')]
      .map(p => p.textContent.trim());
  const errors = panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"], '
      + '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"]').length;
  return {prompts, errors};
}"""

# The kernel has started (the toolbar names it) and is idle.
_KERNEL_READY = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const name = panel?.querySelector('.jp-KernelName')?.textContent.trim();
  const status = panel?.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status');
  return name && name !== 'No Kernel' && status === 'idle';
}"""

# The notebook as JupyterLab holds it after the run (nbformat JSON: outputs and execution counts included).
_NOTEBOOK_JSON = """(path) => {
  for (const widget of window.jupyterapp.shell.widgets('main')) {
    if (widget.context && widget.context.path === path) return widget.context.model.toJSON();
  }
  return null;
}"""

_KERNEL_STATUS = """() => document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator')
    ?.getAttribute('data-status')"""

_OUTPUT_TEXTS = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  return [...panel.querySelectorAll('.jp-OutputArea-output')].map(o => ({
    mime: o.getAttribute('data-mime-type') || '', text: o.innerText}));
}"""


# Marks every explorer: each ipympl figure whose nearest enclosing box (the explorer's VBox) holds an enabled
# slider, with that slider. Returns the sliders' labels, in page order.
_MARK_EXPLORERS = """([handleSel, figureSel]) => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const labels = [];
  for (const figure of panel.querySelectorAll(figureSel)) {
    let box = figure.parentElement;
    while (box && box !== panel && !(box.classList.contains('widget-vbox') && box.querySelector(handleSel))) {
      box = box.parentElement;
    }
    if (!box || box === panel) continue;
    const handle = [...box.querySelectorAll(handleSel)].find(h => {
      const slider = h.closest('.widget-slider');
      return !slider.classList.contains('mod-disabled') && !slider.querySelector('.noUi-target[disabled]');
    });
    if (!handle) continue;
    figure.setAttribute('data-explorer', String(labels.length));
    handle.setAttribute('data-explorer-slider', String(labels.length));
    labels.push((handle.closest('.widget-slider').querySelector('.widget-label')?.textContent || '').trim());
  }
  return labels;
}"""


def _readout(page, selector: str) -> str:
    return page.evaluate("""(sel) => {
      const h = document.querySelector(sel);
      const r = h && h.closest('.widget-slider').querySelector('.widget-readout');
      return r ? r.textContent.trim() : '';
    }""", selector)


def _after_change(figure: Any, before: Any, path: Path, name: str) -> Any:
    """The figure's screenshot once it differs from ``before`` and is drawn (or after REDRAW_TIMEOUT_S)."""
    deadline = time.monotonic() + REDRAW_TIMEOUT_S
    after = _screenshot(figure, path)
    while not _differs(before, after) and time.monotonic() < deadline:
        time.sleep(0.25)
        after = _screenshot(figure, path)
    return _wait_drawn(figure, path, name) if _differs(before, after) else after


def _shoot_explorers(page, screenshots: Path, name: str) -> list[str]:
    """Every explorer's figure before and after one keyboard step of its first enabled slider, as
    ``NN_name-explorerK-before.png`` / ``-after.png``, for a person to look at; one line per explorer."""
    lines = []
    for k, label in enumerate(page.evaluate(_MARK_EXPLORERS, [SLIDER_HANDLE, FIGURE])):
        handle_sel = f'[data-explorer-slider="{k}"]'
        figure = page.locator(f'[data-explorer="{k}"]').locator(FIGURE_CANVAS).first
        figure.scroll_into_view_if_needed()
        before = _wait_drawn(figure, screenshots / f"{name}-explorer{k}-before.png", name)
        value_before = _readout(page, handle_sel)
        page.locator(handle_sel).focus()
        for key in ("ArrowRight", "ArrowLeft"):
            page.locator(handle_sel).press(key)
            if _readout(page, handle_sel) != value_before:
                break
        after = _after_change(figure, before, screenshots / f"{name}-explorer{k}-after.png", name)
        outcome = "pixels changed" if _differs(before, after) else "PIXELS UNCHANGED"
        lines.append(f"explorer {k}: '{label}' {value_before} -> {_readout(page, handle_sel)}: {outcome}")
    return lines


def _slider_readout(page) -> str:
    return page.evaluate("""() => {
      const h = document.querySelector('[data-browser-test="slider"]');
      const r = h && h.closest('.widget-slider').querySelector('.widget-readout');
      return r ? r.textContent.trim() : '';
    }""")


def _wait_until_run(page, name: str) -> list[str]:
    """Poll the input prompts until no cell is queued or running and every cell ran (or one failed)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    state: dict = {}
    while time.monotonic() < deadline:
        state = page.evaluate(_CELL_STATE)
        prompts = state["prompts"]
        busy = any("*" in p for p in prompts)
        all_ran = bool(prompts) and all(re.search(r"\d", p) for p in prompts)
        if not busy and (all_ran or state["errors"]):
            return prompts
        time.sleep(0.25)
    pytest.fail(f"{name}: cells still running or not run after {RUN_TIMEOUT_S} s; prompts {state.get('prompts')}",
                pytrace=False)


def _screenshot(locator, path: Path) -> Image.Image:
    locator.screenshot(path=str(path), animations="disabled")
    return Image.open(path).convert("RGB")


def _differs(a: Image.Image, b: Image.Image) -> bool:
    return a.size != b.size or ImageChops.difference(a, b).getbbox() is not None


def _wait_drawn(locator, path: Path, name: str) -> Image.Image:
    """The figure once it has drawn (more than one colour) and two shots 0.5 s apart are the same."""
    deadline = time.monotonic() + REDRAW_TIMEOUT_S
    previous = _screenshot(locator, path)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = _screenshot(locator, path)
        drawn = len(current.getcolors(maxcolors=1 << 20) or []) >= MIN_COLOURS_DRAWN
        if drawn and not _differs(previous, current):
            return current
        previous = current
    pytest.fail(f"{name}: the ipympl figure did not settle on a drawing within {REDRAW_TIMEOUT_S} s", pytrace=False)


def _brief(text: str, lines: int = 6) -> str:
    """The first line and the last lines of an output (a traceback ends with the exception)."""
    rows = [r for r in text.strip().splitlines() if r.strip() and set(r.strip()) != {"-"}]
    return "\n    ".join(rows if len(rows) <= lines + 1 else [rows[0], "...", *rows[-lines:]])


def _record_time(screenshots: Path, name: str, seconds: dict[str, float | str]) -> None:
    path = screenshots / "timings.json"
    timings = json.loads(path.read_text()) if path.is_file() else {}
    timings[name] = seconds
    path.write_text(json.dumps(timings, indent=1) + "\n")


def _wait_idle(page, seconds: float = 30) -> str:
    """The kernel's status once it is no longer busy (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    status = page.evaluate(_KERNEL_STATUS)
    while status in ("busy", "starting", "initializing", "restarting") and time.monotonic() < deadline:
        time.sleep(0.25)
        status = page.evaluate(_KERNEL_STATUS)
    return status


def _log_console_entries(page) -> list[str]:
    """What the kernel printed outside any cell (widget callbacks): JupyterLab puts it in the log console."""
    item = page.locator(".jp-LogConsoleStatusItem")
    if item.count() == 0 or not re.search(r"[1-9]", item.first.inner_text()):
        return []
    item.first.click()
    page.wait_for_selector(".jp-LogConsolePanel", timeout=10_000)
    time.sleep(0.5)
    return page.evaluate("""() => [...document.querySelectorAll('.jp-LogConsolePanel .jp-OutputArea-output')]
        .map(o => o.innerText)""")


def _errors_on_page(page, server_log: str) -> list[str]:
    problems = []
    for output in page.evaluate(_OUTPUT_TEXTS):
        text = output["text"]
        hit = next((e for e in ERROR_TEXTS if e in text), None)
        if hit or output["mime"] == "application/vnd.jupyter.error":
            problems.append(f"[{output['mime'] or 'output'}] {_brief(text)}")
    status = _wait_idle(page)
    if status != "idle":
        problems.append(f"kernel status after the run: {status}")
    for entry in _log_console_entries(page):
        if any(e in entry for e in ERROR_TEXTS):
            problems.append(f"[log console, from a widget callback] {_brief(entry)}")
    if "Traceback" in server_log:
        problems.append("the server log holds a traceback:\n" + server_log[-1500:])
    return problems


def _executed_notebook(page, path: str, name: str) -> nbformat.NotebookNode:
    """The chapter's notebook as the page holds it after Run All, for the checks the headless build relies on."""
    content = page.evaluate(_NOTEBOOK_JSON, path)
    if content is None:
        pytest.fail(f"{name}: no notebook widget for {path} in window.jupyterapp's main area", pytrace=False)
    return nbformat.from_dict(content)


def _save_and_wait(page, saved: Path, name: str) -> None:
    """File > Save Notebook, then wait until the file on disk is rewritten and the tab is no longer dirty."""
    before = saved.stat().st_mtime_ns
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^File$")).click()
    page.locator(".lm-Menu-item[data-command='docmanager:save']").click()
    deadline = time.monotonic() + SAVE_TIMEOUT_S
    while time.monotonic() < deadline:
        dirty = page.locator(".lm-TabBar-tab.jp-mod-current.jp-mod-dirty").count()
        if saved.stat().st_mtime_ns != before and not dirty:
            return
        time.sleep(0.25)
    pytest.fail(f"{name}: File > Save Notebook did not rewrite {saved} within {SAVE_TIMEOUT_S} s", pytrace=False)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_in_browser(chapter: Path, lab_server: LabServer, browser, screenshots: Path,
                            record_property) -> None:
    name = chapter.stem
    for old in screenshots.glob(f"{name}-*.png"):
        old.unlink()
    log_start = lab_server.log.stat().st_size
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    start = time.perf_counter()
    run_s, outcome = float("nan"), "failed"
    try:
        page.goto(f"{lab_server.url}/lab/tree/notebooks/{chapter.name}?reset", wait_until="domcontentloaded")
        page.wait_for_selector(".jp-Document.jp-NotebookPanel, .jp-Document.jp-FileEditor", timeout=90_000)
        if page.locator(".jp-NotebookPanel").count() == 0:
            page.screenshot(path=str(screenshots / f"{name}-page.png"))
            pytest.fail(f"{name}: JupyterLab opened the chapter as a text file, not with jupytext's notebook "
                        "viewer (see lab_settings/overrides.json defaultViewers)", pytrace=False)
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
        page.wait_for_function(_KERNEL_READY, timeout=90_000)

        page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
        prompts = _wait_until_run(page, name)
        _wait_idle(page)
        run_s = time.perf_counter() - start
        executed = _executed_notebook(page, f"notebooks/{chapter.name}", name)
        code = [c for c in executed.cells if c.cell_type == "code"]
        assert code, f"{name}: the notebook on the page has no code cell"
        assert error_outputs(executed) == [], f"{name}: error outputs after Run All: {error_outputs(executed)}"
        not_run = [i for i, c in enumerate(code) if c.get("execution_count") is None]
        assert not not_run, f"{name}: code cells {not_run} of {len(code)} did not run; prompts {prompts}"

        found = page.evaluate(_MARK_SLIDER_AND_FIGURE, [SLIDER_HANDLE, FIGURE])
        if "description" not in found:
            page.screenshot(path=str(screenshots / f"{name}-page.png"), full_page=True)
            problems = _errors_on_page(page, "")
            pytest.fail(f"{name}: no ipympl figure after a slider ({found['sliders']} slider handles, "
                        f"{found['figures']} ipympl figures; every chapter needs one); prompts {prompts}; "
                        f"errors: {problems or 'none'}", pytrace=False)
        slider = page.locator('[data-browser-test="slider"]')
        figure = page.locator('[data-browser-test="figure"]').locator(FIGURE_CANVAS).first
        figure.scroll_into_view_if_needed()
        before = _wait_drawn(figure, screenshots / f"{name}-before.png", name)

        value_before = _slider_readout(page)
        slider.focus()
        for key in ("ArrowRight", "ArrowLeft"):
            for _ in range(3):
                slider.press(key)
            if _slider_readout(page) != value_before:
                break
        value_after = _slider_readout(page)
        assert value_after != value_before, (
            f"{name}: slider '{found['description']}' did not move by keyboard (readout {value_before!r})")

        after_path = screenshots / f"{name}-after.png"
        after = _after_change(figure, before, after_path, name)
        explorers = _shoot_explorers(page, screenshots, name)
        page.screenshot(path=str(screenshots / f"{name}-page.png"), full_page=True)

        server_log = lab_server.log.read_bytes()[log_start:].decode(errors="replace")
        problems = _errors_on_page(page, server_log) + [f"page error: {e}" for e in page_errors]
        assert not problems, f"{name}: errors on the page:\n" + "\n".join(problems)
        assert _differs(before, after), (
            f"{name}: moving slider '{found['description']}' from {value_before} to {value_after} did not "
            f"change the figure's pixels within {REDRAW_TIMEOUT_S} s (see {after_path})")

        saved = lab_server.root / "notebooks" / chapter.name
        _save_and_wait(page, saved, name)
        original = chapter.read_bytes()
        assert saved.read_bytes() == original, (
            f"{name}: saving the chapter in JupyterLab changed its .py:\n{changes(original, saved.read_bytes())}")
        assert stray_notebooks(lab_server.root) == [], f"{name}: saving wrote a notebook next to the chapter"
        changed = ImageChops.difference(before, after).getbbox()
        outcome = (f"passed: slider '{found['description']}' {value_before} -> {value_after}, "
                   f"pixels changed in box {changed}; saved byte-identical; " + "; ".join(explorers))
    finally:
        total_s = time.perf_counter() - start
        record_property("browser_seconds", round(total_s, 1))
        _record_time(screenshots, name, {"open_and_run_all_s": round(run_s, 1), "total_s": round(total_s, 1),
                                         "outcome": outcome})
        page.close()
        try:
            lab_server.shutdown_sessions()
            kernel_left = None
        except (OSError, RuntimeError) as error:
            kernel_left = f"{type(error).__name__}: {error}"
    # only reached when the test passed: a kernel left running would share the CPU with the next chapters
    assert kernel_left is None, f"{name}: could not shut the chapter's kernel down ({kernel_left})"
