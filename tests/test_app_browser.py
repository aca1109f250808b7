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
    from labui import handlers

    monkeypatch.setattr(handlers, "load_model", lambda name, task="classification", device="cpu": bundle)
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
            page.goto(browser_app, wait_until="networkidle", timeout=60_000)
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
