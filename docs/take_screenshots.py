"""Refresh the README's Dagster screenshots from the demo run (`make run`), not from a CI-size run.

    make run && make screenshots        # = .venv/bin/python docs/take_screenshots.py

Serves the repo's own instance (``DAGSTER_HOME=.dagster``, what `make run` wrote) with
`dagster-webserver` on a free loopback port, opens the asset graph and the evaluation report's page
in Debian's Chromium through Playwright, and writes ``docs/ui_asset_graph.png`` and
``docs/ui_evaluation_report.png`` at 1400 px width and 2x pixel density (readable at README width).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WEBSERVER = Path(sys.executable).with_name("dagster-webserver")
VIEWPORT = {"width": 1400, "height": 900}
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit("dagster-webserver exited; is .dagster there (make run)?")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("dagster-webserver did not answer within 120 s")


def main() -> None:
    """Serve the demo instance, take both screenshots, stop the server."""
    home = REPO / ".dagster"
    if not (home / "dagster.yaml").exists():
        raise SystemExit(f"{home} has no instance: run `make run` first")
    chromium = os.environ.get("SEG_PIPELINE_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    port = _port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    server = subprocess.Popen(
        [str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=2)
            page.goto(f"{url}/asset-groups")
            page.get_by_text("ingest", exact=True).first.wait_for(timeout=60_000)
            page.keyboard.press("Alt+e")  # expand every group
            page.locator("[class*='AssetNode_assetName']").nth(9).wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(REPO / "docs" / "ui_asset_graph.png"))
            page.goto(f"{url}/assets/evaluation_report?view=events")
            page.get_by_text("comparison", exact=True).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(REPO / "docs" / "ui_evaluation_report.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("wrote docs/ui_asset_graph.png and docs/ui_evaluation_report.png")


if __name__ == "__main__":
    main()
