"""End to end: ``iseg demo`` served on a loopback port, driven in a real headless Chromium.

Uses Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) through
Selenium, with the system browser: nothing downloads one. Skipped, with the reason, only
where the browser, its driver, Selenium or Gradio cannot be found. Every wait is on a
condition (``WebDriverWait``), never a fixed sleep.

Set ``ISEG_DEMO_SCREENSHOTS=DIR`` to also copy the screenshots there (README's pictures:
``DIR/demo-tiny-model.png``, ``DIR/demo-tiny-model-regions.png``, ``DIR/demo-phone.png``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import make_image

pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (test extra)")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "/usr/lib/chromium/chromium", "google-chrome")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
SERVER_START_S = 120  # importing torch, diffusers and gradio on a busy 2-core CI machine
PAGE_WAIT_S = 90
SCREENSHOTS = ("demo-tiny-model.png", "demo-tiny-model-regions.png", "demo-phone.png")


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


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory, saved_model):
    """``iseg demo`` on the tiny model (saved with save_pretrained), on a free loopback port,
    started without waiting (the browser starts meanwhile; :func:`_open` waits for it);
    stopped (SIGINT, then SIGKILL) at the end."""
    tmp_path = tmp_path_factory.mktemp("demo-server")
    model = saved_model
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
        yield {"url": f"http://127.0.0.1:{port}/", "process": process, "log": log, "model": str(model)}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _new_browser(profile: Path, width: int, height: int, mobile: bool = False):
    """Headless Chromium with a viewport of exactly ``width`` × ``height`` CSS pixels."""
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--window-size={width},{height + 200}", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})  # fmt: skip
    if mobile:
        driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True})
    return driver


@pytest.fixture
def browsers(tmp_path):
    """A factory of browsers, each quit at the end."""
    made = []

    def make(name: str, width: int = 1280, height: int = 900, mobile: bool = False):
        made.append(_new_browser(tmp_path / f"profile-{name}", width, height, mobile))
        return made[-1]

    yield make
    for driver in made:
        driver.quit()


# --- page helpers -----------------------------------------------------------------------------


def _open(driver, server) -> WebDriverWait:
    """Waits for the server (failing with its log if it exits or stays silent), opens the page."""
    from selenium.common.exceptions import TimeoutException

    def serving(_) -> bool:
        if server["process"].poll() is not None:
            pytest.fail(f"iseg demo exited:\n{server['log'].read_text()[-3000:]}")
        return _answers(server["url"])

    try:
        WebDriverWait(driver, SERVER_START_S, poll_frequency=0.5).until(serving)
    except TimeoutException:
        pytest.fail(f"iseg demo did not answer in {SERVER_START_S} s:\n{server['log'].read_text()[-3000:]}")
    wait = WebDriverWait(driver, PAGE_WAIT_S)
    driver.get(server["url"])
    wait.until(lambda d: d.find_elements(By.ID, "iseg-run-classes"))
    return wait


def _upload(driver, wait, path: Path) -> None:
    field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#iseg-upload input[type=file]"))
    field.send_keys(str(path))


def _tab(driver, name: str) -> None:
    driver.find_element(By.XPATH, f"//button[@role='tab' and contains(., '{name}')]").click()


def _value(driver, elem_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")


def _changed(wait, driver, elem_id: str, before: str) -> str:
    """Waits until the text box ``elem_id`` holds something other than ``before``."""
    return wait.until(lambda d: (v := _value(d, elem_id)) != before and v)


def _images_painted(driver) -> bool:
    return driver.execute_script(
        "return [...document.images].filter(i => i.offsetParent).every(i => i.complete && i.naturalWidth > 0)"
    )


def _screenshot(driver, wait, path: Path, at: str | None = None) -> None:
    """A screenshot of the top of the page (or with element ``at`` in the middle)."""
    if at is None:
        driver.execute_script("window.scrollTo(0, 0)")
    else:
        driver.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'center'})", at)
    wait.until(lambda d: _images_painted(d))
    assert driver.save_screenshot(str(path))


def _click_image_pixel(driver, elem_id: str, pixels: list[tuple[int, int]]) -> None:
    """Clicks pixels ``(x, y)`` of the image shown in ``elem_id`` in one quick gesture (the
    image scaled to fit its box, as the page draws it)."""
    img = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} img")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
    box = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(), i = arguments[0];"
        "return [r.width, r.height, i.naturalWidth, i.naturalHeight];", img
    )  # fmt: skip
    width, height, natural_w, natural_h = box
    scale = min(width / natural_w, height / natural_h, 1)
    chain = ActionChains(driver)
    for x, y in pixels:
        dx = (width - natural_w * scale) / 2 + (x + 0.5) * scale - width / 2
        dy = (height - natural_h * scale) / 2 + (y + 0.5) * scale - height / 2
        chain = chain.move_to_element_with_offset(img, round(dx), round(dy)).click()
    chain.perform()


def _points(command: str, flag: str = "--point") -> list[tuple[int, int]]:
    return [tuple(map(int, v.split(","))) for v in re.findall(rf"{flag} (\d+,\d+)", command)]


def _near(got: list[tuple[int, int]], aimed: list[tuple[int, int]], tolerance: int = 2) -> bool:
    return len(got) == len(aimed) and all(abs(a - b) <= tolerance for p, q in zip(got, aimed) for a, b in zip(p, q))


def _all_in_view(driver, elem_id: str) -> bool:
    """Every picture of the gallery ``elem_id`` lies whole inside it and inside every scrolling
    box around it (none hidden behind a scroll bar)."""
    return driver.execute_script(
        """
        const gallery = document.getElementById(arguments[0]);
        const inside = (r, b) => r.left >= b.left - 1 && r.right <= b.right + 1 && r.top >= b.top - 1 && r.bottom <= b.bottom + 1;
        return [...gallery.querySelectorAll('img')].every(img => {
          const r = img.getBoundingClientRect();
          if (r.width < 8 || r.height < 8) return false;
          for (let n = img.parentElement; n && n !== gallery.parentElement; n = n.parentElement)
            if (!inside(r, n.getBoundingClientRect()) && getComputedStyle(n).overflow !== 'visible') return false;
          return inside(r, gallery.getBoundingClientRect());
        });
        """, elem_id)


def _downloads(driver, elem_id: str) -> list[str]:
    """The file names of the download links in ``elem_id``."""
    links = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} a[href]")
    return [urllib.parse.unquote(a.get_attribute("href").rsplit("/", 1)[-1]) for a in links]


def _severe_console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]


def _contrast(driver, css: str) -> tuple[float, float]:
    """(font size in px, WCAG contrast of the text colour on the first opaque background behind
    it) of the first element matching ``css``."""
    return tuple(driver.execute_script(
        """
        const el = document.querySelector(arguments[0]);
        const rgb = s => s.match(/[\\d.]+/g).map(Number);
        let bg = null;
        for (let n = el; n && !bg; n = n.parentElement) {
          const c = rgb(getComputedStyle(n).backgroundColor);
          if (c.length < 4 || c[3] > 0.99) bg = c;
        }
        bg = bg || [255, 255, 255];
        const lum = c => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
          return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
          return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
        const style = getComputedStyle(el), a = lum(rgb(style.color)), b = lum(bg);
        return [parseFloat(style.fontSize), (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
        """, css))  # fmt: skip


# --- the tests --------------------------------------------------------------------------------


def test_the_demo_at_a_desktop_size(server, browsers, tmp_path):
    """1280 × 900: a bad upload, an example click, the Regions clicks (two quick ones, a
    background point), two browsers on different tabs at once, the page's layout."""
    driver = browsers("desktop")
    wait = _open(driver, server)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")

    # The run button is above the fold; the hint text is readable
    button = driver.find_element(By.ID, "iseg-run-classes").rect
    assert button["y"] + button["height"] <= 900, button
    _tab(driver, "Regions")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".iseg-hint p").is_displayed())
    size, contrast = _contrast(driver, ".iseg-hint p")
    assert size >= 14 and contrast >= 4.5, (size, contrast)
    _tab(driver, "Classes")

    # A bad upload: a one-line message, nothing else changes
    _upload(driver, wait, not_an_image)
    toast = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]")
                                  if "not an image" in e.text])  # fmt: skip
    assert "'notes.png' is not an image" in toast[0].text
    driver.find_element(By.CSS_SELECTOR, "[data-testid=toast-close]").click()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]"))
    # the next file goes straight in (no × first), and is shown where the results go
    good = tmp_path / "blobs.png"
    make_image(0, (240, 320)).save(good)
    _upload(driver, wait, good)
    shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-classes-overlay img"))[0]
    wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", shown) == 320)

    # An example: a click loads its picture and prompt and runs
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-classes-examples tbody tr"))
    rows[0].click()
    command = _changed(wait, driver, "iseg-classes-command", "")
    assert command.startswith("iseg segment ball-on-grass.jpg --classes ball,grass,sky,sun")
    assert command.endswith(f"--model {server['model']} --device cpu")
    assert driver.find_element(By.CSS_SELECTOR, "#iseg-classes textarea").get_attribute("value") == "ball, grass, sky, sun"
    legend = driver.find_element(By.ID, "iseg-classes-legend").text.split("\n")
    assert [line for line in legend if line.strip()] == ["background", "ball", "grass", "sky", "sun"]
    assert len(wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-classes-heatmaps img"))) == 4
    assert _all_in_view(driver, "iseg-classes-heatmaps")
    assert set(_downloads(driver, "iseg-classes-files")) == {
        "ball-on-grass_labels.png", *[f"ball-on-grass_class{k}_mask.png" for k in (1, 2, 3, 4)]}
    _screenshot(driver, wait, tmp_path / "demo-tiny-model.png")

    # Regions: two quick clicks are two points where clicked; a background point
    _tab(driver, "Regions")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#iseg-regions-image img").is_displayed())
    _click_image_pixel(driver, "iseg-regions-image", [(220, 260), (430, 70)])
    command = wait.until(lambda d: (v := _value(d, "iseg-regions-command")).count("--point") == 2 and v)
    assert _near(_points(command), [(220, 260), (430, 70)]), command
    driver.find_element(By.XPATH, "//*[@id='iseg-region-kind']//label[contains(., 'background point')]").click()
    _click_image_pixel(driver, "iseg-regions-image", [(100, 60)])
    command = wait.until(lambda d: "--negative-point" in (v := _value(d, "iseg-regions-command")) and v)
    assert _near(_points(command, "--negative-point"), [(100, 60)]), command
    assert "3 · background point" in driver.find_element(By.ID, "iseg-regions-legend").text
    assert len(wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-regions-gallery img"))) == 4
    assert _all_in_view(driver, "iseg-regions-gallery")
    wait.until(lambda d: len(_downloads(d, "iseg-regions-files")) == 5)
    assert set(_downloads(driver, "iseg-regions-files")) == {
        "ball-on-grass_labels.png", "ball-on-grass_regions.json", *[f"ball-on-grass_region{r}_mask.png" for r in (1, 2, 3)]}
    _screenshot(driver, wait, tmp_path / "demo-tiny-model-regions.png")
    assert _severe_console_errors(driver) == []

    # Two browsers at once, on different tabs: a Classes run on a large image and a Regions click
    big = tmp_path / "big.png"
    make_image(3, (1800, 2400)).save(big)
    other = browsers("second")
    other_wait = _open(other, server)
    _upload(other, other_wait, big)
    other_wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-classes-overlay img"))
    other.find_element(By.CSS_SELECTOR, "#iseg-classes textarea").send_keys("cat, dog")
    before = _value(driver, "iseg-regions-command")
    other.find_element(By.ID, "iseg-run-classes").click()
    driver.find_element(By.XPATH, "//*[@id='iseg-region-kind']//label[contains(., 'object point')]").click()
    _click_image_pixel(driver, "iseg-regions-image", [(300, 300)])
    command = _changed(wait, driver, "iseg-regions-command", before)
    assert _near(_points(command)[-1:], [(300, 300)]), command
    other_command = _changed(other_wait, other, "iseg-classes-command", "")
    assert other_command.startswith("iseg segment big.png --classes cat,dog")
    overlay = other.find_element(By.CSS_SELECTOR, "#iseg-classes-overlay img")
    assert other.execute_script("return arguments[0].naturalWidth", overlay) == 1024  # the display copy
    assert _severe_console_errors(driver) == [] and _severe_console_errors(other) == []
    assert "Traceback" not in server["log"].read_text()
    _keep_screenshots(tmp_path)


def test_the_demo_on_a_phone(server, browsers, tmp_path):
    """390 × 844, touch: the page fits the width, an upload and a tap on the Regions image."""
    driver = browsers("phone", 390, 844, mobile=True)
    wait = _open(driver, server)
    image = tmp_path / "blobs.png"
    make_image(0, (240, 320)).save(image)
    _upload(driver, wait, image)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#iseg-classes-overlay img"))
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
    _tab(driver, "Regions")
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#iseg-regions-image img").is_displayed())
    _click_image_pixel(driver, "iseg-regions-image", [(160, 120)])
    command = _changed(wait, driver, "iseg-regions-command", "")
    assert _near(_points(command), [(160, 120)]), command
    image_box = driver.find_element(By.CSS_SELECTOR, "#iseg-regions-image img").rect
    assert image_box["width"] <= 390
    _screenshot(driver, wait, tmp_path / "demo-phone.png", at="iseg-regions-image")
    assert _severe_console_errors(driver) == []
    _keep_screenshots(tmp_path)


def _keep_screenshots(folder: Path) -> None:
    target = os.environ.get("ISEG_DEMO_SCREENSHOTS")
    if target:
        for name in SCREENSHOTS:
            if (folder / name).exists():
                shutil.copyfile(folder / name, Path(target) / name)
