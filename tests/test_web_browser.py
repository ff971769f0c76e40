"""The page in a real browser (headless Chromium, Debian's package, driven through Selenium): the live view
updates, a sample starts and stops, and a crop reviewed with the keyboard keeps its label across an agent
restart and reaches the broker. Screenshots of each page go to $LEUKOSCOPE_SCREENSHOTS when set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.broker import Broker, free_port
from tests.conftest import ROOT
from tests.web_helpers import FRAMES, request, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="browser tests need selenium (pip install -e '.[dev]')")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                                   reason="browser tests need Debian's chromium and chromium-driver")]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _config(tmp_path: Path, broker_port: int, web_port: int) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[device]\nid = "b1"\n[source]\ntype = "folder"\npath = "{FRAMES}"\nloop = true\nfps = 3.0\n'
                    f'[segmentation]\num_per_px = {json.loads((FRAMES / "leukoscope-scale.json").read_text())["um_per_px"]}\n'
                    f'[classifier]\nnum_threads = 1\n'
                    f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nkeepalive_s = 5\nreconnect_max_s = 2\n'
                    f'[outbox]\npath = "{tmp_path / "outbox.sqlite3"}"\n'
                    f'[web]\nenabled = true\nport = {web_port}\nreview_db = "{tmp_path / "reviews.sqlite3"}"\nunflagged_fraction = 0.5\n')
    return path


class EdgeRun:
    """``edge run`` in a child process, as the service runs it."""

    def __init__(self, config: Path, port: int) -> None:
        self.log = config.with_suffix(".log").open("a")
        self.process = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(config)], cwd=ROOT,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        assert wait_for(lambda: self._up(port), 60), config.with_suffix(".log").read_text()[-2000:]

    def _up(self, port: int) -> bool:
        assert self.process.poll() is None, "the agent exited"
        try:
            return request(port, "GET", "/api/live").status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0
        self.log.close()


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _shot(driver, name: str) -> None:
    folder = os.environ.get("LEUKOSCOPE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_live_sample_and_keyboard_review_in_a_real_browser(tmp_path, browser):
    from tests.test_service import Subscriber

    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker.port, topic="leukoscope/b1/reviews", client_id="browser-reviews")
    port = free_port()
    config = _config(tmp_path, broker.port, port)
    agent = EdgeRun(config, port)
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    url = f"http://127.0.0.1:{port}"
    try:
        # live: the frame number and the picture change as frames are analysed
        browser.get(url + "/")
        wait.until(lambda d: d.find_element(By.ID, "frame-no").text.startswith("#"))
        first = browser.find_element(By.ID, "frame-no").text
        wait.until(lambda d: d.find_element(By.ID, "frame-no").text not in (first, "–"))
        wait.until(lambda d: d.execute_script("return document.getElementById('frame').naturalWidth") > 0)
        assert float(browser.find_element(By.ID, "fps").text) > 0
        _shot(browser, "live")

        # sample: start one, watch it count, stop it
        browser.get(url + "/sample")
        browser.find_element(By.ID, "sample-id").send_keys("BM-7")
        browser.find_element(By.ID, "start").click()
        wait.until(lambda d: "BM-7 started" in d.find_element(By.ID, "message").text)
        wait.until(lambda d: d.find_element(By.ID, "s-id").text == "BM-7")
        wait.until(lambda d: d.find_element(By.ID, "s-frames").text not in ("–", "0"))
        wait.until(lambda d: "%" in d.find_element(By.ID, "s-fraction").text)
        _shot(browser, "sample")
        browser.find_element(By.ID, "stop").click()
        wait.until(lambda d: "BM-7 stopped" in d.find_element(By.ID, "message").text)
        wait.until(lambda d: d.find_element(By.ID, "s-id").text == "no sample open")

        # review: label the shown crop with the keyboard
        browser.get(url + "/review")
        browser.find_element(By.ID, "reviewer").send_keys("KB")
        wait.until(lambda d: d.find_element(By.ID, "crop").get_attribute("data-id"))
        wait.until(lambda d: d.execute_script("return document.getElementById('crop').naturalWidth") > 0)
        _shot(browser, "review")
        crop_id = browser.find_element(By.ID, "crop").get_attribute("data-id")
        browser.find_element(By.TAG_NAME, "body").click()  # leave the name field: keys now label
        browser.find_element(By.TAG_NAME, "body").send_keys("b")
        wait.until(lambda d: f"cell {crop_id}: blast" in d.find_element(By.ID, "message").text)
        row = f"//table[@id='reviewed']//tr[@data-id='{crop_id}']"
        wait.until(lambda d: d.find_elements(By.XPATH, row))
        assert sub.wait_for(lambda: sub.payloads("/reviews"), 30)
        message = json.loads(sub.payloads("/reviews")[0])
        assert (message["crop_id"], message["label"], message["reviewer"]) == (int(crop_id), "blast", "KB")

        # the label survives a restart of the agent
        agent.stop()
        agent = EdgeRun(config, port)
        browser.get(url + "/review")
        wait.until(lambda d: d.find_elements(By.XPATH, row))
        cells = [c.text for c in browser.find_elements(By.XPATH, row + "/td")]
        assert cells[:2] == [crop_id, "blast"] and cells[3] == "KB" and cells[4] == "yes"
        _shot(browser, "review-after-restart")
    finally:
        agent.stop()
        sub.close()
        broker.stop()
