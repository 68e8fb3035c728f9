"""The MLflow UI in a real browser: a tiny sweep, `mlflow ui` on a free 127.0.0.1 port, headless Chromium (Debian's
chromium + chromium-driver through Selenium) showing the study's parent run, its child runs, their swept param and a
metric. The screenshot is kept as tests/artifacts/mlflow_ui.png. .ci/run installs the browser and sets
REGLAB_REQUIRE_E2E=1, so CI fails instead of skipping when it is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import with_store
from mlflow_server import mlflow_server
from train_cli import TINY, train_cli

pytestmark = pytest.mark.e2e

ARTIFACT = Path(__file__).resolve().parent / "artifacts" / "mlflow_ui.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
WIDTHS = (8, 16)


@contextlib.contextmanager
def headless_chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                f"--user-data-dir={profile}", "--window-size=1600,900"):
        opts.add_argument(arg)
    # An explicit driver path: Selenium Manager (which would look for drivers online) is never started.
    driver = webdriver.Chrome(options=opts, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def grid_rows(driver) -> dict[str, str]:
    """Text of each row of the runs table; ag-grid splits a row across its pinned and scrolling parts."""
    from selenium.webdriver.common.by import By

    rows: dict[str, str] = {}
    for part in driver.find_elements(By.CSS_SELECTOR, ".ag-row"):
        index = part.get_attribute("row-index")
        rows[index] = f"{rows.get(index, '')}\n{part.text}"
    return rows


def test_sweep_shows_parent_children_params_and_metrics_in_the_mlflow_ui(tmp_path, empty_store):
    if not (CHROMIUM and DRIVER):
        if os.environ.get("REGLAB_REQUIRE_E2E") == "1":
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    r = train_cli("--multirun", "study=ui_demo", *TINY, f"model.width={','.join(map(str, WIDTHS))}",
                  "trainer.max_epochs=2", "logger.experiment=ui-demo", f"paths.root={tmp_path}",
                  cwd=with_store(tmp_path, empty_store))
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("ui-demo").experiment_id
    runs = client.search_runs([exp_id])
    (parent,) = [run for run in runs if run.data.tags.get("reglab.role") == "parent"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.params["model.width"]) for c in children) == list(WIDTHS)

    with mlflow_server(uri, tmp_path, command="ui") as url, headless_chromium(tmp_path / "chromium") as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{url}/#/experiments/{exp_id}/runs")  # the training-runs table, not the GenAI overview
        wait.until(EC.element_to_be_clickable((By.LINK_TEXT, parent.info.run_name)))
        for close in driver.find_elements(By.CSS_SELECTOR, "[aria-label=Close]"):  # the assistant side panel
            close.click()
        # Show the swept param and a metric as columns, then unfold the parent to its children.
        driver.find_element(By.XPATH, "//button[normalize-space()='Columns']").click()
        for column in ("model.width", "val/loss"):
            wait.until(EC.element_to_be_clickable((By.XPATH, f"//*[normalize-space(text())='{column}']"))).click()
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
        driver.find_element(By.CSS_SELECTOR, ".ag-row button").click()
        for child in children:
            wait.until(EC.presence_of_element_located((By.LINK_TEXT, child.info.run_name)))

        rows = grid_rows(driver)
        assert any(parent.info.run_name in text for text in rows.values())
        for child in children:
            (text,) = [t for t in rows.values() if child.info.run_name in t]
            cells = text.split()
            assert child.data.params["model.width"] in cells
            assert repr(child.data.metrics["val/loss"]) in cells, text  # the DOM holds the untruncated value
        ARTIFACT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACT))
