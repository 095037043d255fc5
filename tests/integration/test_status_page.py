"""The aggregator's live status page in a real browser, during a real job.

`medsplit demo --http-port` runs the federation as processes over Mosquitto; headless Chromium
(Debian's, driven by selenium with Debian's chromedriver) loads the page while the job runs.
The DOM must show every site and a round counter and curves that advance between two reads;
the browser's own network log must show no request to any host but the aggregator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from medsplit.brokers.mosquitto import free_port

pytestmark = pytest.mark.integration
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), "make setup installs chromium"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-quic", "--no-first-run", "--window-size=1100,900",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _await_http(url: str, demo: subprocess.Popen[str], timeout: float) -> None:
    """Until the aggregator answers (it starts after the broker and the configs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert demo.poll() is None, "the demo ended before its aggregator served HTTP"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)  # not listening yet: nothing to block on but the port
    raise AssertionError(f"{url} did not answer within {timeout:g} s")


# Read in one script, so that a re-render between two element look-ups cannot leave a stale
# reference: the page replaces its table and curves each time /status answers.
_READ_PAGE = """
const counter = document.getElementById("round");
return {
  round: counter ? parseInt(counter.textContent, 10) : NaN,
  points: Array.from(document.querySelectorAll("#curve-accuracy polyline"))
    .reduce((sum, line) => sum + parseInt(line.dataset.points || "0", 10), 0),
  sites: Array.from(document.querySelectorAll("#sites tbody tr")).map(row => row.dataset.site),
  pooled: parseFloat(document.querySelectorAll("#pooled td")[7].textContent),
};
"""


def _reading(driver: webdriver.Chrome) -> tuple[int, int, list[str]]:
    """The round counter, the points on the accuracy curves and the sites in the table."""
    page = driver.execute_script(_READ_PAGE)
    counter = page["round"]
    return (counter if isinstance(counter, int) else -1), page["points"], page["sites"]


def _pooled_balanced_accuracy(driver: webdriver.Chrome) -> float:
    """The pooled row's balanced accuracy (NaN while no round has closed)."""
    value = driver.execute_script(_READ_PAGE)["pooled"]
    return float(value) if isinstance(value, int | float) else float("nan")


def test_the_status_page_follows_a_job_and_asks_only_the_aggregator(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    out, port = tmp_path / "run", free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "medsplit", "demo", "--sites", "2", "--rounds", "20",
         "--out", str(out), "--http-port", str(port), "--timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        _await_http(f"{base}/healthz", demo, 120)
        browser.get(f"{base}/")
        wait = WebDriverWait(browser, 120, poll_frequency=0.2)
        wait.until(lambda d: len(_reading(d)[2]) == 2)
        assert set(_reading(browser)[2]) == {"hospital-1", "hospital-2"}
        wait.until(lambda d: _reading(d)[0] >= 1)
        first = _reading(browser)
        wait.until(lambda d: _reading(d)[0] > first[0])
        second = _reading(browser)
        assert second[1] > first[1]  # the curves grew with the rounds
        assert 0.0 <= _pooled_balanced_accuracy(browser) <= 1.0  # pooled from the sites' counts
        assert "medsplit" in browser.title
        browser.save_screenshot(str(out / "status-page.png"))
        requests = [
            json.loads(entry["message"])["message"] for entry in browser.get_log("performance")
        ]
        sent = {
            r["params"]["request"]["url"]
            for r in requests
            if r["method"] == "Network.requestWillBeSent"
        }
        # What left the browser (chrome:// and data: are its own): the page and its /status.
        network = {u for u in sent if urlparse(u).scheme in {"http", "https", "ws", "wss"}}
        assert {f"{base}/", f"{base}/status"} <= network, network
        assert all(urlparse(u).netloc == f"127.0.0.1:{port}" for u in network), network
    finally:
        try:
            _, stderr = demo.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    assert demo.returncode == 0, stderr[-2000:]
    assert (out / "status-page.png").read_bytes().startswith(b"\x89PNG")
