"""The explorers in a real browser: JupyterLab on localhost, headless Chromium, Run All, then the alpha
slider (keys pressed quickly train nothing; "Train and show" trains the value shown) and the subset
checkboxes clicked 100 ms apart, checking the kernel's state against what the page shows.

Needs Debian's `chromium` (`make system-deps` installs it where apt works); skipped with a message
where /usr/bin/chromium is absent. Playwright drives it: `playwright install` cannot download
browsers here, so Playwright launches /usr/bin/chromium itself.
"""
from __future__ import annotations

import contextlib
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
from conftest import copy_run

from afs_kit.app.reports import NOTEBOOKS_DIR
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
def lab(tmp_path_factory, smoke_networks):
    """JupyterLab on a free localhost port, serving a copy of the alpha notebook over a trained smoke run."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root = tmp_path_factory.mktemp("lab")
    # trained extractors beforehand, so Run All only trains the small mergers and the slider answers fast
    run_dir = copy_run(smoke_networks, root / "run")
    # papermill's own injection (an "injected-parameters" cell after the `parameters` cell), not executed
    source = load_notebook_node(str(NOTEBOOKS_DIR / "04_merger_alpha.ipynb"))
    nb = parameterize_notebook(source, {"PRESET": "smoke", "RUN_DIR": str(run_dir), "DEVICE": "cpu",
                                        "ALPHAS": [0.5], "N_EVAL": 50, "INTERACTIVE": True})
    nbformat.write(nb, str(root / "alpha.ipynb"))
    source = load_notebook_node(str(NOTEBOOKS_DIR / "05_subsets.ipynb"))
    nb = parameterize_notebook(source, {"PRESET": "smoke", "RUN_DIR": str(run_dir), "DEVICE": "cpu",
                                        "SUBSETS": ["111"], "N_EVAL": 50, "INTERACTIVE": True})
    nbformat.write(nb, str(root / "subsets.ipynb"))

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


def _open_and_run_all(page, lab, notebook: str) -> None:
    page.goto(f"{lab['url']}/lab/tree/{notebook}?reset&token={lab['token']}")
    # the app is exposed (expose_app_in_browser): wait for it, the notebook and an idle kernel
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.sessionContext"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                           " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
                           " === 'idle'", timeout=60_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")


@contextlib.contextmanager
def _notebook_page(lab, notebook: str):
    """Headless Chromium on `notebook` in the lab, after Run All; the browser is closed afterwards."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs Playwright's Python package")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            _open_and_run_all(page, lab, notebook)
            yield page
        finally:
            browser.close()


def _kernel_idle(page) -> bool:
    return page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
                         " === 'idle'")


def _alphas_trained(run_dir: Path) -> set[str]:
    names = open_run("smoke", run_dir, device="cpu", progress=False).merger_names()
    return {n.split("-alpha-")[1].split("-")[0] for n in names}


def test_alpha_slider_trains_only_what_is_asked_in_a_real_browser(lab):
    with _notebook_page(lab, "alpha.ipynb") as page:
        _wait(page, lambda: "alpha=0.5:" in _explorer_text(page), "the explorer's first drawing (alpha=0.5)",
              lab["log"], 90)
        handle = page.locator(".jupyter-widgets .widget-slider .noUi-handle").first
        handle.wait_for(state="visible", timeout=10_000)
        readout = page.locator(".jupyter-widgets .widget-slider .widget-readout").first
        assert readout.text_content().strip() == "0.50"
        before = _explorer_images(page)
        assert len(before) == 2, f"the explorer draws two figures, found {len(before)}"
        assert _alphas_trained(lab["run"]) == {"0.5"}

        # keys pressed 100 ms apart pass through 0.6 and 0.7 to 0.8: nothing is trained on the way
        handle.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
            page.wait_for_timeout(100)
        _wait(page, lambda: "alpha=0.8 has no merger yet" in page.content() and _kernel_idle(page),
              "the note that alpha 0.8 has no merger", lab["log"], 30)
        assert readout.text_content().strip() == "0.80"
        assert _alphas_trained(lab["run"]) == {"0.5"}, "a slider passing through values trains none of them"

        page.get_by_role("button", name="Train and show").click()
        _wait(page, lambda: "alpha=0.8:" in _explorer_text(page), "the redraw at alpha=0.8", lab["log"], 90)
        _wait(page, lambda: len(_explorer_images(page)) == 2 and _explorer_images(page) != before,
              "the redrawn figures", lab["log"], 30)
        text = _explorer_text(page)
        assert "alpha=0.5:" not in text, "the output must be redrawn, not appended to"
        assert "clean" in text and "PGD-10" in text and "importance ratio" in text
    # only the value asked for was trained, and it is now cached on disk
    assert _alphas_trained(lab["run"]) == {"0.5", "0.8"}
    summary = json.loads((lab["run"] / "summary.json").read_text())
    assert [r["alpha"] for r in summary["alpha_sweep"]["rows"]] == [0.5]


def test_subset_checkboxes_clicked_100_ms_apart_stay_in_step_with_the_kernel(lab):
    with _notebook_page(lab, "subsets.ipynb") as page:
        _wait(page, lambda: "subset=111" in _explorer_text(page), "the explorer's first drawing (subset 111)",
              lab["log"], 120)
        boxes = page.locator(".jupyter-widgets .widget-checkbox input[type=checkbox]")
        assert boxes.count() == 3
        # untick, tick, untick, ... 100 ms apart, across the boxes, while the kernel redraws
        for i in (0, 0, 0, 1, 1, 1, 2, 0, 2, 1, 0):
            boxes.nth(i).click(force=True)
            page.wait_for_timeout(100)
        _wait(page, lambda: _kernel_idle(page), "an idle kernel", lab["log"], 60)
        page.wait_for_timeout(1000)
        shown = "".join("1" if boxes.nth(i).is_checked() else "0" for i in range(3))
        text = _explorer_text(page)
        kernel = [line for line in text.splitlines() if "subset" in line or "tick at least" in line][-1]
        expected = "tick at least one extractor" if shown == "000" else f"subset {shown} has no merger yet" \
            if shown != "111" else "subset=111"
        assert expected in kernel, f"the page shows {shown}; the kernel says: {kernel}"
        # every box still talks to the kernel: tick all three and the kernel draws subset 111 again
        for _ in range(10):  # a click on a box locked while the kernel works is dropped: click again
            for i in range(3):
                if not boxes.nth(i).is_checked():
                    boxes.nth(i).click(force=True)
                    _wait(page, lambda: _kernel_idle(page), "an idle kernel", lab["log"], 60)
                    page.wait_for_timeout(300)
        _wait(page, lambda: "subset=111" in _explorer_text(page), "subset 111 drawn again", lab["log"], 60)
