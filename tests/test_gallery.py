"""The gallery in a real browser (headless Chromium through Playwright): a search from the
address renders thumbnails, "more like this" runs an image query, a recording gets a player, and
the keyboard moves through results.

MMSEARCH_GALLERY_SCREENSHOT=docs/gallery.png pytest -m browser tests/test_gallery.py also saves
the screenshot the README shows (of images this test draws, free to redistribute).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_note, make_tone
from PIL import Image, ImageDraw, ImageFilter

pytestmark = pytest.mark.browser
pytest.importorskip("starlette", reason="needs the serve extra: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright (the dev extra)")

from mmsearch.config import EncoderOptions, IndexOptions, ModelSpec  # noqa: E402
from mmsearch.pipeline.run import index_paths  # noqa: E402
from mmsearch.serve import ServeOptions, create_app  # noqa: E402

CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    """A Chromium to drive: $MMSEARCH_CHROMIUM, one on PATH, or Playwright's own download."""
    found = os.environ.get("MMSEARCH_CHROMIUM") or next(
        filter(None, map(shutil.which, CHROMIUMS)), None
    )
    if found:
        return found
    with sync_api.sync_playwright() as p, contextlib.suppress(Exception):
        own = p.chromium.executable_path
        return own if Path(own).is_file() else None
    return None


