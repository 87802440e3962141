"""The reviewer's view: an `overinterp run` once, `mlflow ui` on its store, a headless Chromium
driven by Playwright through what the README's "Review in MLflow" section says to do.

Needs the `playwright` package (the `test` extra) and a system Chromium (`apt-get install chromium`;
Playwright's own browser download is not used). Without either the tests skip and say which.

Ordinary runs show the session's reduced smoke run (`smoke_reference`: `--smoke`, seeds 0 and 1, no
input dropout, backselect, mean fill: 9 runs), and the screenshot goes to the test's temporary folder. With OVERINTERP_UPDATE_DOCS=1
the run is the default `overinterp run` (digits, every default: 49 runs, ~3 min on 2 cores) and
the screenshot also replaces docs/mlflow-runs.png, the one the README shows; kept out of ordinary
runs so that running the suite leaves the work tree clean.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.browser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_SCREENSHOT = os.path.join(ROOT, "docs", "mlflow-runs.png")
UPDATE_DOCS = os.environ.get("OVERINTERP_UPDATE_DOCS") == "1"
TIMEOUT_MS = 120_000  # the UI's first load takes ~20-60 s on 2 busy cores
CHILD_METRICS = ("accuracy", "baseline_accuracy", "accuracy_minus_baseline")
SHOWN_TAGS = ("condition", "seed")
HIDDEN_ATTRIBUTES = ("Dataset", "Source", "Models")  # default columns, hidden to make room


def _chromium() -> str:
    for path in (os.environ.get("OVERINTERP_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                 shutil.which("google-chrome")):
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip("no Chromium: apt-get install chromium (or set OVERINTERP_CHROMIUM to a Chromium binary)")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- fixtures: the browser first, so a machine without one skips before the 2-6 min pipeline run ---
@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api", reason="no playwright: pip install playwright (the `test` extra)")
    from playwright.sync_api import sync_playwright

    path = _chromium()
    with sync_playwright() as p:
        # --no-sandbox: Chromium refuses to start its sandbox as root (CI and these machines run as root)
        b = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def run_out(browser, tmp_path_factory, request) -> str:
    """The --out of the run the UI shows: the default run for the README's picture, else the session's reduced smoke run."""
    if not UPDATE_DOCS:
        return request.getfixturevalue("smoke_reference")["out"]
    out = str(tmp_path_factory.mktemp("mlflow_ui") / "out")
    p = subprocess.run([sys.executable, "-m", "overinterp.cli", "run", "--out", out], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=2400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return out


@pytest.fixture(scope="module")
def store(run_out) -> dict:
    """What the UI must show, read from the store itself: experiment, parent, children."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_out}/mlflow.db")
    exp = client.get_experiment_by_name("overinterp")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("overinterp.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert children and len(children) == len(runs) - 1
    return {"client": client, "experiment_id": exp.experiment_id, "parent": parent, "children": children}


@pytest.fixture(scope="module")
def ui(run_out) -> str:
    """`mlflow ui` on the run's store; its base URL. One worker: uvicorn kills workers that
    start slower than its health check, which happens with 4 workers on 2 loaded cores."""
    port = _free_port()
    log = open(os.path.join(os.path.dirname(run_out), "mlflow-ui.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{run_out}/mlflow.db",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=_env(), cwd=os.path.dirname(run_out), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow ui did not answer on {url}: " + open(log.name).read()[-3000:])
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)  # its own session: mlflow, uvicorn and the job runner
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1800, "height": 1000})  # fresh local storage: the UI's defaults
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    yield pg
    context.close()


# --- helpers ---
def _close_assistant(page) -> None:
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def _cell(page, run_id: str, col: str):
    return page.locator(f'[role=row][row-id="{run_id}"] [role=gridcell][col-id="{col}"]')


def _toggle_columns(page, names) -> None:
    """The README's clicks: Columns, search each name, tick (or untick) it."""
    page.get_by_test_id("column-selection-dropdown").filter(has_text="Columns").click()
    tree = page.get_by_test_id("column-selector-tree")
    for name in names:
        page.get_by_placeholder("Search columns").fill(name)
        # the node whose whole title is `name` (search also highlights it inside longer names)
        tree.locator(".du-bois-light-tree-treenode").filter(has_text=re.compile(f"^{re.escape(name)}$")).click()
    page.keyboard.press("Escape")


def _sort_oldest_first(page) -> None:
    """Click the Created header: runs oldest first, so the full-image models lead the parent's children."""
    page.locator('[role=columnheader][col-id="runDateAndNestInfo"]').first.click()
    page.wait_for_url(re.compile("orderByAsc=true"))
    page.locator(".ag-overlay-loading-wrapper").wait_for(state="hidden")  # the table reloads in the new order


def _fit_columns(page, cols) -> None:
    """Double-click a column header's right edge: the column widens to its longest entry."""
    for col in cols:
        page.locator(f'[role=columnheader][col-id="{col}"] .ag-header-cell-resize').first.dblclick()


def _expand(page, store) -> None:
    """Click the expander left of the parent's name: its child runs appear under it."""
    parent = store["parent"]
    row = page.locator(f'[role=row][row-id="{parent.info.run_id}"]', has_text=parent.info.run_name)
    row.locator("button").first.click()
    page.get_by_text(store["children"][0].info.run_name, exact=True).wait_for()


