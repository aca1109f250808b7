"""App responsiveness, measured the way a user feels it: through the running server.

Launches the app on 127.0.0.1, drives it with ``gradio_client`` (the same protocol the
browser uses: queue, streaming, serialisation) and prints a table:

* text: seconds from Run to the first recovered tokens on screen (the token grid's
  first cells) and to the finished batch, for 4 and 8 sentences on
  ``gpt2-small-random`` (models warm: one untimed warm-up run first);
* images: preview frames per second while DLG runs, and time to the first frame.

Targets (issue 5): first tokens within 3 s for 4 sentences, a batch of 8 within 5 s,
DLG previews several times a second.

Classroom measures (issue 13):

* four visitors at once (two text, two image), each a separate ``gradio_client``:
  seconds from submit to the first streamed frame (queue wait) and to the end;
* server memory (RSS of this process, which hosts the server) before, at the peak and
  after the runs (after ``malloc_trim``);
* in a real browser (``--browser``, needs Chromium): the first recovered token on screen
  from the click, and Stop: click to "Stopping…" and to "Stopped at …".

Issue 13's two table modes (each one command, each prints a table):

* ``--first-token``: in headless Chromium, on a warm server (start-up prewarm plus one
  untimed run), the 8 medium-length sentences of ``assets/sentences/medium.txt``:
  click on Run to the first recovered token in the page's DOM (what Playwright sees,
  and the page's own figure, measured by its script), with every stage between
  (server timestamps and a MutationObserver in the page, on one wall clock). Target: 2 s.
* ``--defenses``: every defense setting the panel offers, on both tabs, through the real
  server: the server's RSS (peak during the run), the run's seconds against its time
  budget, and the verdict line the page shows. Targets: RSS under 4 GB, every run ends
  with a verdict within its budget.

Usage: ``python benchmarks/app_latency.py [--model gpt2-small-random] [--repeats 3] [--browser]``,
``python benchmarks/app_latency.py --first-token [--repeats 5]``,
``python benchmarks/app_latency.py --defenses``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

DEFENSES_OFF = (0.0, False, 1.0, 1.0, 0.0, "fp32", 1, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sentences(n: int) -> list[str]:
    from labui.inputs import sentence_sets

    pool: list[str] = []
    for text in sentence_sets().values():
        pool.extend(text.splitlines())
    if len(pool) < n:
        raise SystemExit(f"need {n} sample sentences, found {len(pool)}")
    return pool[:n]


def time_text(client, model: str, sentences: list[str]) -> tuple[float, float, float]:
    """(first tokens on screen, finished, exact-match) in seconds for one run."""
    t0 = time.perf_counter()
    job = client.submit("\n".join(sentences), model, "", "classification", False, *DEFENSES_OFF, api_name="/dager")
    first = None
    for out in job:
        grid = out[3]
        if first is None and isinstance(grid, str) and "gll-tok" in grid:
            first = time.perf_counter() - t0
    done = time.perf_counter() - t0
    result = job.result()[-1]
    return (first if first is not None else done), done, float(result.get("exact_match", 0.0))


def time_dlg(client, image: str, method: str, iterations: int) -> tuple[float, float, int, float]:
    """(first frame s, frames per second, frames, total s) for one DLG run."""
    from gradio_client import handle_file

    t0 = time.perf_counter()
    job = client.submit("upload", handle_file(image), None, None, 7, "lenet", method, iterations, *DEFENSES_OFF,
                        api_name="/dlg")
    stamps: list[float] = []
    last = None
    for out in job:
        preview = out[1]
        if preview is not None and preview != last:
            stamps.append(time.perf_counter() - t0)
            last = preview
    total = time.perf_counter() - t0
    if len(stamps) < 2:
        return (stamps[0] if stamps else total), 0.0, len(stamps), total
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return stamps[0], rate, len(stamps), total


def medium_sentences() -> list[str]:
    """The 8 medium-length sentences (``assets/sentences/medium.txt``, its first 8 lines)."""
    from labui.inputs import sentence_sets

    lines = sentence_sets()["medium"].splitlines()
    if len(lines) < 8:
        raise SystemExit("assets/sentences/medium.txt needs 8 sentences")
    return lines[:8]


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


def _click_to_first_token(page) -> tuple[float, float]:  # noqa: ANN001
    """(Playwright's click-to-token seconds, the page's own figure) for one run; waits for the end."""
    t0 = time.perf_counter()
    page.locator("#gll-run-text").click()
    page.locator(TOKEN).first.wait_for(timeout=300_000)
    first = time.perf_counter() - t0
    page.locator("#gll-first-token .gll-first-token[data-seconds]").wait_for(timeout=60_000)
    own = float(page.locator("#gll-first-token .gll-first-token").get_attribute("data-seconds"))
    page.locator("#gll-text-status").get_by_text("Done").wait_for(timeout=300_000)
    page.wait_for_timeout(1500)  # Run comes back
    return first, own


class ServerStamps:
    """Wall-clock times of server-side stages of the current run (first of each name)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def stamp(self, name: str) -> None:
        self.times.setdefault(name, time.time())

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
                    self.stamp("server: frame with the first tokens")
                yield out

        handlers.run_text_attack = run_text_attack
        engines.compute_update = compute_update
        engines.dager_events = dager_events
        handlers.stream_dager = stream_dager


