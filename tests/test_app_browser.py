"""A real browser: Debian's Chromium, headless, driven by Playwright for Python.

It types sentences, clicks Run, waits for the recovered sentences on the page and saves
a screenshot. Skipped only when no Chromium exists and ``CI`` is not set; in CI a
missing browser fails the test.
"""

from __future__ import annotations

import os
import shutil
import socket
from urllib.parse import urlparse

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
SENTENCES = ["My PIN is four two seven one.", "Meet me behind the old library."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def browser_app(tiny, monkeypatch):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run should have installed it with apt")
        pytest.skip("no chromium on this machine (install Debian's chromium to run this test)")
    import app

    bundle = tiny("gpt2")  # the real engine on a tiny seeded GPT-2 keeps the test fast
    from labui import engines

    monkeypatch.setattr(engines, "load_model", lambda name, task="classification", device="cpu": bundle)
    demo = app.build_app()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_browser_types_runs_and_sees_recovered_sentences(browser_app, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def record(request) -> None:
                host = urlparse(request.url).hostname
                if request.url.startswith(("http://", "https://", "ws://", "wss://")) and host not in (
                    "127.0.0.1", "localhost"
                ):
                    outside.append(request.url)

            page.on("request", record)
            page.goto(browser_app, wait_until="load", timeout=60_000)
            # (not "networkidle": the page keeps a heartbeat stream open so that closing
            # the tab stops the visitor's runs)
            page.locator("#gll-run-text").wait_for(timeout=60_000)
            box = page.locator("#gll-sentences textarea")
            box.fill("\n".join(SENTENCES))
            page.locator("#gll-run-text").click()
            recovered = page.locator("#gll-recovered")
            for sentence in SENTENCES:
                expect(recovered).to_contain_text(sentence, timeout=90_000)
            expect(recovered).to_contain_text("matches original")
            expect(page.locator("#gll-metrics")).to_contain_text("ROUGE-1", timeout=30_000)
            expect(page.locator("#gll-text-status")).to_contain_text("Done")
            assert page.locator("#gll-grid .gll-tok").count() >= 10  # the token grid filled in
            shot = tmp_path / "app_text_tab.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("GLL_SCREENSHOT_DIR"):  # to look at it by hand
                shutil.copy(shot, os.environ["GLL_SCREENSHOT_DIR"])
        finally:
            browser.close()
    assert outside == [], f"the page fetched from outside: {outside}"


LET_GO = __import__("threading").Event()


def _endless_dager(b, update, **options):
    """A DAGER stand-in that runs until stopped, then holds on (as a real search step
    would) until the test has seen "Stopping…" and sets :data:`LET_GO`."""
    import time

    from dager.events import AttackStarted, SearchProgress

    try:
        yield AttackStarted("tiny", "classification", 1, b.hidden_size, 5, False, ())
        i = 0
        while True:
            i += 1
            yield SearchProgress(position=2, checked=i, seconds=0.0)
            time.sleep(0.01)
    finally:
        LET_GO.wait(20)
        LET_GO.clear()


@pytest.fixture
def page_of(browser_app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(browser_app, wait_until="load", timeout=60_000)
            # (not "networkidle": the page keeps a heartbeat stream open so that closing
            # the tab stops the visitor's runs)
            page.locator("#gll-run-text").wait_for(timeout=60_000)
            yield page
        finally:
            browser.close()


def test_browser_stop_states_and_run_after_stop(monkeypatch, page_of):
    from playwright.sync_api import expect

    from labui import engines

    monkeypatch.setattr(engines, "dager_events", _endless_dager)
    page = page_of
    run, stop = page.locator("#gll-run-text"), page.locator("#gll-stop-text")
    status = page.locator("#gll-text-status")
    expect(stop).to_be_disabled()
    run.click()
    expect(run).to_be_disabled(timeout=10_000)  # Run stays off until the worker lets go
    expect(status).to_contain_text("⏱", timeout=60_000)  # running, with its countdown
    expect(status).to_contain_text("searching position 3", timeout=60_000)  # the search is under way
    stop.click()
    expect(status).to_contain_text("Stopping…", timeout=10_000)
    expect(run).to_be_disabled()  # the worker has not let go yet
    LET_GO.set()
    expect(status).to_contain_text("Stopped at position 3 of the search", timeout=30_000)
    expect(run).to_be_enabled()
    # A Run pressed right after the Stop starts a new run (it used to vanish now and then).
    run.click()
    expect(run).to_be_disabled(timeout=10_000)
    expect(status).not_to_contain_text("Stopped", timeout=30_000)
    expect(status).to_contain_text("⏱", timeout=60_000)
    stop.click()
    expect(status).to_contain_text("Stopping…", timeout=10_000)
    LET_GO.set()
    expect(status).to_contain_text("Stopped at", timeout=30_000)
    expect(run).to_be_enabled()


def test_browser_fake_png_gets_a_sentence(page_of, tmp_path):
    from playwright.sync_api import expect

    page = page_of
    fake = tmp_path / "holiday.png"
    fake.write_text("this is not an image\n")
    page.get_by_role("tab", name="Images (DLG)").click()
    page.locator("#gll-upload input[type=file]").set_input_files(str(fake))
    page.locator("#gll-run-image").click()
    expect(page.get_by_text("is not an image PIL can read").first).to_be_visible(timeout=60_000)


GATE = __import__("threading").Event()


def _gated_dager(b, update, **options):
    """DAGER's event order on the typed sentences, held after the first prefixes until
    the test sets :data:`GATE`: the run cannot end before the test has looked."""
    import torch

    from dager.events import (
        AttackFinished,
        AttackStarted,
        DagerResult,
        PrefixesExtended,
        SearchProgress,
        SentenceRecovered,
        SpectrumComputed,
        TokensFiltered,
    )

    rows = [tuple(b.tokenize(s)) for s in SENTENCES]
    rank = sum(len(r) for r in rows)
    yield AttackStarted("tiny", "classification", len(rows), b.hidden_size, rank, False, ())
    yield SpectrumComputed(1, torch.logspace(0, -12, b.hidden_size, dtype=torch.float64), rank, 1e-6)
    first = sorted({r[0] for r in rows})
    yield TokensFiltered(0, torch.tensor(first), torch.full((len(first),), 1e-7), 1e-4,
                         torch.tensor([1e-7] * len(first)), torch.tensor(first))
    yield PrefixesExtended(0, tuple(r[:1] for r in rows), len(rows), 10)
    while not GATE.wait(0.05):
        yield SearchProgress(position=1, checked=0, seconds=0.0)
    GATE.clear()
    for i, r in enumerate(rows):
        yield SentenceRecovered(i, r, b.decode(r), True, 1e-7)
    texts = tuple(b.decode(r) for r in rows)
    yield AttackFinished(DagerResult(texts, tuple(rows), (True,) * len(rows), rank, b.hidden_size, False, False, 0.1))


def test_browser_first_tokens_appear_before_the_run_ends(monkeypatch, page_of):
    """The grid shows the first recovered tokens while the run is still going, and the
    page states the click-to-first-token time it measured itself."""
    from playwright.sync_api import expect

    from labui import engines

    monkeypatch.setattr(engines, "dager_events", _gated_dager)
    page = page_of
    page.locator("#gll-sentences textarea").fill("\n".join(SENTENCES))
    page.locator("#gll-run-text").click()
    try:
        expect(page.locator("#gll-grid .gll-tok").first).to_be_visible(timeout=60_000)
        expect(page.locator("#gll-text-status")).to_contain_text("Running")  # the run is held open
        expect(page.locator("#gll-text-status")).not_to_contain_text("Done")
        shown = page.locator("#gll-first-token")
        expect(shown).to_contain_text("First recovered tokens on screen", timeout=10_000)
        seconds = float(page.locator("#gll-first-token .gll-first-token").get_attribute("data-seconds"))
        assert seconds > 0
    finally:
        GATE.set()
    expect(page.locator("#gll-text-status")).to_contain_text("Done", timeout=60_000)
    expect(page.locator("#gll-recovered")).to_contain_text(SENTENCES[0])


def test_browser_sketch_strokes_draw_without_choosing_the_brush(monkeypatch, page_of):
    """Strokes on the sketchpad count from the first one: no tool has to be picked."""
    from playwright.sync_api import expect

    from labui import engines

    seen = {}

    def quick_dlg(model, update, *, method, iterations, time_budget_s=None):  # noqa: ANN001
        seen["batch_size"] = update.batch_size
        return iter(())  # the view's final frame still renders; the stroke is what is tested

    monkeypatch.setattr(engines, "dlg_events", quick_dlg)
    page = page_of
    page.get_by_role("tab", name="Images (DLG)").click()
    page.get_by_role("tab", name="Draw").click()
    canvas = page.locator("#gll-sketch canvas").first
    expect(canvas).to_be_visible(timeout=30_000)
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2 - 40, box["y"] + box["height"] / 2 - 40  # on the 256x256 page
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(1, 21):  # a diagonal stroke
        page.mouse.move(x + 4 * k, y + 4 * k)
    page.mouse.up()
    page.locator("#gll-run-image").click()
    for _ in range(600):  # until the attack is called with the drawn image (or 60 s)
        if seen or page.get_by_text("sketchpad is empty").count():
            break
        page.wait_for_timeout(100)
    expect(page.get_by_text("sketchpad is empty")).to_have_count(0)
    assert seen.get("batch_size") == 1  # the drawn image reached the client's update
