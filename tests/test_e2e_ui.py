"""The MLflow UI in a real browser: a tiny double-descent study (three widths trained as one population, the
double-descent report at the end), `mlflow ui` on a free 127.0.0.1 port, headless Chromium (Debian's chromium +
chromium-driver through Selenium) showing the study's parent run, its child runs named by their swept value with
their swept param, a metric and their training dataset, and the parent's model-wise chart (the report's
modelwise/test_err, one point per width) in its Model metrics tab. Screenshots are kept as
tests/artifacts/mlflow_ui.png and tests/artifacts/mlflow_parent_chart.png (docs/figures/mlflow_parent_chart.png is a
copy). .ci/run installs the browser and sets REGLAB_REQUIRE_E2E=1, so CI fails instead of skipping when it is
missing."""

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

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
WIDTHS = (8, 16, 32)
# One population job (no early stopping), every epoch's test error (what the double-descent report reads).
STUDY = ["study=ui_demo", *TINY, f"model.width={','.join(map(str, WIDTHS))}", "trainer.max_epochs=2",
         "callbacks.early_stopping=null", "population.mode=auto", "+data.test_every_epoch=true",
         "report={_target_: reglab.studies.double_descent.report}", "logger.experiment=ui-demo"]


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


def chart_card(driver, metric: str):
    """The Model metrics tab's chart card of `metric`: the nearest element around its title that holds a plot."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, f"//h4[@title='{metric}']/ancestor::*[.//*[contains(@class, "
                                         "'js-plotly-plot')]][1]")


def close_assistant(driver) -> None:
    from selenium.webdriver.common.by import By

    for close in driver.find_elements(By.CSS_SELECTOR, "[aria-label=Close]"):  # the assistant side panel
        close.click()


def test_study_shows_parent_chart_children_params_metrics_and_datasets_in_the_mlflow_ui(tmp_path, empty_store):
    if not (CHROMIUM and DRIVER):
        if os.environ.get("REGLAB_REQUIRE_E2E") == "1":
            pytest.fail("chromium and chromedriver are required (apt-get install chromium chromium-driver)")
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    r = train_cli("--multirun", *STUDY, f"paths.root={tmp_path}", cwd=with_store(tmp_path, empty_store))
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.get_experiment_by_name("ui-demo").experiment_id
    runs = client.search_runs([exp_id])
    (parent,) = [run for run in runs if run.data.tags.get("reglab.role") == "parent"]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(int(c.data.params["model.width"]) for c in children) == list(WIDTHS)
    assert {c.info.run_name for c in children} == {f"width={w}" for w in WIDTHS}
    curve = client.get_metric_history(parent.info.run_id, "modelwise/test_err")
    assert sorted(m.step for m in curve) == list(WIDTHS)
    train_digest = {c.info.run_id: d.dataset.digest for c in children for d in c.inputs.dataset_inputs
                    if {(t.key, t.value) for t in d.tags} == {("mlflow.data.context", "train")}}
    assert len(train_digest) == len(children)

    with mlflow_server(uri, tmp_path, command="ui") as url, headless_chromium(tmp_path / "chromium") as driver:
        wait = WebDriverWait(driver, 60)
        driver.get(f"{url}/#/experiments/{exp_id}/runs")  # the training-runs table, not the GenAI overview
        wait.until(EC.element_to_be_clickable((By.LINK_TEXT, parent.info.run_name)))
        close_assistant(driver)
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
            row = driver.find_element(By.LINK_TEXT, child.info.run_name).find_element(
                By.XPATH, "./ancestor::*[contains(@class, 'ag-row')][1]").get_attribute("row-index")
            dataset = driver.find_element(
                By.CSS_SELECTOR, f".ag-row[row-index='{row}'] [col-id='attributes.`Dataset`']").text
            assert f"digits ({train_digest[child.info.run_id]})" in dataset and "Train" in dataset, dataset
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "mlflow_ui.png"))

        # The parent's Model metrics tab draws the report's model-wise curve: one point per width.
        driver.get(f"{url}/#/experiments/{exp_id}/runs/{parent.info.run_id}/model-metrics")
        wait.until(EC.presence_of_element_located((By.XPATH, "//h4[@title='modelwise/test_err']")))
        close_assistant(driver)
        wait.until(lambda d: len(chart_card(d, "modelwise/test_err").find_elements(
            By.CSS_SELECTOR, ".js-plotly-plot .points .point")) == len(WIDTHS))
        driver.find_element(By.XPATH, "//*[@role='tab'][normalize-space()='Model metrics']").click()  # pointer off
        driver.save_screenshot(str(ARTIFACTS / "mlflow_parent_chart.png"))