def landscape(path: Path, seed: int, size=(480, 360)) -> Path:
    """A made-up landscape (sky, sun, hills, water): pleasant to look at, ours to publish."""
    rng = np.random.default_rng(seed)
    w, h = size
    top, bottom = rng.integers(40, 255, 3), rng.integers(40, 255, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    sky = (top * (1 - t) + bottom * t).astype(np.uint8).repeat(w, axis=1)
    img = Image.fromarray(sky)
    draw = ImageDraw.Draw(img)
    sun = rng.integers(0, w), rng.integers(h // 8, h // 2), rng.integers(18, 50)
    draw.ellipse([sun[0] - sun[2], sun[1] - sun[2], sun[0] + sun[2], sun[1] + sun[2]],
                 fill=tuple(int(c) for c in rng.integers(200, 256, 3)))  # fmt: skip
    for layer in range(3):
        base = h * (0.45 + 0.15 * layer)
        xs = np.linspace(0, w, 9)
        ys = base + rng.normal(0, h * 0.06, 9)
        shade = tuple(int(c) for c in (bottom * (0.7 - 0.2 * layer)).clip(0, 255))
        draw.polygon([(0, h), *zip(xs, ys, strict=True), (w, h)], fill=shade)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.filter(ImageFilter.SMOOTH).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def browser_library(tmp_path_factory, tiny_model, clap_dir):
    """A few drawn photos, two notes and a recording, indexed with the tiny towers."""
    from test_audio_cli import few_captions

    base = tmp_path_factory.mktemp("gallery")
    media = base / "Pictures"
    for i in range(9):
        landscape(media / f"holiday-{i:02}.jpg", seed=i)
    make_note(
        base / "Notes" / "trip.md",
        "# Trip\nWe walked along the beach at sunset.\nThe dog chased the waves.\n",
    )
    make_note(
        base / "Notes" / "recipes.md", "Pancakes: flour, milk, two eggs.\nServe with lemon.\n"
    )
    (base / "Sounds").mkdir()
    make_tone(base / "Sounds" / "birdsong.wav", 880, 4.0, seed=3)
    spec = ModelSpec.parse(str(tiny_model))
    with pytest.MonkeyPatch.context() as mp:
        few_captions(mp)
        index_paths(IndexOptions(
            roots=(media, base / "Notes", base / "Sounds"), root_dir=base / "indexes",
            encoder=EncoderOptions(model=spec, audio_model=str(clap_dir)), workers=0,
        ))  # fmt: skip
    return base


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    from test_audio_tower import make_tiny_clap

    return make_tiny_clap(tmp_path_factory.mktemp("clap") / "clap")


@contextlib.contextmanager
def running(app):
    """The app on uvicorn in a thread, on a free loopback port."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


def until(page, js: str, seconds: float = 10.0) -> None:
    """Wait for a JS expression to hold. (Playwright's wait_for_function evaluates its
    predicate with eval, which the gallery's Content-Security-Policy rightly forbids.)"""
    deadline = time.monotonic() + seconds
    while not page.evaluate(js):
        assert time.monotonic() < deadline, f"timed out waiting for {js}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def page(browser_library):
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium: apt-get install chromium (or set MMSEARCH_CHROMIUM)")
    app = create_app(ServeOptions(root_dir=browser_library / "indexes"))
    with running(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1280, "height": 860})
        tab.base = url
        tab.problems = []  # the page's own errors and refused resources (CSP included)
        tab.on("console", lambda m: m.type == "error" and tab.problems.append(m.text))
        tab.on("pageerror", lambda e: tab.problems.append(str(e)))
        yield tab
        browser.close()


@pytest.fixture(autouse=True)
def no_page_errors(request):
    yield
    if "page" in request.fixturenames:
        tab = request.getfixturevalue("page")
        problems, tab.problems[:] = list(tab.problems), []
        assert not problems


def test_search_from_the_address_renders_thumbnails(page):
    page.goto(f"{page.base}/?q=a+holiday+photo&type=image")
    page.wait_for_selector(".card.image img")
    until(
        page,
        "[...document.querySelectorAll('.card.image img')]"
        ".every(img => img.complete && img.naturalWidth > 0)",
    )
    assert page.locator(".card.image").count() == 9
    assert page.input_value("#q") == "a holiday photo" and page.input_value("#type") == "image"
    assert "9 results" in page.text_content("#status")
    if os.environ.get("MMSEARCH_GALLERY_SCREENSHOT"):
        page.goto(f"{page.base}/?q=holiday+at+sunset")
        until(page, "document.querySelectorAll('.card').length >= 12")
        page.wait_for_timeout(500)
        page.screenshot(path=os.environ["MMSEARCH_GALLERY_SCREENSHOT"])


def test_more_like_this_runs_an_image_query(page):
    page.goto(f"{page.base}/?q=a+holiday+photo&type=image")
    third = page.locator(".card.image").nth(2)
    name = third.locator(".name").text_content()
    with page.expect_response(lambda r: "/api/search?like=" in r.url) as answer:
        third.hover()
        third.locator("button.like").click()
    assert answer.value.status == 200
    # Among the images, the photo itself comes first (cosine 1). Across types the order is by
    # relevance, which random towers make meaningless (tests/test_relevance.py covers it).
    until(page, f"document.querySelector('.card.image .name')?.textContent === {name!r}")
    first = page.locator(".card.image").first
    assert first.locator(".score").get_attribute("title").endswith("score 1")
    assert "like=" in page.url and "q=" not in page.url  # shareable, and Back returns
    page.go_back()
    until(page, "document.querySelector('#q').value === 'a holiday photo'")


def test_a_recording_has_a_player_that_starts_at_its_moment(page):
    page.goto(f"{page.base}/?q=birds+singing&type=audio")
    player = page.locator(".card.audio audio").first
    player.wait_for(state="attached")
    src = player.get_attribute("src")
    assert src.startswith("/file/default/") and "#t=" in src
    duration = player.evaluate(
        "a => new Promise((ok, fail) => { a.onloadedmetadata = () => ok(a.duration);"
        " a.onerror = () => fail(String(a.error && a.error.message)); a.preload = 'metadata'; a.load(); })"
    )
    assert duration == pytest.approx(4.0, abs=0.05)


def test_keyboard_moves_opens_and_closes(page):
    page.goto(f"{page.base}/?q=beach")
    page.wait_for_selector(".card")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.i") == "0"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")
    assert page.locator("#viewer").evaluate("d => d.open")
    second = page.locator(".card .name").nth(1).text_content()
    assert page.text_content("#viewer-name") == second
    page.keyboard.press("Escape")
    assert not page.locator("#viewer").evaluate("d => d.open")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
