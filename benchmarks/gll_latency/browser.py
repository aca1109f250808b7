"""Measures in headless Chromium: click to the first recovered token, by stage, and Stop.

The page's stages are stamped by a ``MutationObserver`` (``STAGE_JS``), the server's by
wrapping the handler, the client update, the engine and the frame stream
(:class:`ServerStamps`); both use the wall clock, so every stage is measured from the
click. Each server stamp also records the server process's CPU seconds since the
handler started, which a loaded machine inflates far less than wall seconds.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import time
from collections.abc import Iterator

from .common import Row, medium_sentences

TOKEN = "#gll-grid .gll-tok:not([data-gll-stale])"
"""A token of this run (the page marks the previous run's tokens stale at the click)."""

STAGE_JS = """() => {
  (window.__gllObservers || []).forEach((o) => o.disconnect());  /* the previous run's */
  window.__gllObservers = [];
  window.__gll = {};
  const stamp = (name) => { if (!(name in window.__gll)) window.__gll[name] = Date.now(); };
  const watch = (id, name, test) => {
    /* the previous run's content passes the test too: stamp only after it has been cleared */
    const el = document.getElementById(id);
    let cleared = !test(el);
    const observer = new MutationObserver(() => {
      if (!cleared) { cleared = !test(el); return; }
      if (test(el)) stamp(name);
    });
    observer.observe(el, {subtree: true, childList: true, characterData: true});
    window.__gllObservers.push(observer);
  };
  if (!window.__gllClick) {
    window.__gllClick = true;
    document.addEventListener("click", (e) => {
      if (e.target.closest && e.target.closest("#gll-run-text"))
        window.__gll.click = performance.timeOrigin + e.timeStamp;
    }, true);
  }
  watch("gll-text-status", "browser: first frame (Preparing)", (el) => /Preparing/.test(el.textContent));
  watch("gll-text-status", "browser: status shows the rank", (el) => /rank \\d/.test(el.textContent));
  watch("gll-spectrum", "browser: spectrum drawn", (el) => /rank \\d/.test(el.textContent));
  watch("gll-distances", "browser: token filter drawn", (el) => /accepted/.test(el.textContent));
  watch("gll-grid", "browser: first token in the DOM", (el) => !!el.querySelector(".gll-tok:not([data-gll-stale])"));
  watch("gll-text-status", "browser: Done", (el) => /Done/.test(el.textContent));
}"""

FIRST_TOKEN_FRAME = "server: frame with the first tokens"


@contextlib.contextmanager
def text_page(url: str) -> Iterator[object]:
    """A Chromium page on the app, the 8 medium sentences typed in (closed at the end)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="load")
            page.locator("#gll-run-text").wait_for(timeout=120_000)
            page.locator("#gll-sentences textarea").fill("\n".join(medium_sentences()))
            yield page
        finally:
            browser.close()


def browser_cpu_s() -> float:
    """CPU seconds used so far by this process's children: Chromium (every process of it)
    and Playwright's driver. On a loaded machine this moves far less than wall time."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the app's environment
        return float("nan")
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += times.user + times.system
    return total


def click_to_first_token(page) -> tuple[float, float, float]:  # noqa: ANN001
    """(Playwright's click-to-token seconds, the page's own figure, the browser's CPU seconds
    from the click to the token) for one run; waits for the end."""
    cpu0 = browser_cpu_s()
    t0 = time.perf_counter()
    page.locator("#gll-run-text").click()
    page.locator(TOKEN).first.wait_for(timeout=300_000)
    first = time.perf_counter() - t0
    cpu = browser_cpu_s() - cpu0
    page.locator("#gll-first-token .gll-first-token[data-seconds]").wait_for(timeout=60_000)
    own = float(page.locator("#gll-first-token .gll-first-token").get_attribute("data-seconds"))
    page.locator("#gll-text-status").get_by_text("Done").wait_for(timeout=300_000)
    page.wait_for_timeout(1500)  # Run comes back
    return first, own, cpu


class ServerStamps:
    """Wall-clock times (and server CPU seconds) of server-side stages of the current run.

    Attributes:
        times: stage -> wall-clock time (``time.time()``), the first of each name.
        cpu: stage -> this process's CPU seconds (all threads) at that stage.
    """

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def clear(self) -> None:
        self.times.clear()
        self.cpu.clear()

    def stamp(self, name: str) -> None:
        if name not in self.times:
            self.times[name] = time.time()
            self.cpu[name] = time.process_time()

    def install(self) -> None:
        """Wrap the handler, the client update, the engine and the frame stream (before build_app)."""
        import functools

        from labui import engines, handlers

        run, update, events, stream = (handlers.run_text_attack, engines.compute_update, engines.dager_events,
                                       handlers.stream_dager)

        @functools.wraps(run)
        def run_text_attack(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.stamp("server: handler starts")
            yield from run(*args, **kwargs)

        def compute_update(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.stamp("server: client update starts")
            out = update(*args, **kwargs)
            self.stamp("server: client update computed")
            return out

        def dager_events(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            for event in events(*args, **kwargs):
                name = type(event).__name__
                if name != "PrefixesExtended" or event.prefixes:
                    self.stamp(f"engine: first {name}")
                yield event

        def stream_dager(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            for out in stream(*args, **kwargs):
                if isinstance(out[3], str) and "gll-tok" in out[3]:
                    self.stamp(FIRST_TOKEN_FRAME)
                yield out

        handlers.run_text_attack = run_text_attack
        engines.compute_update = compute_update
        engines.dager_events = dager_events
        handlers.stream_dager = stream_dager


def _stages(page, stamps: ServerStamps, first: float,  # noqa: ANN001
            own: float) -> tuple[dict[str, float], dict[str, float]]:
    """One run's stages in seconds from the click, and the server's CPU seconds since its handler started."""
    seen = page.evaluate("window.__gll")
    click = seen.pop("click") / 1000
    stages = {k: v - click for k, v in stamps.times.items()}
    stages.update({k: v / 1000 - click for k, v in seen.items()})
    if FIRST_TOKEN_FRAME in stages and "browser: first token in the DOM" in stages:
        stages["face: server frame to tokens in the DOM"] = (stages["browser: first token in the DOM"]
                                                             - stages[FIRST_TOKEN_FRAME])
    if "server: client update starts" in stages and "server: client update computed" in stages:
        stages["server: client update (its own seconds)"] = (stages["server: client update computed"]
                                                             - stages["server: client update starts"])
    stages["playwright: click to first token"] = first
    stages["page's own figure: click to first token"] = own
    start = stamps.cpu.get("server: handler starts")
    cpu = {k: v - start for k, v in stamps.cpu.items()} if start is not None else {}
    return stages, cpu


def first_token_table(url: str, stamps: ServerStamps, repeats: int) -> list[Row]:
    """Click to first token in Chromium, ``repeats`` warm runs of the 8 medium sentences, by stage."""
    runs: list[dict[str, float]] = []
    cpus: list[dict[str, float]] = []
    browser_cpu: list[float] = []
    with text_page(url) as page:
        click_to_first_token(page)  # warm-up: the browser's first plots, the server's first run
        for _ in range(repeats):
            stamps.clear()
            page.evaluate(STAGE_JS)
            first, own, cpu_s = click_to_first_token(page)
            stages, cpu = _stages(page, stamps, first, own)
            runs.append(stages)
            cpus.append(cpu)
            browser_cpu.append(cpu_s)
    names = sorted({k for r in runs for k in r}, key=lambda k: statistics.median(r.get(k, 1e9) for r in runs))
    rows = []
    for name in names:
        values = [r[name] for r in runs if name in r]
        target = "<= 2 s" if name.startswith(("playwright", "page's own")) else "-"
        spread = f"min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs"
        cpu = [c[name] for c in cpus if name in c]
        if cpu and name != "server: handler starts":
            spread += f"; server CPU since the handler started {statistics.median(cpu):.2f} s"
        rows.append((name, f"{statistics.median(values):.2f} s", target, spread))
    rows.append(("browser CPU: click to first token", f"{statistics.median(browser_cpu):.2f} s", "-",
                 f"Chromium and Playwright, all processes; min {min(browser_cpu):.2f}, max {max(browser_cpu):.2f}"))
    return rows


def browser_measures(url: str) -> list[Row]:
    """First token on screen from the click, and Stop's two states, in headless Chromium."""
    rows = []
    with text_page(url) as page:
        first, own, _ = click_to_first_token(page)
        rows.append(("browser: first token on screen (B=8 medium)", f"{first:.2f} s", "<= 2 s",
                     f"the page's own figure: {own:.2f} s"))
        # Stop: an image run (iDLG on a sample, long budget) stopped mid-way.
        page.get_by_role("tab", name="Images (DLG)").click()
        page.locator(".gallery-item, button.gallery-item, [data-testid='examples'] button").first.click()
        page.get_by_label("Iterations").first.fill("500")
        page.locator("#gll-run-image").click()
        page.locator("#gll-image-status").get_by_text("iteration").first.wait_for(timeout=300_000)
        time.sleep(2)
        t0 = time.perf_counter()
        page.locator("#gll-stop-image").click()
        page.locator("#gll-image-status").get_by_text("Stopping").first.wait_for(timeout=60_000)
        stopping = time.perf_counter() - t0
        page.locator("#gll-image-status").get_by_text("Stopped at").first.wait_for(timeout=120_000)
        stopped = time.perf_counter() - t0
        rows.append(("browser: Stop -> 'Stopping…'", f"{stopping:.2f} s", "at once", ""))
        rows.append(("browser: Stop -> 'Stopped at'", f"{stopped:.2f} s", "<= 1 s",
                     page.locator("#gll-image-status").inner_text().strip()[:60]))
    return rows