def first_token_table(url: str, stamps: ServerStamps, repeats: int) -> list[tuple[str, str, str, str]]:
    """Click to first token in Chromium, ``repeats`` warm runs of the 8 medium sentences, by stage."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    runs: list[dict[str, float]] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="load")
        page.locator("#gll-run-text").wait_for(timeout=120_000)
        page.locator("#gll-sentences textarea").fill("\n".join(medium_sentences()))
        _click_to_first_token(page)  # warm-up: the browser's first plots, the server's first run
        for _ in range(repeats):
            stamps.times.clear()
            page.evaluate(STAGE_JS)
            first, own = _click_to_first_token(page)
            seen = page.evaluate("window.__gll")
            click = seen.pop("click") / 1000
            stages = {k: v - click for k, v in stamps.times.items()}
            stages.update({k: v / 1000 - click for k, v in seen.items()})
            if "server: frame with the first tokens" in stages and "browser: first token in the DOM" in stages:
                stages["face: server frame to tokens in the DOM"] = (stages["browser: first token in the DOM"]
                                                                     - stages["server: frame with the first tokens"])
            stages["playwright: click to first token"] = first
            stages["page's own figure: click to first token"] = own
            runs.append(stages)
        browser.close()
    names = sorted({k for r in runs for k in r}, key=lambda k: statistics.median(r.get(k, 1e9) for r in runs))
    rows = []
    for name in names:
        values = [r[name] for r in runs if name in r]
        target = "<= 2 s" if name.startswith(("playwright", "page's own")) else "-"
        rows.append((name, f"{statistics.median(values):.2f} s", target,
                     f"min {min(values):.2f}, max {max(values):.2f}, {len(values)} runs"))
    return rows


DEFENSE_SETTINGS: tuple[tuple[str, tuple[object, ...]], ...] = (
    ("none", (0.0, False, 1.0, 1.0, 0.0, "fp32", 1, 1)),
    *((f"noise σ={v:g}", (v, False, 1.0, 1.0, 0.0, "fp32", 1, 1)) for v in (1e-4, 1e-3, 1e-2, 1e-1)),
    ("DP-SGD C=1 z=1", (0.0, True, 1.0, 1.0, 0.0, "fp32", 1, 1)),
    *((f"prune p={v:g}", (0.0, False, 1.0, 1.0, v, "fp32", 1, 1)) for v in (0.5, 0.99)),
    *((f"precision {v}", (0.0, False, 1.0, 1.0, 0.0, v, 1, 1)) for v in ("fp16", "int8")),
    ("FedAvg 10 local steps", (0.0, False, 1.0, 1.0, 0.0, "fp32", 10, 1)),
    ("secure aggregation 16 clients", (0.0, False, 1.0, 1.0, 0.0, "fp32", 1, 16)),
)
"""The panel's choices: every σ of its dropdown, DP-SGD at its defaults, the sliders' ends
(prune 0.99, 10 local steps, 16 clients) and a middle prune, each precision."""


def defense_table(client, model: str, image: str, budget_s: float,  # noqa: ANN001
                  only: str | None = None) -> list[tuple[str, str, str, str]]:
    """Every defense on both tabs (``only``: rows whose name contains it): peak RSS,
    seconds against the budget, the verdict line."""
    import threading

    from gradio_client import handle_file

    text = "\n".join(medium_sentences())
    rows = []
    for tab in ("text", "images"):
        for name, settings in DEFENSE_SETTINGS:
            if only and only not in f"{tab}: {name}":
                continue
            peak, done = [_rss_mb()], threading.Event()

            def sample(peak=peak, done=done) -> None:  # noqa: ANN001
                while not done.wait(0.2):
                    peak[0] = max(peak[0], _rss_mb())

            threading.Thread(target=sample, daemon=True).start()
            t0 = time.perf_counter()
            if tab == "text":
                job = client.submit(text, model, "", "classification", False, *settings, api_name="/dager")
            elif tab == "images":
                job = client.submit("upload", handle_file(image), None, None, 7, "lenet", "idlg", 100, *settings,
                                    api_name="/dlg")
            else:
                raise ValueError(tab)
            status = str(job.result(timeout=10 * budget_s)[0])
            seconds = time.perf_counter() - t0
            done.set()
            verdict = next((ln for ln in status.split("\n\n") if "Verdict" in ln), "")
            if name == "none":
                verdict = verdict or next((ln for ln in status.split("\n\n") if "Done" in ln), "no Done line")
            ok = seconds <= budget_s + 15 and (bool(verdict) or name == "none") and peak[0] < 4096
            rows.append((f"{tab}: {name}", f"{peak[0]:.0f} MB", f"{seconds:.1f} s", ("ok " if ok else "FAIL ")
                         + verdict.replace("**", "")[:110]))
            print(*rows[-1], sep="  |  ", flush=True)
    return rows


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def concurrent_visitors(url: str, model: str, image: str, iterations: int) -> list[tuple[str, float, float]]:
    """Two text and two image visitors submit at the same moment: (who, first frame s, done s)."""
    import threading

    from gradio_client import Client, handle_file

    results: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    sentences = "\n".join(_sentences(4))

    def visit(kind: str, i: int, start: threading.Event) -> None:
        client = Client(url, analytics_enabled=False, verbose=False, download_files=tempfile.mkdtemp())
        start.wait()
        t0 = time.perf_counter()
        if kind == "text":
            job = client.submit(sentences, model, "", "classification", False, *DEFENSES_OFF, api_name="/dager")
        else:
            job = client.submit("upload", handle_file(image), None, None, 7, "lenet", "idlg", iterations,
                                *DEFENSES_OFF, api_name="/dlg")
        first = None
        for _ in job:
            if first is None:
                first = time.perf_counter() - t0
        done = time.perf_counter() - t0
        with lock:
            results.append((f"{kind} visitor {i}", first if first is not None else done, done))

    start = threading.Event()
    threads = [threading.Thread(target=visit, args=(k, i, start)) for i, k in enumerate(("text", "image", "text",
                                                                                         "image"), 1)]
    for t in threads:
        t.start()
    time.sleep(3)  # the four clients connect
    start.set()
    for t in threads:
        t.join()
    return sorted(results)


def browser_measures(url: str) -> list[tuple[str, str, str, str]]:
    """First token on screen from the click, and Stop's two states, in headless Chromium."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="load")
        page.locator("#gll-run-text").wait_for(timeout=120_000)
        page.locator("#gll-sentences textarea").fill("\n".join(medium_sentences()))
        first, own = _click_to_first_token(page)
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
        browser.close()
    return rows


