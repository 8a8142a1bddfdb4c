"""The gallery in a real browser: Debian's headless chromium, driven by Playwright.

Load the grid, scroll for more, search, filter, open a task, play its video, step with
the arrows and go back with Esc, at a desktop's and a phone's width. Each test saves a
screenshot under its tmp folder; the assertions are on the page, not on pixels.
``python tests/test_gallery_browser.py`` takes the README's two screenshots.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from gallery_world import (
    HOSTILE,
    PENDING,
    VIDEO,
    build_archive,
    hostile_id,
    image_id,
    newest_first,
    running,
)
from playwright.sync_api import Browser, Page, expect, sync_playwright

from fetcher.gallery import GalleryOptions

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = Path(__file__).resolve().parent.parent / "docs"
TILES = "#grid li.card"


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless; no browser of Playwright's own is downloaded."""
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("browser") / "archive"
    # On a thread of its own: Playwright's sync API keeps an event loop running on this one.
    with ThreadPoolExecutor(1) as worker:
        archive = worker.submit(build_archive, folder).result()
    with running(GalleryOptions(archive, port=0)) as address:
        yield address


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as running_browser:
        yield running_browser


@pytest.fixture
def page(browser: Browser, tmp_path: Path) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.on(
        "console", lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None
    )
    try:
        yield opened
        opened.screenshot(path=tmp_path / "last.png", full_page=True)
    finally:
        context.close()
    assert errors == []  # no script error, nothing the policy had to block


def play(page: Page) -> None:
    """Play the task page's video, muted; returns once it decodes and its time runs."""
    video = page.locator("main.task video")
    video.evaluate("(v) => { v.muted = true; return v.play(); }")
    page.wait_for_function(
        "() => { const v = document.querySelector('main.task video'); "
        "return v.readyState >= 2 && v.currentTime > 0.3; }",
        timeout=15000,
    )
    assert video.evaluate("(v) => v.error") is None


def test_grid_loads_and_scrolls_for_more(page: Page, url: str, tmp_path: Path) -> None:
    """The server sends four tiles; scrolling brings the rest through the cards API's cursor."""
    asked: list[str] = []
    page.on("request", lambda r: asked.append(r.url) if "/api/cards" in r.url else None)
    answer = page.goto(url + "?limit=4")
    assert answer is not None and answer.text().count('<li class="card') == 4
    page.screenshot(path=tmp_path / "first-page.png")
    total = len(newest_first()) + 1
    for _ in range(10):
        page.mouse.wheel(0, 5000)
        if page.locator(TILES).count() == total:
            break
        page.wait_for_timeout(200)
    expect(page.locator(TILES)).to_have_count(total)
    shown = page.locator("#grid a[data-task]").evaluate_all("(as) => as.map(a => a.dataset.task)")
    assert [t for t in shown if t in newest_first()] == newest_first()
    expect(page.locator("#more")).to_have_count(0)
    assert asked and all("after=" in address for address in asked)


def test_search_box_finds_the_prompt(page: Page, url: str) -> None:
    """Words typed in the search box, then Enter: only the matching task is left."""
    page.goto(url)
    page.get_by_label("Search").fill("lighthouse")
    page.get_by_label("Search").press("Enter")
    page.wait_for_url(re.compile(r"q=lighthouse"))
    expect(page.locator(TILES)).to_have_count(1)
    expect(page.locator(TILES).first).to_contain_text("a lighthouse at dusk")


def test_filter_applies_on_change(page: Page, url: str) -> None:
    """Choosing a state in its menu reloads the grid with that state only."""
    page.goto(url)
    page.get_by_label("State").select_option("pending")
    page.wait_for_url(re.compile(r"state=pending"))
    expect(page.locator(TILES)).to_have_count(1)
    expect(page.locator(f'a[data-task="{PENDING}"] .placeholder')).to_have_text("pending")


