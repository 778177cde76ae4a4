"""The chat app in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
Selenium; nothing is downloaded) opens the page that `python -m smolvlm_qformer.app FOLDER` serves, uploads an image,
asks, and reads the answer: the tiny model's greedy answer, as `generate_texts` gives it. A screenshot of the page is
saved in the test's folder. Skipped where chromium or chromedriver is missing."""

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from smolvlm_qformer.inference import generate_texts, load_for_inference
from smolvlm_qformer.testing_utils import draw_shape, save_tiny_vlm

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
QUESTION = "What colour is the shape?"

webdriver = pytest.importorskip("selenium.webdriver", reason="Selenium is in the test extra")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
    ),
]


def visible_words(text: str) -> str:
    """What survives rendering in any case: letters and digits, one space between runs, control characters dropped
    (the tiny model's answers hold control characters, NUL included, and stray bytes that a page shows differently
    or not at all)."""
    return " ".join(re.findall(r"[A-Za-z0-9]+", re.sub(r"[\x00-\x1f\x7f]", "", text)))


@pytest.fixture
def server(tmp_path, processor):
    """`python -m smolvlm_qformer.app FOLDER` on a free port of 127.0.0.1: (url, folder)."""
    folder = save_tiny_vlm(tmp_path / "vlm", processor)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "smolvlm_qformer.app", str(folder), "--port", str(port)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                assert process.poll() is None, (tmp_path / "server.log").read_text()
                time.sleep(0.5)
        else:
            pytest.fail(f"the app did not answer at {url}:\n{(tmp_path / 'server.log').read_text()}")
        yield url, folder
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_chromium_uploads_an_image_asks_and_reads_generates_answer(server, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, folder = server
    image = tmp_path / "red-circle.png"
    draw_shape("red", "circle", size=64).save(image)
    model, processor = load_for_inference(str(folder))
    (expected,) = generate_texts(model, processor, [str(image)], [QUESTION], max_new_tokens=64)  # the app's default
    assert len(visible_words(expected)) >= 3

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[type=file]"))
        images_shown = len(driver.find_elements(By.TAG_NAME, "img"))
        upload.send_keys(str(image))
        wait.until(lambda d: len(d.find_elements(By.TAG_NAME, "img")) > images_shown)  # uploaded: its thumbnail
        box = driver.find_element(By.CSS_SELECTOR, "textarea")
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)

        shown = []

        def answered(d) -> bool:  # the answer has streamed in completely
            replies = d.find_elements(By.CSS_SELECTOR, "[data-testid='bot']")
            shown.append(replies[-1].get_attribute("textContent") if replies else "")
            return visible_words(shown[-1]) == visible_words(expected)

        try:
            wait.until(answered)
        except TimeoutException:
            pytest.fail(f"the page shows {shown[-1]!r}, generate_texts gives {expected!r}")
        finally:
            driver.save_screenshot(str(tmp_path / "chat.png"))
        assert driver.find_elements(By.XPATH, "//button[normalize-space()='Clear']")
        assert (tmp_path / "chat.png").stat().st_size > 10_000
    finally:
        driver.quit()
