"""Acceptance of `p2pfl monitor --web`: a real headless Chromium opens the dashboard of a live
3-node network (real `p2pfl run` processes on a private Mosquitto, and `p2pfl monitor --web` as
a process of its own). The page lists the 3 nodes, the topology shows their edges, and the
global accuracy shown follows the monitor's within 5 s as rounds pass. The screenshot is left
in the test's temp dir as `dashboard.png` (the CI artefact).

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them) and selenium; skipped
with the reason where they are missing. selenium is given the driver's path, so its
selenium-manager never downloads anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from p2pfl.transport.base import LocalBroker
from tests.nodeproc import NodeProcess, stop_all, wait_until

pytestmark = pytest.mark.timeout(240)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# No internet here: without these, Chromium keeps trying to reach Google's services.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1500"]  # fmt: skip
FAST = ["--model", "mlp", "--local-epochs", "1", "--seed", "0", "--telemetry-interval", "1",
        "--num-partitions", "3", "--rounds", "100000", "--run-name", "browser-demo",
        "--tag", "suite=web"]  # fmt: skip


def _browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed (pip install -e '.[dev]')"
    return None


def _chromium(profile: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _dashboard_url(monitor: subprocess.Popen[str], stderr: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in stderr.read_text().splitlines():
            if line.startswith("dashboard: "):
                return line.removeprefix("dashboard: ").strip()
        assert monitor.poll() is None, stderr.read_text()
        time.sleep(0.2)
    raise AssertionError(f"the monitor never said where its dashboard is: {stderr.read_text()}")


def _api(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/snapshot", timeout=10) as resp:
        return json.loads(resp.read())


def test_a_browser_shows_a_live_network_of_three_nodes(
    mosquitto: LocalBroker, tmp_path: Path
) -> None:
    if (why := _browser_missing()) is not None:
        pytest.skip(why)
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    net = f"web-{uuid.uuid4().hex[:6]}"
    where = ["--broker", mosquitto.uri, "--discovery", "presence,static"]
    nodes = [
        NodeProcess(
            f"w{i}",
            ["--id", f"w{i}", "--network", net, "--state-dir", str(tmp_path / f"w{i}"),
             "--partition-index", str(i), "--interface", "127.0.0.1", *FAST, *where],
            tmp_path,
        ).start()
        for i in range(3)
    ]  # fmt: skip
    logs = lambda: "\n".join(n.tail() for n in nodes)  # noqa: E731
    stderr = tmp_path / "monitor.err"
    with stderr.open("w") as err:
        monitor = subprocess.Popen(
            [sys.executable, "-m", "p2pfl", "monitor", "--network", net, "--broker",
             mosquitto.uri, "--no-mdns", "--web", "127.0.0.1:0",
             "--state-dir", str(tmp_path / "monitor")],
            stdout=subprocess.DEVNULL, stderr=err, text=True,
        )  # fmt: skip
    driver = None
    try:
        url = _dashboard_url(monitor, stderr)
        assert url.startswith("http://127.0.0.1:")
        driver = _chromium(tmp_path / "chromium-profile")
        driver.get(url)
        # the rows are redrawn every second: a row found may be gone when it is read; try again
        wait = WebDriverWait(
            driver, 120, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
        )

        def rows() -> list[str]:
            return [r.get_attribute("data-node") for r in
                    driver.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")]  # fmt: skip

        wait.until(lambda _: sorted(rows()) == ["w0", "w1", "w2"], message=logs())
        topology = driver.find_element(By.ID, "topology")
        wait.until(lambda _: int(topology.get_attribute("data-edges")) >= 3, message=logs())
        assert topology.get_attribute("data-nodes") == "3"
        name = driver.find_element(By.ID, "run-name")
        wait.until(lambda _: name.text == "browser-demo", message=logs())
        conf = driver.find_element(By.ID, "run-config")
        wait.until(lambda _: "mlp" in conf.text and "model" in conf.text, message=logs())

        shown = driver.find_element(By.ID, "g-accuracy")
        wait.until(lambda _: shown.text not in ("", "–"), message=logs())
        before = shown.text
        # Rounds pass: the monitor's global accuracy moves off what the page shows ...
        wait_until(
            lambda: _fmt(_api(url)["global"]["accuracy"]) != before,
            120, "the global accuracy to change", logs,
        )  # fmt: skip
        # ... and the page follows within 5 s.
        WebDriverWait(driver, 5, poll_frequency=0.1).until(lambda _: shown.text != before)
        driver.save_screenshot(str(tmp_path / "dashboard.png"))

        # Issue 17: a node paused by hand shows `paused: <reason>` in its row.
        paused = subprocess.run(
            [sys.executable, "-m", "p2pfl", "pause", "--state-dir", str(tmp_path / "w2")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert paused.returncode == 0, paused.stderr

        def status_of_w2() -> str:
            cell = '#nodes tbody tr[data-node="w2"] td.status'
            return str(driver.find_element(By.CSS_SELECTOR, cell).text)

        wait.until(lambda _: status_of_w2() == "paused: manual", message=logs())
    finally:
        if driver is not None:
            driver.quit()
        monitor.terminate()
        monitor.wait(30)
        stop_all(nodes)
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert monitor.returncode == 0, stderr.read_text()


def _fmt(acc: float | None) -> str:
    return "–" if acc is None else f"{acc:.4f}"
