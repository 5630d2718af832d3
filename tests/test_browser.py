"""The alpha slider in a real browser: JupyterLab on localhost, headless Chromium, Run All, move the
slider, and check that the explorer redraws for the new alpha (training its merger on demand).

Needs Debian's `chromium` (`make system-deps` installs it where apt works); skipped with a message
where /usr/bin/chromium is absent. Playwright drives it: `playwright install` cannot download
browsers here, so Playwright launches /usr/bin/chromium itself.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from afs_kit.reports import NOTEBOOKS_DIR
from afs_kit.studies import open_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason="the browser test needs Debian's chromium at /usr/bin/chromium "
                       "(`make system-deps` or `apt-get install -y chromium chromium-driver`); not installed here"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a free localhost port, serving a copy of the alpha notebook over a trained smoke run."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root = tmp_path_factory.mktemp("lab")
    run_dir = root / "run"
    # trained extractors beforehand, so Run All only trains the small mergers and the slider answers fast
    open_run("smoke", run_dir, device="cpu", progress=False).train_extractors()
    # papermill's own injection (an "injected-parameters" cell after the `parameters` cell), not executed
    source = load_notebook_node(str(NOTEBOOKS_DIR / "04_merger_alpha.ipynb"))
    nb = parameterize_notebook(source, {"PRESET": "smoke", "RUN_DIR": str(run_dir), "DEVICE": "cpu",
                                        "ALPHAS": [0.5], "N_EVAL": 50, "INTERACTIVE": True})
    nbformat.write(nb, str(root / "alpha.ipynb"))

    port, token = _free_port(), secrets.token_hex(16)
    home = root / "home"
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           f"--LabApp.workspaces_dir={home / 'workspaces'}", f"--LabApp.user_settings_dir={home / 'settings'}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = root / "jupyter.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                start_new_session=True)
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log)
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "root": root, "run": run_dir, "log": log}
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started: the server and its kernels
            proc.wait(timeout=15)


def _explorer_text(page) -> str:
    """The text the alpha explorer printed (its Output widget), '' while there is none."""
    return page.evaluate("""() => [...document.querySelectorAll('.jupyter-widgets .jp-OutputArea-output pre')]
                                  .map(e => e.textContent).join('\\n')""")


def _explorer_images(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.jupyter-widgets .jp-OutputArea-output img')]
                                  .map(e => e.getAttribute('src'))""")


def _wait(page, predicate, what: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        page.wait_for_timeout(250)
    errors = page.evaluate("""() => [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type*="error"],'
                                     + ' .jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')]
                                     .map(e => e.textContent).join('\\n')""")
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; notebook errors/stderr:\n"
                         f"{errors[-3000:]}\nserver log:\n{log.read_text()[-2000:]}")


def test_alpha_slider_redraws_in_a_real_browser(lab):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright's Python package")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab['url']}/lab/tree/alpha.ipynb?reset&token={lab['token']}")
            # the app is exposed (expose_app_in_browser): wait for it, the notebook and an idle kernel
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
                                   " === 'idle'", timeout=60_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")

            _wait(page, lambda: "alpha=0.5:" in _explorer_text(page), "the explorer's first drawing (alpha=0.5)",
                  lab["log"], 90)
            handle = page.locator(".jupyter-widgets .widget-slider .noUi-handle").first
            handle.wait_for(state="visible", timeout=10_000)
            readout = page.locator(".jupyter-widgets .widget-slider .widget-readout").first
            assert readout.text_content().strip() == "0.50"
            before = _explorer_images(page)
            assert len(before) == 2, f"the explorer draws two figures, found {len(before)}"

            trained = open_run("smoke", lab["run"], device="cpu", progress=False).merger_names()
            assert not any("-alpha-0.6-" in n for n in trained), "alpha 0.6 must be new to the run"
            handle.focus()
            page.keyboard.press("ArrowRight")  # one step of 0.1: alpha 0.6 has no merger yet, so it trains
            _wait(page, lambda: "alpha=0.6:" in _explorer_text(page), "the redraw at alpha=0.6", lab["log"], 90)
            _wait(page, lambda: len(_explorer_images(page)) == 2 and _explorer_images(page) != before,
                  "the redrawn figures", lab["log"], 30)
            text = _explorer_text(page)
            assert "alpha=0.5:" not in text, "the output must be redrawn, not appended to"
            assert "clean" in text and "PGD-10" in text and "importance ratio" in text
        finally:
            browser.close()
    # the new setting was trained on demand and is now cached on disk
    run = open_run("smoke", lab["run"], device="cpu", progress=False)
    names = run.merger_names()
    assert any("-alpha-0.6-" in n for n in names), names
    summary = json.loads((lab["run"] / "summary.json").read_text())
    assert [r["alpha"] for r in summary["alpha_sweep"]["rows"]] == [0.5]
