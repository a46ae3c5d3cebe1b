"""The Dagster UI over a materialized pipeline, seen in a real headless Chromium.

`dagster-webserver` serves the instance that `full_pipeline_job` just wrote, on a free loopback
port; Playwright drives Debian's Chromium (no browser download). The test asserts what a user
would look for: every asset of the graph drawn and materialized, and the evaluation report's
metadata (model comparison table, ensemble mIoU, MLflow run id) on its page, with no error page.

Skipped where Chromium or Playwright is missing, unless ``SEG_PIPELINE_REQUIRE_BROWSER=1``
(``.ci/run`` sets it after installing Chromium, so CI can never skip it silently). Screenshots go to
the test's temp folder, and also to ``SEG_PIPELINE_SCREENSHOT_DIR`` when set (docs/ itself is
refreshed from the demo run by ``make screenshots``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from seg_pipeline_tests.defs.cli_helpers import (
    PIPELINE_ASSETS,
    REPO,
    MaterializedPipeline,
    free_loopback_port,
    stop_process,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WEBSERVER = Path(sys.executable).with_name("dagster-webserver")
MLFLOW = Path(sys.executable).with_name("mlflow")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 1000}
#: Texts of Dagster's error and empty states; none may appear on a page that rendered.
ERROR_TEXTS = ("Page not found", "An unexpected error", "Something went wrong", "Could not load")


def _chromium() -> str:
    """Path of a Chromium binary, or skip (fail under SEG_PIPELINE_REQUIRE_BROWSER=1)."""
    found = (
        os.environ.get("SEG_PIPELINE_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found = None
    if found is None:
        message = (
            "needs Chromium (apt-get install chromium) and the playwright package (pip install '.[dev]')"
        )
        if os.environ.get("SEG_PIPELINE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SEG_PIPELINE_REQUIRE_BROWSER=1 but the browser test {message}")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def webserver(materialized_pipeline: MaterializedPipeline) -> Iterator[str]:
    """`dagster-webserver -w workspace.yaml` on 127.0.0.1:<free port>; yields its base URL."""
    port = free_loopback_port()
    log = (materialized_pipeline.home / "webserver.log").open("w")
    server = subprocess.Popen(
        [str(WEBSERVER), "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=materialized_pipeline.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # stop_process stops what it starts, too
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answers(
            server, f"{url}/server_info", materialized_pipeline.home / "webserver.log", "dagster-webserver"
        )
        yield url
    finally:
        stop_process(server)
        log.close()


def _wait_until_answers(server: subprocess.Popen, url: str, log: Path, what: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{what} did not answer within 120 s"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_ui(materialized_pipeline: MaterializedPipeline) -> Iterator[str]:
    """`make mlflow-ui`'s command over the run's MLflow store, where the asset pages' links point."""
    url = materialized_pipeline.mlflow_ui_url
    store = materialized_pipeline.data_root / "mlflow"
    log_path = materialized_pipeline.home / "mlflow-ui.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [str(MLFLOW), "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--default-artifact-root", str(store / "artifacts"), "-h", "127.0.0.1",
             "-p", url.rsplit(":", 1)[1]],
            cwd=REPO, env=materialized_pipeline.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            _wait_until_answers(server, f"{url}/health", log_path, "mlflow ui")
            yield url
        finally:
            stop_process(server)


def _shown_pictures(page: Page, mlflow_url: str) -> list[str]:
    """The alt texts of the pictures on the page that the MLflow UI served (loaded, not broken)."""
    selector = f"img[src^='{mlflow_url}/get-artifact']"
    page.locator(selector).first.wait_for(timeout=30_000)
    # Polled from here: Playwright's wait_for_function evaluates its predicate with eval() in the page,
    # which the Dagster UI's Content-Security-Policy forbids (no 'unsafe-eval') since Playwright 1.65.
    deadline = time.monotonic() + 30
    while not page.eval_on_selector_all(selector, "imgs => imgs.every(img => img.complete)"):
        assert time.monotonic() < deadline, f"the pictures at {selector} did not finish loading in 30 s"
        page.wait_for_timeout(200)
    return page.eval_on_selector_all(
        selector, "imgs => imgs.filter(img => img.naturalWidth > 0).map(img => img.alt)"
    )


