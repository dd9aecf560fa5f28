"""Browser test of the "GCFG Training" tab: headless Chromium (playwright-core, driven by node) on the tab served by
gradio 3.41 against the fake WebUI host: no console or page error, one-line values in one-line inputs, a tiny job
that trains, stops, resumes and completes while the status line follows it, screenshots (light and dark), delete.

Skipped unless `node`, a Chromium binary (env CHROMIUM, else `chromium` on PATH) and the npm package
playwright-core (found through env NODE_PATH, e.g. NODE_PATH=/opt/tools/node_modules) are all available. Screenshots
go to env GCFG_SCREENSHOT_DIR when set, else to the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import BACKSTOP_S

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


def _chromium() -> str | None:
    candidate = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return candidate if candidate and os.access(candidate, os.X_OK) else None


def _playwright_available(node: str) -> bool:
    result = subprocess.run([node, "-e", "require.resolve('playwright-core')"], capture_output=True,
                            env=os.environ.copy(), timeout=BACKSTOP_S)
    return result.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_tools():
    pytest.importorskip("gradio")
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium binary (set CHROMIUM or install chromium)")
    if not _playwright_available(node):
        pytest.skip("the npm package playwright-core is not on NODE_PATH")
    return node, chromium


@pytest.mark.slow
def test_train_stop_resume_complete_in_a_browser_without_page_errors(browser_tools, tmp_path):
    node, chromium = browser_tools
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, str(HERE / "serve_tab.py"), "--workdir", str(tmp_path), "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output: list[str] = []
    try:
        ready = None
        while ready is None:  # readline blocks until the server says READY or ends
            line = server.stdout.readline()
            if not line:
                pytest.fail("the tab server ended:\n" + "".join(output))
            output.append(line)
            if line.startswith("READY "):
                ready = line.split()
        url, dataset = ready[1], ready[2].removeprefix("dataset=")
        shots = Path(os.environ.get("GCFG_SCREENSHOT_DIR", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        screenshot = shots / "training-tab-browser-test.png"
        result = subprocess.run([node, str(HERE / "training_tab.cjs"), url, dataset, str(screenshot)],
                                capture_output=True, text=True, timeout=BACKSTOP_S,
                                env={**env, "CHROMIUM": chromium, "TIMEOUT_MS": str(int(BACKSTOP_S * 1000))})
        assert result.returncode == 0, result.stdout + result.stderr
        assert "OK" in result.stdout.splitlines()[-1]
        assert screenshot.stat().st_size > 10_000
    finally:
        server.terminate()
        try:
            server.communicate(timeout=BACKSTOP_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