def _check_table(page, store) -> None:
    """Parent and children by name, each child's metrics and tags in their columns, as stored."""
    for child in store["children"]:
        assert page.get_by_text(child.info.run_name, exact=True).is_visible(), child.info.run_name
        for m in CHILD_METRICS:
            shown = _cell(page, child.info.run_id, f"metrics.`{m}`").inner_text().strip()
            if m in child.data.metrics:
                assert float(shown) == pytest.approx(child.data.metrics[m], rel=1e-3), (child.info.run_name, m, shown)
            else:  # full-image runs are the baselines themselves
                assert shown == "-", (child.info.run_name, m, shown)
        for t in SHOWN_TAGS:
            assert _cell(page, child.info.run_id, f"tags.`{t}`").inner_text().strip() == child.data.tags[t]


def _parent_metric_keys(store) -> list[str]:
    """The parent's mean test accuracy on full images, BS subsets and random subsets (`<model>.<condition>.accuracy_mean`)."""
    keys = [k for k in store["parent"].data.metrics if k.split(".")[-2:-1] in (["full"], ["bs-subset"], ["random-subset"])
            and k.endswith(".accuracy_mean")]
    assert len(keys) == 3, sorted(store["parent"].data.metrics)
    return sorted(keys, key=lambda k: ("full", "bs-subset", "random-subset").index(k.split(".")[-2]))


# --- the tests ---
def test_runs_view_shows_parent_children_and_metric_columns(page, ui, store, tmp_path):
    """Experiment page, "Model training", Columns, expand: the README's steps, then what they show."""
    parent = store["parent"]
    page.goto(f"{ui}/#/experiments/{store['experiment_id']}")
    # MLflow 3.17 opens an experiment in its GenAI view whatever the experiment's kind tag says; the
    # "Model training" switch (remembered in the browser) leads to the runs table
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_text(parent.info.run_name, exact=True).wait_for()
    assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
    assert page.get_by_text(f"{1 + len(store['children'])} matching runs").is_visible()
    _close_assistant(page)

    parent_metrics = _parent_metric_keys(store)
    _toggle_columns(page, [*CHILD_METRICS, *parent_metrics, *SHOWN_TAGS, *HIDDEN_ATTRIBUTES])
    _sort_oldest_first(page)
    _expand(page, store)
    names = [cell.splitlines()[-1] for cell in  # each name follows its colour dot's label
             page.locator('[role=gridcell][col-id="attributes.`Run Name`"]').evaluate_all("els => els.map(e => e.innerText.trim())")]
    oldest_first = sorted(store["children"], key=lambda c: c.info.start_time)
    assert names == [parent.info.run_name] + [c.info.run_name for c in oldest_first], names
    _fit_columns(page, ("attributes.`Run Name`", "tags.`condition`"))
    for col in [f"metrics.`{m}`" for m in (*CHILD_METRICS, *parent_metrics)] + [f"tags.`{t}`" for t in SHOWN_TAGS]:
        assert page.locator(f'[role=columnheader][col-id="{col}"]').count(), f"no column {col}"
    _check_table(page, store)
    for m in parent_metrics:
        shown = _cell(page, parent.info.run_id, f"metrics.`{m}`").inner_text().strip()
        assert float(shown) == pytest.approx(parent.data.metrics[m], rel=1e-3), (m, shown)

    page.mouse.move(0, 0)  # no hover highlight in the picture
    page.screenshot(path=str(tmp_path / "mlflow-runs.png"))
    if UPDATE_DOCS:
        shutil.copyfile(tmp_path / "mlflow-runs.png", DOCS_SCREENSHOT)


def test_the_saved_view_every_run_writes_pins_the_columns(page, ui, store):
    """MLflow has no per-experiment default view, but a saved view is an experiment tag
    `mlflow.sharedViewState.<id>`: every run writes "accuracies", listed under Views and opened by link."""
    from overinterp.pipeline.tracking import SAVED_VIEW_COLUMNS, SAVED_VIEW_KEY

    view_id = name = SAVED_VIEW_KEY
    exp = store["client"].get_experiment(store["experiment_id"])
    state = json.loads(json.loads(exp.tags[f"mlflow.sharedViewState.{view_id}"])["state"])
    assert state["selectedColumns"] == list(SAVED_VIEW_COLUMNS)
    assert {f"metrics.`{m}`" for m in CHILD_METRICS} | {f"tags.`{t}`" for t in SHOWN_TAGS} <= set(SAVED_VIEW_COLUMNS)
    page.goto(f"{ui}/#/experiments/{store['experiment_id']}/runs?workflowType=machine_learning&viewStateShareKey={view_id}")
    page.get_by_text(store["parent"].info.run_name, exact=True).wait_for()
    _close_assistant(page)
    for col in state["selectedColumns"]:
        page.locator(f'[role=columnheader][col-id="{col}"]').first.wait_for()
    assert not page.locator('[role=columnheader][col-id="attributes.`Source`"]').count()  # the view's columns only
    assert page.get_by_test_id("saved-views-trigger").inner_text().strip() == name
    _expand(page, store)
    _check_table(page, store)