def test_video_plays_on_its_task_page(page: Page, url: str, tmp_path: Path) -> None:
    """The video tile opens its task; the real clip decodes and its time runs."""
    page.goto(url)
    page.locator(f'a[data-task="{VIDEO}"]').click()
    page.wait_for_url(re.compile(VIDEO))
    expect(page.locator("main.task video")).to_have_attribute("preload", "metadata")
    play(page)
    page.screenshot(path=tmp_path / "video.png")


def test_arrows_step_between_tasks_and_esc_goes_back(page: Page, url: str) -> None:
    """On a task page, Right and Left step through the grid's order, Esc returns to it."""
    order = newest_first()
    page.goto(url)
    page.locator(f'a[data-task="{order[1]}"]').click()
    page.wait_for_url(re.compile(order[1]))
    expect(page.locator("#next")).to_be_visible()
    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(order[2]))
    page.keyboard.press("ArrowRight")
    page.wait_for_url(re.compile(order[3]))
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(order[2]))
    page.keyboard.press("Escape")
    page.wait_for_url(url)
    expect(page.locator(TILES).first).to_be_visible()


def test_arrows_work_on_a_task_page_opened_directly(page: Page, url: str) -> None:
    """A task page opened by its address (no grid before it) steps with the arrows too."""
    order = newest_first()
    page.goto(url + "task/" + order[2])
    expect(page.locator("#prev")).to_be_visible()
    for key, lands in (("ArrowRight", 3), ("ArrowLeft", 2), ("ArrowLeft", 1)):
        page.keyboard.press(key)
        page.wait_for_url(re.compile(order[lands]))


def test_arrows_move_through_the_grid(page: Page, url: str) -> None:
    """On the grid, the arrows move the focus from tile to tile; Enter opens one."""
    page.goto(url)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    focused = page.evaluate("() => document.activeElement.dataset.task")
    assert focused == page.locator("#grid a[data-task]").nth(1).get_attribute("data-task")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(focused))


def test_script_in_a_prompt_stays_text(page: Page, url: str) -> None:
    """A prompt holding <script> shows as text and never runs."""
    page.goto(url + "task/" + hostile_id())
    expect(page.locator("h1.prompt")).to_have_text(HOSTILE)
    assert page.title() != "pwned"
    assert page.locator("h1.prompt b").count() == 0


def test_a_phone_width_fits(browser: Browser, url: str, tmp_path: Path) -> None:
    """At 390 px the grid has two columns and nothing scrolls sideways; nor does a task."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        phone = context.new_page()
        phone.goto(url)
        boxes = [phone.locator(TILES).nth(k).bounding_box() for k in range(3)]
        assert boxes[0] and boxes[1] and boxes[2]
        assert boxes[0]["y"] == boxes[1]["y"] < boxes[2]["y"]
        phone.screenshot(path=tmp_path / "phone-grid.png")
        for target in ("", f"task/{image_id(2)}"):
            phone.goto(url + target)
            wide = phone.evaluate("() => document.documentElement.scrollWidth")
            assert wide <= 390
        phone.screenshot(path=tmp_path / "phone-task.png", full_page=True)
    finally:
        context.close()


def take_docs_screenshots(target: Path = DOCS) -> list[Path]:
    """The README's two pictures, the grid and a task page, from the test archive."""
    target.mkdir(exist_ok=True)
    grid, task = target / "gallery-grid.png", target / "gallery-task.png"
    with tempfile.TemporaryDirectory() as folder:
        archive = build_archive(Path(folder) / "archive")
        with running(GalleryOptions(archive, port=0)) as address, chromium() as browser:
            shot = browser.new_page(viewport={"width": 1100, "height": 720})
            shot.goto(address)
            shot.wait_for_function(
                "() => Array.from(document.images).every(i => i.complete && i.naturalWidth)"
            )
            shot.screenshot(path=grid)
            shot.goto(address + "task/" + image_id(2))
            shot.wait_for_function(
                "() => Array.from(document.images).every(i => i.complete && i.naturalWidth)"
            )
            shot.screenshot(path=task)
    return [grid, task]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    for written in take_docs_screenshots():
        print(written)