def _print_table(rows: list[tuple[str, str, str, str]], header: tuple[str, str, str, str]) -> None:
    width = max(len(r[0]) for r in [*rows, header])
    print(f"\n{header[0]:<{width}}  {header[1]:>9}  {header[2]:>8}  {header[3]}")
    for name, value, target, notes in rows:
        print(f"{name:<{width}}  {value:>9}  {target:>8}  {notes}")


def _sample_png() -> str:
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    img = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx)], axis=-1)
    path = Path(tempfile.mkdtemp(prefix="gll-bench-")) / "sample.png"
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small-random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dlg-iterations", type=int, default=300)
    parser.add_argument("--browser", action="store_true", help="also measure in headless Chromium")
    parser.add_argument("--skip-latency", action="store_true", help="only the classroom measures")
    parser.add_argument("--first-token", action="store_true",
                        help="only: click to first token in Chromium, by stage (8 medium sentences, warm)")
    parser.add_argument("--defenses", action="store_true",
                        help="only: every defense of the panel on both tabs, with RSS and the verdict")
    parser.add_argument("--only", help="with --defenses: only rows whose name contains this, e.g. 'images:'")
    args = parser.parse_args()

    import app
    from gradio_client import Client
    from labui import handlers

    stamps = ServerStamps()
    if args.first_token:
        stamps.install()
    demo = app.build_app()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options())
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    handlers.prewarm(args.model)  # what app.main() starts at launch
    print(f"prewarm (model load + one DAGER run): {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        if args.first_token:
            _print_table(first_token_table(url, stamps, args.repeats),
                         ("stage (from the click on Run)", "median", "target", "spread"))
            print(f"\n{args.model}, 8 sentences of assets/sentences/medium.txt, warm server, "
                  f"{args.repeats} runs; {os.cpu_count()} CPUs")
            return
        client = Client(url, analytics_enabled=False, verbose=False,
                        download_files=tempfile.mkdtemp(prefix="gll-bench-"))
        if args.defenses:
            from labui.inputs import TIME_BUDGET_S

            rows = defense_table(client, args.model, _sample_png(), TIME_BUDGET_S, args.only)
            _print_table(rows, ("tab: defense", "peak RSS", "seconds", "verdict (ok: RSS < 4 GB, within "
                                f"{TIME_BUDGET_S:.0f} s + 15 s, a verdict)"))
            return
        _classic(client, url, args)
    finally:
        demo.close()


def _classic(client, url: str, args: argparse.Namespace) -> None:  # noqa: ANN001
    """The issue-5 latency rows, the four visitors, RSS and (``--browser``) the browser rows."""
    import threading

    rows: list[tuple[str, str, str, str]] = []
    rss0 = _rss_mb()
    peak = [rss0]
    sampling = [True]

    def sample() -> None:
        while sampling[0]:
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    try:
        t0 = time.perf_counter()
        time_text(client, args.model, _sentences(1))  # warm-up: loads the model once
        print(f"warm-up (first run): {time.perf_counter() - t0:.1f} s", flush=True)
        for n, target_first, target_done in (() if args.skip_latency else ((4, 3.0, None), (8, None, 5.0))):
            runs = [time_text(client, args.model, _sentences(n)) for _ in range(args.repeats)]
            first = statistics.median(r[0] for r in runs)
            done = statistics.median(r[1] for r in runs)
            em = statistics.mean(r[2] for r in runs)
            rows.append((f"text B={n}: first tokens", f"{first:.2f} s",
                         f"<= {target_first:.0f} s" if target_first else "-", ""))
            rows.append((f"text B={n}: finished", f"{done:.2f} s",
                         f"<= {target_done:.0f} s" if target_done else "-", f"exact match {100 * em:.0f} %"))
        path = _sample_png()
        for method in (() if args.skip_latency else ("idlg", "ig")):
            first, rate, frames, total = time_dlg(client, path, method, args.dlg_iterations)
            rows.append((f"DLG {method}: previews", f"{rate:.1f} /s", ">= 3 /s",
                         f"{frames} frames, first after {first:.2f} s, run {total:.1f} s"))
        for who, first, done in concurrent_visitors(url, args.model, path, 100):
            rows.append((f"4 visitors: {who}", f"{first:.2f} s", "-", f"first frame (queue wait); done {done:.1f} s"))
        if args.browser:
            rows.extend(browser_measures(url))
        from labui.session import release_memory

        before_trim = _rss_mb()
        release_memory()
        rows.append(("server RSS", f"{_rss_mb():.0f} MB", "-",
                     f"start {rss0:.0f} MB, peak {peak[0]:.0f} MB, before malloc_trim {before_trim:.0f} MB"))
    finally:
        sampling[0] = False
    _print_table(rows, ("measure", "value", "target", "notes"))
    print(f"\nmodel {args.model}, {args.repeats} repeats (median), CPU threads {os.cpu_count()}")


if __name__ == "__main__":
    main()
