"""`p2pfl sim --html`: one self-contained `report.html` next to the PNGs (nothing it loads from
elsewhere, no URL it could reach), holding the summary table; in a real headless Chromium (where
installed) its charts and topology draw from the inlined data alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfl.simulation.html_report import render
from tests.helpers import small_scenario
from tests.test_monitor_web_browser import _browser_missing, _chromium

pytestmark = pytest.mark.timeout(300)

TINY = small_scenario("tiny-html", 3)


def test_sim_html_writes_one_self_contained_report_with_the_summary(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(scenario), "--html", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "report.html" in result.stdout
    assert (out / "accuracy_vs_round.png").exists()  # next to the PNGs
    page = (out / "report.html").read_text()
    assert "<script src" not in page and "<link" not in page
    code = re.sub(r"/\*.*?\*/", "", page, flags=re.S)  # licence comments name their homes
    assert re.findall(r"https?://", code) == []
    table = page[page.index('<table class="summary"') : page.index("</table>")]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table, flags=re.S)
    assert len(rows) == 3  # the header and one row per schedule
    assert "ring" in rows[1] + rows[2] and "partial-mesh" in rows[1] + rows[2]
    assert "mean acc" in rows[0]

    if (why := _browser_missing()) is not None:
        pytest.skip(f"report.html checked as text only: {why}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chromium(tmp_path / "chromium-profile")
    try:
        driver.get((out / "report.html").as_uri())
        topo = driver.find_element(By.ID, "topo-0")
        WebDriverWait(driver, 20).until(lambda _: topo.get_attribute("data-nodes") == "3")
        assert int(topo.get_attribute("data-edges")) >= 3  # a ring of 3
        assert len(driver.find_elements(By.CSS_SELECTOR, ".uplot")) == 4  # 2 charts a schedule
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()


def test_text_from_records_cannot_end_the_page_s_script_or_inject_markup() -> None:
    records = [
        {"schedule": "ring", "node": "</script><b>x", "round": 1, "t": 0.5, "accuracy": 0.5,
         "bytes_sent": 10, "honest": True},
    ]  # fmt: skip
    summary = {"schedules": {"<i>ring</i>": {
        "final_mean_accuracy": 0.5, "final_min_accuracy": 0.5, "rounds_to_80pct": 1,
        "seconds_to_80pct": 0.5, "messages_sent": 1, "bytes_sent": 10, "rejected": 0,
        "wall_seconds": 1.0}}, "best": "<i>ring</i>"}  # fmt: skip
    page = render(records, summary, "<script>", {"ring": [("</script><b>x", "y")]})
    assert "</script><b>x" not in page and "<i>ring</i>" not in page
    assert page.count("<script") == page.count("</script>") == 4  # data and three scripts


def test_sim_html_with_matrix_is_one_line_and_exit_2(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(TINY)
    result = subprocess.run(
        [sys.executable, "-m", "p2pfl", "sim", str(scenario), "--html", "--matrix", "--out",
         str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: --html reports a comparison run, not a --matrix"
    ]
    assert not (tmp_path / "out" / "report.html").exists()
