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

Usage: ``python benchmarks/app_latency.py [--model gpt2-small-random] [--repeats 3] [--browser]``
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
        t0 = time.perf_counter()
        page.locator("#gll-run-text").click()
        page.locator("#gll-grid .gll-tok").first.wait_for(timeout=300_000)
        first = time.perf_counter() - t0
        page.locator("#gll-metrics").get_by_text("ROUGE-1").wait_for(timeout=300_000)
        shown = page.locator("#gll-metrics").inner_text()
        rows.append(("browser: first token on screen", f"{first:.2f} s", "<= 3 s",
                     "app's own figure: " + next((ln.strip() for ln in shown.splitlines()
                                                  if "first tokens shown" in ln), "-")))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small-random")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dlg-iterations", type=int, default=300)
    parser.add_argument("--browser", action="store_true", help="also measure in headless Chromium")
    parser.add_argument("--skip-latency", action="store_true", help="only the classroom measures")
    args = parser.parse_args()

    import app
    from gradio_client import Client

    demo = app.build_app()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options())
    client = Client(f"http://127.0.0.1:{port}/", analytics_enabled=False, verbose=False,
                    download_files=tempfile.mkdtemp(prefix="gll-bench-"))
    rows: list[tuple[str, str, str, str]] = []
    rss0 = _rss_mb()
    peak = [rss0]
    sampling = True

    def sample() -> None:
        while sampling:
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.2)

    import threading

    threading.Thread(target=sample, daemon=True).start()
    try:
        t0 = time.perf_counter()
        time_text(client, args.model, _sentences(1))  # warm-up: loads the model once
        print(f"warm-up (model load + first run): {time.perf_counter() - t0:.1f} s", flush=True)
        for n, target_first, target_done in (() if args.skip_latency else ((4, 3.0, None), (8, None, 5.0))):
            runs = [time_text(client, args.model, _sentences(n)) for _ in range(args.repeats)]
            first = statistics.median(r[0] for r in runs)
            done = statistics.median(r[1] for r in runs)
            em = statistics.mean(r[2] for r in runs)
            rows.append((f"text B={n}: first tokens", f"{first:.2f} s",
                         f"<= {target_first:.0f} s" if target_first else "-", ""))
            rows.append((f"text B={n}: finished", f"{done:.2f} s",
                         f"<= {target_done:.0f} s" if target_done else "-", f"exact match {100 * em:.0f} %"))

        yy, xx = np.mgrid[0:32, 0:32] / 31.0
        img = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx)], axis=-1)
        path = Path(tempfile.mkdtemp(prefix="gll-bench-")) / "sample.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        for method in (() if args.skip_latency else ("idlg", "ig")):
            first, rate, frames, total = time_dlg(client, str(path), method, args.dlg_iterations)
            rows.append((f"DLG {method}: previews", f"{rate:.1f} /s", ">= 3 /s",
                         f"{frames} frames, first after {first:.2f} s, run {total:.1f} s"))
        url = f"http://127.0.0.1:{port}/"
        for who, first, done in concurrent_visitors(url, args.model, str(path), 100):
            rows.append((f"4 visitors: {who}", f"{first:.2f} s", "-", f"first frame (queue wait); done {done:.1f} s"))
        if args.browser:
            rows.extend(browser_measures(url))
        from labui.handlers import release_memory

        before_trim = _rss_mb()
        release_memory()
        rows.append(("server RSS", f"{_rss_mb():.0f} MB", "-",
                     f"start {rss0:.0f} MB, peak {peak[0]:.0f} MB, before malloc_trim {before_trim:.0f} MB"))
    finally:
        sampling = False
        demo.close()

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measure':<{width}}  {'value':>9}  {'target':>8}  notes")
    for name, value, target, notes in rows:
        print(f"{name:<{width}}  {value:>9}  {target:>8}  {notes}")
    print(f"\nmodel {args.model}, {args.repeats} repeats (median), CPU threads {os.cpu_count()}")


if __name__ == "__main__":
    main()
