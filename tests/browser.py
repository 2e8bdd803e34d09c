"""A real browser on Label Studio's editor: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium logs in, opens a pre-annotated task, and reads what an
annotator sees: the regions list with its tooth labels, and the masks drawn on the image."""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
CHROMEDRIVER = shutil.which("chromedriver") or next(
    (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if Path(p).exists()), None)


def available() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM is not None and CHROMEDRIVER is not None


def prediction_labels(result: list[dict]) -> list[str]:
    return [label for item in result for label in item["value"].get("brushlabels", [])]


def assert_editor_shows(view: "EditorView", result: list[dict]) -> None:
    """The editor lists the prediction's regions with their tooth labels, in its order, and paints masks."""
    expected = prediction_labels(result)
    assert len(view.labels) >= min(5, len(expected)), view.labels
    assert view.labels == expected[:len(view.labels)], (view.labels, expected)
    assert view.colored_fraction > 0.01, f"no masks drawn on the image ({view.colored_fraction:.4f} coloured)"


def assert_dental_chart(view: "EditorView") -> None:
    """The brush labels sit like a dental chart: upper 18-11 | 21-28, the deciduous quadrants inside,
    lower 48-41 | 31-38; hotkeys are Label Studio's usual ones and select their tooth."""
    x = {label: place[0] for label, place in view.label_places.items()}
    y = {label: place[1] for label, place in view.label_places.items()}
    assert x["18"] < x["11"] < x["21"] < x["28"] and y["18"] == y["11"] == y["21"] == y["28"], view.label_places
    assert y["11"] < y["51"] < y["81"] < y["41"], view.label_places  # upper, deciduous upper and lower, lower
    for a, b in (("55", "15"), ("65", "25"), ("85", "45"), ("75", "35"), ("48", "18"), ("38", "28")):
        assert x[a] == x[b], f"{a} is not in {b}'s column: {view.label_places}"
    assert view.hotkeys["11"] == "1" and view.hotkeys["21"] == "9", view.hotkeys
    assert view.selected_by_key == {"9": "21"}


@dataclass
class EditorView:
    labels: list[str]  # the regions list's labels, in its order
    colored_fraction: float  # share of the image canvas's pixels drawn in colour (the X-ray is grey)
    screenshot: Path
    label_places: dict[str, tuple[float, float]]  # the brush labels' on-screen (x, y)
    hotkeys: dict[str, str]  # the brush labels' hotkeys, as the editor shows them
    selected_by_key: dict[str, str]  # key pressed -> the label it selected


def open_task(base_url: str, email: str, password: str, project: int, task: int, screenshot: Path,
              press: tuple[str, ...] = ("9",), timeout: float = 120) -> EditorView:
    """Log in, open `task` in the editor, wait until its regions are listed and drawn, save a
    screenshot, read where the brush labels sit and their hotkeys, then press each key of `press`
    and note which label it selected."""
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        wait = WebDriverWait(driver, timeout)
        driver.get(f"{base_url}/user/login/")
        wait.until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(email)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit], form input[type=submit]").click()
        wait.until(lambda d: "/user/login" not in d.current_url)
        driver.get(f"{base_url}/projects/{project}/data?task={task}")

        # The editor re-renders its lists while it loads (a virtual regions list), so what it shows is
        # read in one script call each time: no element handle is kept that a re-render would make stale.
        def listed(d):  # the regions list renders the rows in view: their labels
            return [t for t in d.execute_script(_REGION_LABELS) if t] or False

        labels = wait.until(listed)
        deadline = time.monotonic() + timeout
        while True:  # the masks are painted after the list: wait for colour on the image canvas
            fraction = _colored_fraction(driver)
            if fraction > 0.01 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(screenshot))
        places, hotkeys = {}, {}
        for text, x, y, key in driver.execute_script(_BRUSH_LABELS):
            places[text] = (x, y)
            hotkeys[text] = key
        selected = {}
        for key in press:
            ActionChains(driver).send_keys(key).perform()
            selected[key] = wait.until(lambda d: d.execute_script(_SELECTED_LABEL))
        return EditorView(labels=listed(driver) or labels, colored_fraction=fraction, screenshot=screenshot,
                          label_places=places, hotkeys=hotkeys, selected_by_key=selected)
    finally:
        driver.quit()


_REGION_LABELS = """return Array.from(document.querySelectorAll('.lsf-outliner-item__title'),
                                   e => e.innerText.trim());"""
_BRUSH_LABELS = """const panel = document.querySelector('.lsf-labels');
return Array.from(panel ? panel.querySelectorAll('.lsf-label') : [], e => {
  const r = e.getBoundingClientRect(), key = e.querySelector('.lsf-label__hotkey');
  return [e.querySelector('.lsf-label__text').innerText.trim(), r.x, r.y, key ? key.innerText.trim() : ''];
});"""
_SELECTED_LABEL = """const e = document.querySelector('.lsf-labels .lsf-label_selected .lsf-label__text');
return e ? e.innerText.trim() : null;"""
_LARGEST_CANVAS = """let best = null, area = 0;
for (const c of document.querySelectorAll('canvas')) {
  const r = c.getBoundingClientRect();
  if (r.width * r.height > area) { area = r.width * r.height; best = [r.x, r.y, r.width, r.height]; }
}
return best;"""


def _colored_fraction(driver) -> float:
    """Share of the largest canvas's on-screen pixels drawn in colour."""
    import cv2

    rect = driver.execute_script(_LARGEST_CANVAS)
    png = np.frombuffer(driver.get_screenshot_as_png(), np.uint8)
    if rect is None:
        return 0.0
    image = cv2.imdecode(png, cv2.IMREAD_COLOR)
    x, y, w, h = (int(v) for v in rect)
    crop = image[max(y, 0):y + h, max(x, 0):x + w]
    if crop.size == 0:
        return 0.0
    hsv = cv2.cvtColor(crop, cv2.COLOR_BGR2HSV)
    return float(((hsv[..., 1] > 60) & (hsv[..., 2] > 40)).mean())
