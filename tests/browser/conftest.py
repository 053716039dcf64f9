"""JupyterLab in a real browser: a lab server on a free port and Debian's chromium driven by Playwright.

The server runs from this venv on 127.0.0.1 with no token, in a temporary root that holds a copy of
``notebooks/`` (and a link to ``data/``), with temporary config, settings and workspace folders, so that
nothing a person has configured (or an old tab) changes what the test sees. ``lab_settings/overrides.json``
opens percent ``.py`` files with jupytext's "Jupytext Notebook" viewer, turns off the news and update
pop-ups (they cover the page) and attaches every cell to the DOM (no windowing).

Chromium is Debian's (``make browser-deps``), launched through ``executable_path``; Playwright downloads
nothing. If chromium or the server cannot be started, every browser test fails with the reason: the test
is never skipped, in CI or anywhere else.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SCREENSHOTS = HERE / "screenshots"
LAB_SETTINGS = HERE / "lab_settings"
# Another folder of chapters can be tested by pointing this variable at it.
CHAPTERS_DIR = Path(os.environ.get("BROWSER_CHAPTERS_DIR", REPO / "notebooks")).resolve()
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SERVER_START_TIMEOUT_S = 90


def chapter_paths() -> list[Path]:
    """Every chapter source (``NN_name.py``) in the chapters folder, in book order."""
    return sorted(CHAPTERS_DIR.glob("[0-9][0-9]_*.py"))


def chromium_executable() -> str:
    """``$CHROMIUM`` if set, else ``chromium`` on the PATH, else Debian's ``/usr/bin/chromium``."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabServer:
    url: str
    root: Path
    log: Path
    process: subprocess.Popen[bytes]

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_sessions(self) -> None:
        """Close every notebook session (and its kernel), so chapters do not share memory or CPU; raise
        ``RuntimeError`` if a kernel still runs afterwards."""
        for session in self.api("/api/sessions") or []:  # type: ignore[union-attr]
            self.api(f"/api/sessions/{session['id']}", method="DELETE")
        left = [kernel["id"] for kernel in self.api("/api/kernels") or []]  # type: ignore[union-attr]
        if left:
            raise RuntimeError(f"kernels still running after every session was closed: {left}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def copy_chapters(root: Path) -> None:
    """Copy the chapters folder into ``root/notebooks`` (no executed notebooks), as the lab's root holds it."""
    shutil.copytree(CHAPTERS_DIR, root / "notebooks",
                    ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints", "__pycache__"))
    # Chapters find data/ through the installed package; the link serves any relative path too.
    if (REPO / "data").is_dir():
        (root / "data").symlink_to(REPO / "data", target_is_directory=True)


def stray_notebooks(root: Path) -> list[str]:
    """Every ``.ipynb`` under the lab's root, checkpoints included: saving a chapter must write none."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.ipynb"))


def changes(original: bytes, saved: bytes, lines: int = 30) -> str:
    """The first lines of a unified diff from the repository's chapter to what was saved."""
    diff = difflib.unified_diff(original.decode(errors="replace").splitlines(True),
                                saved.decode(errors="replace").splitlines(True), "repository", "saved", n=0)
    return "".join(list(diff)[:lines])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and the kernels it started (they share its process group)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


class LabStartError(RuntimeError):
    """The lab server exited or did not answer in time; the message holds its log's tail."""


def start_lab_server(base: Path) -> LabServer:
    """A JupyterLab server on a free port, rooted in ``base/root`` with a copy of the chapters (see the module
    docstring); ``_stop(server.process)`` ends it. The browser test's fixture and
    ``benchmarks/browser_latency.py`` both start it here."""
    root, config, settings = base / "root", base / "config", base / "app_settings"
    root.mkdir()
    config.mkdir()
    shutil.copytree(LAB_SETTINGS, settings)
    copy_chapters(root)
    port = _free_port()
    log = base / "lab.log"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(base / "user_settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(base / "workspaces"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("JUPYTER_TOKEN", None)
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", "--ServerApp.token=",
               "--ServerApp.password=", "--ServerApp.open_browser=False", "--allow-root", "--no-browser",
               f"--LabApp.app_settings_dir={settings}", f"--LabApp.user_settings_dir={base / 'user_settings'}",
               f"--LabApp.workspaces_dir={base / 'workspaces'}", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               # LabServer.api's calls come without the page's _xsrf cookie: with the check on, every DELETE of a
               # session was refused (403) and each chapter's kernel kept running, ten of them by the last chapter
               "--ServerApp.disable_check_xsrf=True",
               # window.jupyterapp: the browser test reads the executed notebook (outputs and all) from the page
               "--LabApp.expose_app_in_browser=True"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}", root, log, process)
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise LabStartError(f"jupyter lab exited with code {process.returncode} before serving:\n"
                                f"{server.log_tail()}")
        try:
            server.api("/api/status")
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                _stop(process)
                raise LabStartError(f"jupyter lab did not answer /api/status within {SERVER_START_TIMEOUT_S} s:\n"
                                    f"{server.log_tail()}") from None
            time.sleep(0.3)


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    try:
        server = start_lab_server(tmp_path_factory.mktemp("jupyterlab"))
    except LabStartError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server
    finally:
        _stop(server.process)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Debian chromium; a failure to start it fails the test, with the way to fix it."""
    from playwright.sync_api import Error, sync_playwright

    executable = chromium_executable()
    manager = sync_playwright().start()
    try:
        try:
            chromium = manager.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=60_000)
        except Error as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            pytest.fail(f"could not start chromium at '{executable}' ({first}); install it with "
                        "`make browser-deps` (apt-get install chromium chromium-driver) or set $CHROMIUM",
                        pytrace=False)
        yield chromium
        chromium.close()
    finally:
        manager.stop()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """The git-ignored folder for screenshots and ``timings.json`` (seconds per chapter, this run)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / "timings.json").unlink(missing_ok=True)
    return SCREENSHOTS
