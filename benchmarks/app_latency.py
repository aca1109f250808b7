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

The measures live in :mod:`gll_latency` (``api``: through ``gradio_client``;
``browser``: in Chromium; ``common``: inputs, RSS, the table); this script starts the
server and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: app, labui
# Its helpers sit next to it (not under a ``benchmarks.`` package name: a site-packages
# distribution ships a top-level ``benchmarks`` package that would shadow ours).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gll_latency import api, browser  # noqa: E402
from gll_latency.common import free_port, print_table, rss_mb, sample_png, sentences  # noqa: E402


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

    stamps = browser.ServerStamps()
    if args.first_token:
        stamps.install()
    demo = app.build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_options())
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    handlers.prewarm(args.model)  # what app.main() starts at launch
    print(f"prewarm (model load + one DAGER run): {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        if args.first_token:
            print_table(browser.first_token_table(url, stamps, args.repeats),
                        ("stage (from the click on Run)", "median", "target", "spread"))
            print(f"\n{args.model}, 8 sentences of assets/sentences/medium.txt, warm server, "
                  f"{args.repeats} runs; {os.cpu_count()} CPUs")
            return
        client = Client(url, analytics_enabled=False, verbose=False,
                        download_files=tempfile.mkdtemp(prefix="gll-bench-"))
        if args.defenses:
            from labui.inputs import TIME_BUDGET_S

            rows = api.defense_table(client, args.model, sample_png(), TIME_BUDGET_S, args.only)
            print_table(rows, ("tab: defense", "peak RSS", "seconds", "verdict (ok: RSS < 4 GB, within "
                                f"{TIME_BUDGET_S:.0f} s + 15 s, a verdict)"))
            return
        _classic(client, url, args)
    finally:
        demo.close()


def _classic(client, url: str, args: argparse.Namespace) -> None:  # noqa: ANN001
    """The issue-5 latency rows, the four visitors, RSS and (``--browser``) the browser rows."""
    import threading

    rows: list[tuple[str, str, str, str]] = []
    rss0 = rss_mb()
    peak = [rss0]
    sampling = [True]

    def sample() -> None:
        while sampling[0]:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    try:
        t0 = time.perf_counter()
        api.time_text(client, args.model, sentences(1))  # warm-up: loads the model once
        print(f"warm-up (first run): {time.perf_counter() - t0:.1f} s", flush=True)
        for n, target_first, target_done in (() if args.skip_latency else ((4, 3.0, None), (8, None, 5.0))):
            runs = [api.time_text(client, args.model, sentences(n)) for _ in range(args.repeats)]
            first = statistics.median(r[0] for r in runs)
            done = statistics.median(r[1] for r in runs)
            em = statistics.mean(r[2] for r in runs)
            rows.append((f"text B={n}: first tokens", f"{first:.2f} s",
                         f"<= {target_first:.0f} s" if target_first else "-", ""))
            rows.append((f"text B={n}: finished", f"{done:.2f} s",
                         f"<= {target_done:.0f} s" if target_done else "-", f"exact match {100 * em:.0f} %"))
        path = sample_png()
        for method in (() if args.skip_latency else ("idlg", "ig")):
            first, rate, frames, total = api.time_dlg(client, path, method, args.dlg_iterations)
            rows.append((f"DLG {method}: previews", f"{rate:.1f} /s", ">= 3 /s",
                         f"{frames} frames, first after {first:.2f} s, run {total:.1f} s"))
        for who, first, done in api.concurrent_visitors(url, args.model, path, 100):
            rows.append((f"4 visitors: {who}", f"{first:.2f} s", "-", f"first frame (queue wait); done {done:.1f} s"))
        if args.browser:
            rows.extend(browser.browser_measures(url))
        from labui.session import release_memory

        before_trim = rss_mb()
        release_memory()
        rows.append(("server RSS", f"{rss_mb():.0f} MB", "-",
                     f"start {rss0:.0f} MB, peak {peak[0]:.0f} MB, before malloc_trim {before_trim:.0f} MB"))
    finally:
        sampling[0] = False
    print_table(rows, ("measure", "value", "target", "notes"))
    print(f"\nmodel {args.model}, {args.repeats} repeats (median), CPU threads {os.cpu_count()}")


if __name__ == "__main__":
    main()