@pytest.fixture(scope="module")
def page(webserver: str) -> Iterator[Page]:
    """One Playwright page in headless Chromium."""
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def _save(page: Page, name: str, tmp_path: Path) -> Path:
    """Screenshot to the temp folder (and to SEG_PIPELINE_SCREENSHOT_DIR); check it is a real picture."""
    from PIL import Image

    path = tmp_path / name
    page.screenshot(path=str(path))
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.shape == (VIEWPORT["height"], VIEWPORT["width"])
    assert pixels.std() > 10, f"{name} is nearly uniform (std {pixels.std():.1f}): nothing rendered"
    if target := os.environ.get("SEG_PIPELINE_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def _shows(text: str, asset: str) -> bool:
    """The graph elides long names when zoomed out (``ensem…_predictions``): match either form."""
    if "…" not in text:
        return text.strip() == asset
    head, tail = text.strip().split("…", 1)
    return asset.startswith(head) and asset.endswith(tail) and len(head) + len(tail) < len(asset)


def _assert_no_error_page(page: Page) -> None:
    body = page.inner_text("body")
    for text in ERROR_TEXTS:
        assert text not in body, f"the UI shows {text!r}: {body[:500]}"


def test_asset_graph_shows_every_asset_materialized(page: Page, webserver: str, tmp_path: Path) -> None:
    page.goto(f"{webserver}/asset-groups")
    page.get_by_text("ingest", exact=True).first.wait_for(timeout=30_000)
    page.keyboard.press("Alt+e")  # the UI's "expand all groups" shortcut
    names = page.locator("[class*='AssetNode_assetName']")
    names.nth(len(PIPELINE_ASSETS) - 1).wait_for(timeout=30_000)
    drawn = names.all_inner_texts()
    for asset in PIPELINE_ASSETS:
        assert any(_shows(text, asset) for text in drawn), (asset, drawn)
    page.wait_for_timeout(1000)  # let the edges finish animating
    _assert_no_error_page(page)
    _save(page, "ui_asset_graph.png", tmp_path)


def test_evaluation_report_page_shows_its_metadata(page: Page, webserver: str, tmp_path: Path) -> None:
    page.goto(f"{webserver}/assets/evaluation_report?view=events")
    page.get_by_text("Materialized in run").first.wait_for(timeout=30_000)
    for key in ("comparison", "per_class_delta", "ensemble_miou", "best_single", "mlflow_run_id"):
        page.get_by_text(key, exact=True).first.wait_for(timeout=30_000)
    comparison = page.locator("table", has_text="pixel_accuracy").first
    rows = comparison.inner_text()
    for model in ("pretrained", "kd_student", "ensemble"):
        assert model in rows, rows
    _assert_no_error_page(page)
    _save(page, "ui_evaluation_report.png", tmp_path)


def test_the_training_page_links_to_its_mlflow_run(
    page: Page, webserver: str, materialized_pipeline: MaterializedPipeline
) -> None:
    page.goto(f"{webserver}/assets/kd_student_model?view=events")
    page.get_by_text("Materialized in run").first.wait_for(timeout=30_000)
    run_link = page.locator("a[href*='/#/experiments/'][href*='/runs/']").first
    run_link.wait_for(timeout=30_000)
    assert run_link.get_attribute("href").startswith(f"{materialized_pipeline.mlflow_ui_url}/#/experiments/")
    version_link = page.locator("a[href*='/#/models/demo_student/versions/']").first
    version_link.wait_for(timeout=30_000)
    _assert_no_error_page(page)


def test_the_champion_page_links_to_the_model_version(
    page: Page, webserver: str, materialized_pipeline: MaterializedPipeline
) -> None:
    page.goto(f"{webserver}/assets/champion_model?view=events")
    page.get_by_text("Materialized in run").first.wait_for(timeout=30_000)
    page.get_by_text("champion_version_page", exact=True).first.wait_for(timeout=30_000)
    link = page.locator("a[href*='/#/models/'][href*='/versions/']").first
    link.wait_for(timeout=30_000)
    assert link.get_attribute("href").startswith(f"{materialized_pipeline.mlflow_ui_url}/#/models/")
    _assert_no_error_page(page)


def test_each_dataset_is_a_partition_with_its_own_history(page: Page, webserver: str) -> None:
    page.goto(f"{webserver}/assets/tile_headers?view=partitions")
    page.get_by_text("Materialized (1)").first.wait_for(timeout=30_000)  # one dataset ran: demo
    page.get_by_text("demo", exact=True).first.click()
    page.get_by_text("tiles_quarantined", exact=True).first.wait_for(timeout=30_000)  # its catalog
    _assert_no_error_page(page)


def test_the_report_pictures_show_inline_served_by_the_mlflow_ui(
    page: Page, webserver: str, mlflow_ui: str
) -> None:
    page.goto(f"{webserver}/assets/evaluation_report?view=events")
    page.get_by_text("Materialized in run").first.wait_for(timeout=30_000)
    shown = _shown_pictures(page, mlflow_ui)
    for picture in ("per class iou", "gallery", "confusion ensemble"):  # no "[Show Markdown]" click
        assert any(alt.startswith(picture) for alt in shown), (picture, shown)
    page.goto(f"{webserver}/assets/kd_student_model?view=events")
    page.get_by_text("Materialized in run").first.wait_for(timeout=30_000)
    assert any(alt.startswith("training curves") for alt in _shown_pictures(page, mlflow_ui))
    _assert_no_error_page(page)
