"""End to end: ``iseg demo`` served on a loopback port, driven in a real headless Chromium.

Uses Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) through
Selenium, with the system browser: nothing downloads one. Skipped, with the reason, only
where the browser, its driver, Selenium or Gradio cannot be found.

Set ``ISEG_DEMO_SCREENSHOTS=DIR`` to also copy the screenshots there (README's pictures:
``DIR/demo-tiny-model.png`` and ``DIR/demo-tiny-model-regions.png``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from iseg import ISegPipeline
from iseg.testing import tiny_components

from .conftest import make_image

pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")

BROWSERS = ("chromium", "chromium-browser", "/usr/lib/chromium/chromium", "google-chrome")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
SERVER_START_S = 120  # importing torch, diffusers and gradio on a busy 2-core CI machine
PAGE_WAIT_S = 60


def _find(candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        path = shutil.which(name) or (name if os.path.isfile(name) and os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


BROWSER, DRIVER = _find(BROWSERS), _find(DRIVERS)
pytestmark = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason=f"no headless browser: chromium {'found' if BROWSER else 'not found'}, chromedriver "
    f"{'found' if DRIVER else 'not found'} (apt-get install chromium chromium-driver)",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"iseg demo exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"iseg demo did not answer on {url} in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def server(tmp_path: Path):
    """``iseg demo`` on the tiny model (saved with save_pretrained), on a free loopback port,
    started without waiting (the browser starts meanwhile; the test waits for the server);
    stopped (SIGINT, then SIGKILL) at the end."""
    (tmp_path / "tokenizer-src").mkdir()
    model = tmp_path / "model"
    ISegPipeline(**tiny_components(seed=0, tokenizer_dir=tmp_path / "tokenizer-src")).save_pretrained(model)
    port = _free_port()
    log = tmp_path / "server.log"
    env = {
        **os.environ, "ISEG_OPS_BACKEND": "torch", "GRADIO_ANALYTICS_ENABLED": "False",
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
    }  # fmt: skip
    command = [sys.executable, "-m", "iseg", "demo", "--model", str(model), "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield f"http://127.0.0.1:{port}/", process, log
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def browser(tmp_path: Path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,1500",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_classes_tab_in_a_real_browser(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, process, log = server
    wait = WebDriverWait(browser, PAGE_WAIT_S)
    image_path = tmp_path / "blobs.png"
    make_image(0, (240, 320)).save(image_path)  # H 240, W 320
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")

    _wait_for_server(url, process, log)
    browser.get(url)

    def upload(path: Path) -> None:
        field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#iseg-upload input[type=file]"))
        field.send_keys(str(path))

    # A bad upload: a one-line message in the page, no traceback
    upload(not_an_image)
    toast = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
                                  if "not an image" in e.text])  # fmt: skip
    assert "'notes.png' is not an image" in toast[0].text
    assert "Traceback" not in browser.page_source

    # A real image, two classes, run
    browser.get(url)
    upload(image_path)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-preview img"))
    browser.find_element(By.CSS_SELECTOR, "#iseg-classes textarea").send_keys("cat, dog")
    browser.find_element(By.ID, "iseg-run-classes").click()
    overlay = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-classes-overlay img"))[0]
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay))
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
    assert size == [320, 240]  # the overlay is of the uploaded image, at its size
    legend = browser.find_element(By.ID, "iseg-classes-legend").text
    assert [line for line in legend.split("\n") if line.strip()] == ["background", "cat", "dog"]
    heatmaps = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-classes-heatmaps img"))
    assert len(heatmaps) == 2
    command = browser.find_element(By.CSS_SELECTOR, "#iseg-classes-command textarea").get_attribute("value")
    assert command.startswith("iseg segment blobs.png --classes cat,dog")

    screenshot = tmp_path / "demo-tiny-model.png"
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)  # let the images finish painting
    assert browser.save_screenshot(str(screenshot))

    # Regions: a drag across the image in "box" mode adds a box, segmented at once
    browser.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Regions')]").click()
    browser.find_element(By.XPATH, "//*[@id='iseg-region-kind']//label[contains(., 'box')]").click()
    canvas = wait.until(lambda d: [c for c in d.find_elements(By.CSS_SELECTOR, "#iseg-regions-editor canvas")
                                   if c.is_displayed() and c.size["width"] > 0])[-1]  # fmt: skip
    time.sleep(1)  # the editor draws the image once its tab shows
    ActionChains(browser).move_to_element_with_offset(canvas, -30, -20).click_and_hold() \
        .move_by_offset(20, 15).move_by_offset(20, 15).release().perform()
    command = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#iseg-regions-command textarea")
                         .get_attribute("value"))  # fmt: skip
    args = command.split()
    assert args[:4] == ["iseg", "regions", "blobs.png", "--box"], command
    x0, y0, x1, y1 = map(int, args[4].split(","))
    assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240 and x1 - x0 > 10 and y1 - y0 > 5
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-regions-overlay img"))
    assert len(wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-regions-gallery img"))) == 2
    time.sleep(0.5)
    assert browser.save_screenshot(str(tmp_path / "demo-tiny-model-regions.png"))
    assert "Traceback" not in log.read_text()
    if os.environ.get("ISEG_DEMO_SCREENSHOTS"):
        for name in ("demo-tiny-model.png", "demo-tiny-model-regions.png"):
            shutil.copyfile(tmp_path / name, Path(os.environ["ISEG_DEMO_SCREENSHOTS"]) / name)
