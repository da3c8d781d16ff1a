"""A browser check of the interactive use: JupyterLab, driven by a headless Chromium, opens a study notebook with
the project's kernel ("Python (ckd-study)", registered by `make setup`), runs every cell from the Run menu and
saves it; the saved notebook must hold every cell executed, no error, and the project's interpreter.

Skips (saying why) without Chromium + ChromeDriver (Debian: `apt-get install chromium chromium-driver`;
`.ci/install-browser` does it in CI), selenium, or the registered kernel. Run it alone with
`.venv/bin/python -m pytest tests/test_browser.py -v`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "01_teachers.ipynb"
KERNEL = "ckd-study"

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    SELENIUM = True
except ImportError:
    SELENIUM = False


def _kernel_registered() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL in KernelSpecManager().find_kernel_specs()


pytestmark = [
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no Chromium/ChromeDriver (apt-get install chromium chromium-driver, or "
                              ".ci/install-browser)"),
    pytest.mark.skipif(not SELENIUM, reason="selenium is not installed (pip install -e .[dev])"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab serving a copy of a study notebook (plus a last cell that prints the kernel's interpreter),
    with the results and figures of the run in tmp_path."""
    if not _kernel_registered():
        pytest.skip(f"the Jupyter kernel {KERNEL!r} is not registered (make setup registers it)")
    root = tmp_path / "lab"
    root.mkdir()
    nb = json.loads((REPO / "notebooks" / NOTEBOOK).read_text())
    assert nb["metadata"]["kernelspec"]["name"] == KERNEL
    nb["cells"].append({"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                        "source": ["import sys\n", "print('KERNEL-PYTHON', sys.executable)"]})
    (root / NOTEBOOK).write_text(json.dumps(nb))
    port, token = _free_port(), "ckd-browser-test"
    env = {**os.environ, "CKD_RESULTS_DIR": str(tmp_path / "results"), "CKD_FIGURES_DIR": str(tmp_path / "figures"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).read()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    try:
        yield url, token, root / NOTEBOOK, tmp_path
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.timeout(600)
def test_jupyterlab_runs_a_study_notebook_with_the_project_kernel(jupyterlab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, token, notebook, tmp_path = jupyterlab
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(f"{url}/lab/tree/{notebook.name}?token={token}")
        # The notebook panel is open and its kernel (the project's, by display name) is idle.
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Cell")))
        wait.until(lambda d: "Python (ckd-study)" in d.find_element(
            By.CSS_SELECTOR, ".jp-NotebookPanel-toolbar").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"))
        # Run ▸ Run All Cells, as a user would.
        menu = next(e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == "Run")
        menu.click()
        wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "li[data-command='runmenu:run-all']"))).click()
        # Save (Ctrl+S) every few seconds and read what JupyterLab wrote, until the last cell has printed the
        # kernel's interpreter or a cell has failed (cells run in order; an error stops there). The file, not the
        # page, is read: JupyterLab renders only the cells in view.
        panel = driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook")
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            time.sleep(3)
            panel.click()
            ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
            time.sleep(1)
            outputs = [o for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"
                       for o in c.get("outputs", [])]
            if any(o["output_type"] == "error" or "KERNEL-PYTHON" in "".join(o.get("text", "")) for o in outputs):
                break
    finally:
        driver.quit()
    saved = json.loads(notebook.read_text())
    code = [c for c in saved["cells"] if c["cell_type"] == "code"]
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, f"a cell failed: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert all(c["execution_count"] for c in code), "not every cell ran"
    printed = "".join("".join(o.get("text", "")) for o in code[-1]["outputs"])
    printed = printed.split("KERNEL-PYTHON", 1)[-1].strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve(), \
        f"the notebook ran in {printed!r}, not the project's interpreter {sys.executable}"
    # The notebook trained the smoke teacher into the test's store and wrote its table.
    runs = list((tmp_path / "results" / "runs").glob("ce_resnet14_*/summary.json"))
    assert runs, "the notebook did not train the smoke teacher into CKD_RESULTS_DIR"
    assert list((tmp_path / "figures" / "smoke").glob("teachers*"))
