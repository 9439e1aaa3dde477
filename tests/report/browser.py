"""Debian's chromium, headless, driven by selenium: open a report page and read what it rendered."""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # Without these the browser tries the network at start, which this machine's closed network refuses.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1000",
)


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """A selenium driver of headless chromium with a throwaway profile, browser console logs kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium")
    driver_bin = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if browser is None or not Path(driver_bin).exists():
        pytest.fail("chromium and chromium-driver are needed: bash scripts/install.sh --test", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="cardpipe-chromium-") as profile:
        options = Options()
        options.binary_location = browser
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(driver_bin))
        try:
            driver.set_page_load_timeout(60)
            driver.set_script_timeout(60)
            yield driver
        finally:
            driver.quit()


@dataclass
class RenderedPage:
    console: list[dict[str, Any]]  # every console message
    charts: dict[str, dict[str, Any]]  # id -> rendered, error, empty, marks (mark items drawn), rects
    facts: list[tuple[str, str]]  # (data-fact path, text shown)
    resources: list[str]  # anything the page fetched
    height: int  # of the page, CSS pixels


_READ = """
const done = arguments[arguments.length - 1];
window.cardpipeReady.then(() => {
  const charts = {};
  for (const el of document.querySelectorAll(".chart")) {
    charts[el.id] = {
      rendered: el.getAttribute("data-rendered") === "true",
      error: el.getAttribute("data-error"),
      empty: el.getAttribute("data-empty") === "true",
      marks: el.querySelectorAll("svg g.role-mark path, svg g.role-mark line").length,
      rects: el.querySelectorAll("svg g.mark-rect.role-mark path").length,
    };
  }
  const facts = Array.from(document.querySelectorAll("[data-fact]")).map(e => [e.dataset.fact, e.textContent]);
  const resources = performance.getEntriesByType("resource").map(r => r.name);
  done({charts, facts, resources, height: document.documentElement.scrollHeight});
});
"""


def open_report(driver: Any, page: Path) -> RenderedPage:
    """Open ``page`` from its file, wait until every chart has rendered (or failed), read it back."""
    driver.get(page.resolve().as_uri())
    read = driver.execute_async_script(_READ)
    return RenderedPage(
        console=list(driver.get_log("browser")),
        charts=read["charts"],
        facts=[(path, text) for path, text in read["facts"]],
        resources=read["resources"],
        height=int(read["height"]),
    )


def screenshot(driver: Any, out: Path, width: int = 1400) -> Path:
    """The whole page as a PNG (chromium's DevTools capture beyond the viewport)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    out.write_bytes(base64.b64decode(shot["data"]))
    return out
