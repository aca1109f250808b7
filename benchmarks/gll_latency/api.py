"""Measures through ``gradio_client``: the same protocol the page uses (queue, streaming,
serialisation), without a browser."""

from __future__ import annotations

import tempfile
import threading
import time

from .common import DEFENSES_OFF, Row, medium_sentences, rss_mb, sentences


def time_text(client, model: str, lines: list[str]) -> tuple[float, float, float]:  # noqa: ANN001
    """(first tokens on screen, finished, exact-match) in seconds for one run."""
    t0 = time.perf_counter()
    job = client.submit("\n".join(lines), model, "", "classification", False, *DEFENSES_OFF, api_name="/dager")
    first = None
    for out in job:
        grid = out[3]
        if first is None and isinstance(grid, str) and "gll-tok" in grid:
            first = time.perf_counter() - t0
    done = time.perf_counter() - t0
    result = job.result()[-1]
    return (first if first is not None else done), done, float(result.get("exact_match", 0.0))


def time_dlg(client, image: str, method: str, iterations: int) -> tuple[float, float, int, float]:  # noqa: ANN001
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


def _submit_defended(client, tab: str, settings: tuple[object, ...], model: str, image: str):  # noqa: ANN001, ANN202
    from gradio_client import handle_file

    if tab == "text":
        return client.submit("\n".join(medium_sentences()), model, "", "classification", False, *settings,
                             api_name="/dager")
    if tab == "images":
        return client.submit("upload", handle_file(image), None, None, 7, "lenet", "idlg", 100, *settings,
                             api_name="/dlg")
    raise ValueError(tab)


def defense_table(client, model: str, image: str, budget_s: float,  # noqa: ANN001
                  only: str | None = None) -> list[Row]:
    """Every defense on both tabs (``only``: rows whose name contains it): peak RSS,
    seconds against the budget, the verdict line."""
    rows = []
    for tab in ("text", "images"):
        for name, settings in DEFENSE_SETTINGS:
            if only and only not in f"{tab}: {name}":
                continue
            peak, done = [rss_mb()], threading.Event()

            def sample(peak=peak, done=done) -> None:  # noqa: ANN001
                while not done.wait(0.2):
                    peak[0] = max(peak[0], rss_mb())

            threading.Thread(target=sample, daemon=True).start()
            t0 = time.perf_counter()
            status = str(_submit_defended(client, tab, settings, model, image).result(timeout=10 * budget_s)[0])
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


def concurrent_visitors(url: str, model: str, image: str, iterations: int) -> list[tuple[str, float, float]]:
    """Two text and two image visitors submit at the same moment: (who, first frame s, done s)."""
    from gradio_client import Client, handle_file

    results: list[tuple[str, float, float]] = []
    lock = threading.Lock()
    text = "\n".join(sentences(4))

    def visit(kind: str, i: int, start: threading.Event) -> None:
        client = Client(url, analytics_enabled=False, verbose=False, download_files=tempfile.mkdtemp())
        start.wait()
        t0 = time.perf_counter()
        if kind == "text":
            job = client.submit(text, model, "", "classification", False, *DEFENSES_OFF, api_name="/dager")
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
