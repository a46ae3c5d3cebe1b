"""Refresh the README's Dagster screenshots from the demo run (`make run`), not from a CI-size run.

    make run && make screenshots        # = .venv/bin/python docs/take_screenshots.py

Serves the repo's own instance (``DAGSTER_HOME=.dagster``, what `make run` wrote) with
`dagster-webserver` on a free loopback port and the MLflow UI over ``data/mlflow`` on
127.0.0.1:5000 (where the asset pages' links and pictures point, as `make mlflow-ui` serves it),
opens the pages in Debian's Chromium through Playwright, and writes at 1400 px width and 2x pixel
density (readable at README width): ``docs/ui_asset_graph.png`` (the lineage),
``docs/ui_evaluation_report.png`` (the report's tables), ``docs/ui_report_pictures.png`` (its
per-class IoU and gallery, inline), ``docs/ui_training_curves.png`` (the KD student's curves) and
``docs/ui_partitions.png`` (a dataset's partition of ``dataset_splits`` with its pictures).
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
MLFLOW = Path(sys.executable).with_name("mlflow")
MLFLOW_UI = "http://127.0.0.1:5000"  # MlflowResource.mlflow_ui_url's default: what the demo's pages link to
VIEWPORT = {"width": 1400, "height": 900}
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait(url: str, server: subprocess.Popen, what: str = "dagster-webserver") -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"{what} exited; is .dagster there (make run), is port 5000 free?")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{what} did not answer within 120 s")


def _show(page, url: str, text: str, name: str, scroll_to: str | None = None) -> None:
    """Open ``url``, wait for ``text``, optionally scroll ``scroll_to`` into view, save ``docs/<name>``."""
    page.goto(url)
    page.get_by_text(text, exact=True).first.wait_for(timeout=60_000)
    if scroll_to is not None:
        page.get_by_text(scroll_to, exact=True).first.scroll_into_view_if_needed()
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)
    page.screenshot(path=str(REPO / "docs" / name))


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
    store = REPO / "data" / "mlflow"
    mlflow_ui = subprocess.Popen(
        [str(MLFLOW), "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--default-artifact-root", str(store / "artifacts"), "-h", "127.0.0.1", "-p", "5000"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait(f"{url}/server_info", server)
        _wait(f"{MLFLOW_UI}/health", mlflow_ui, "mlflow ui")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=FLAGS)
            page = browser.new_page(viewport=VIEWPORT, device_scale_factor=2)
            page.goto(f"{url}/asset-groups")
            page.get_by_text("ingest", exact=True).first.wait_for(timeout=60_000)
            page.keyboard.press("Alt+e")  # expand every group
            page.locator("[class*='AssetNode_assetName']").nth(9).wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(REPO / "docs" / "ui_asset_graph.png"))
            report = f"{url}/assets/evaluation_report?view=events"
            _show(page, report, "comparison", "ui_evaluation_report.png")
            _show(page, report, "comparison", "ui_report_pictures.png", scroll_to="per_class_iou")
            kd = f"{url}/assets/kd_student_model?view=events"
            _show(page, kd, "best_val_miou", "ui_training_curves.png", scroll_to="training_curves")
            page.goto(f"{url}/assets/dataset_splits?view=partitions")
            page.get_by_text("demo", exact=True).first.click()
            _show(page, page.url, "split_sizes", "ui_partitions.png")
            browser.close()
    finally:
        for process in (server, mlflow_ui):
            process.terminate()
            process.wait(timeout=30)
    print("wrote docs/ui_asset_graph.png, ui_evaluation_report.png, ui_report_pictures.png, "
          "ui_training_curves.png and ui_partitions.png")  # fmt: skip


if __name__ == "__main__":
    main()
