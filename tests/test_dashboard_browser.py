"""The dashboard in a real browser: `turbofed dashboard` on loopback against a fixture store,
headless Chromium loads every page; each shows its title, no Streamlit exception box, and
the fixture's numbers; screenshots go to the test's tmp_path.

Streamlit renders client-side over a websocket, so the test drives Chromium through the
DevTools protocol (turbofed.dashboard.browser) and waits for the page to render, with bounded
timeouts; the server's and the browser's process groups are always killed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from turbofed.dashboard.browser import PAGE_PATHS, Chromium, find_chromium, serve
from turbofed.dashboard.samples import write_small_store
from turbofed.store.sqlite import SqliteStore

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                                "CI installs it in .ci/run)"),
]
RENDER_TIMEOUT_S = 60
# Text each page shows from the fixture store (turbofed.dashboard.samples.write_small_store).
EXPECTED_TEXT = {
    "Fleet": ["Engines, most urgent first", "Sites"],
    "Federated vs local": ["Fleet RMSE, federated", "16.75", "One engine over its life"],
    "Rounds": ["Rounds closed", "Rejected updates", "v3"],
    "Maintenance economics": ["Lowest total cost", "run to failure", "federated RUL ≤ k", "Cost against k"],
}


@pytest.fixture(scope="module")
def fixture_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "results.sqlite"
    with SqliteStore(path) as store:
        write_small_store(store)
    return path


@pytest.fixture(scope="module")
def dashboard_url(fixture_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "dashboard.log"
    with serve(fixture_store, timeout=60, log=log) as url:
        assert url.startswith("http://127.0.0.1:")
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    assert CHROMIUM is not None
    with Chromium(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"), window=(1400, 1000), timeout=30) as b:
        yield b


@pytest.mark.timeout(180)
@pytest.mark.parametrize("title", list(PAGE_PATHS))
def test_page_renders_in_chromium(title: str, dashboard_url: str, browser: Chromium, tmp_path: Path) -> None:
    browser.navigate(f"{dashboard_url}/{PAGE_PATHS[title]}")
    state = browser.wait_rendered(title, timeout=RENDER_TIMEOUT_S)
    shot = browser.screenshot(tmp_path / f"{PAGE_PATHS[title] or 'fleet'}.png")
    assert title in state["h1"], state["h1"]
    assert state["exceptions"] == [], state["exceptions"]
    for text in EXPECTED_TEXT[title]:
        assert text in state["text"], (text, state["text"][:2000])
    assert state["charts"] >= 1 and state["tables"] >= 1
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(180)
def test_fleet_has_its_own_address(dashboard_url: str, browser: Chromium) -> None:
    """/fleet opens the Fleet page (it used to say "Page not found" and fall back to it)."""
    browser.navigate(f"{dashboard_url}/fleet")
    state = browser.wait_rendered("Fleet", timeout=RENDER_TIMEOUT_S)
    assert "Fleet" in state["h1"] and state["exceptions"] == []
    assert "not found" not in browser.evaluate("document.body.innerText")


@pytest.mark.timeout(180)
def test_missing_store_page_in_chromium(tmp_path: Path, browser: Chromium) -> None:
    missing = tmp_path / "not-yet" / "results.sqlite"
    with serve(missing, timeout=60, log=tmp_path / "dashboard.log") as url:
        browser.navigate(f"{url}/rounds")
        state = browser.wait_rendered("Rounds", timeout=RENDER_TIMEOUT_S)
        browser.screenshot(tmp_path / "missing-store.png")
    assert state["exceptions"] == []
    assert "No results store at" in state["text"] and "turbofed demo" in state["text"]
    assert not missing.parent.exists()
