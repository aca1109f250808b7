"""Does the app's memory come back after heavy runs? (issue 14)

Runs the app's own handlers in this process, as the server does (each run in its worker
thread): DAGER once on each embedded model of the app (the cached-model baseline), then
the heavy sequence: DP-SGD, FedAvg, the DLG text race and a noise sweep. It prints the
process RSS after the baseline and after the sequence (after the app's own
``release_memory``). Target: within 20% of the baseline.

The DLG text race used to add ~300 MB that stayed: its ``loss.backward()`` filled the
cached model's own ``.grad`` (every weight but the token embedding, 336 MB on
gpt2-small-random) on top of the dummies' gradients. The race now asks autograd for the
dummies' gradients only (``dlg/text.py``); measured on the shared 2-core machine:
1.24x (1506 -> 1861 MB) before, 0.99x (1502 -> 1487 MB) after, with no allocator setting.

    nice -n 5 python benchmarks/app_memory.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedclient.threads import configure_cpu_threads  # noqa: E402

configure_cpu_threads()

SENTENCES = "\n".join([
    "I think we should leave before the rain starts tonight.",
    "The meeting moved to Thursday because Anna is away.",
    "My landlord finally fixed the heating after three weeks.",
    "Please send me the results of the blood test by Friday.",
])


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _drain(stream) -> float:  # noqa: ANN001
    t0 = time.perf_counter()
    for _ in stream:
        pass
    return time.perf_counter() - t0


def main() -> int:
    from dager.zoo import embedded_models
    from labui import handlers as h

    models = list(embedded_models(max_weights_gb=1.0))  # what the app offers on a CPU
    rows: list[tuple[str, float, float]] = []
    for model in models:
        took = _drain(h.run_text_attack(SENTENCES, model, "", "classification"))
        rows.append((f"DAGER {model}", took, _rss_mb()))
    h.release_memory()
    baseline = _rss_mb()
    rows.append(("baseline (models cached, after release_memory)", 0.0, baseline))
    heavy = [
        ("DP-SGD C=1 z=1", lambda: h.run_text_attack(SENTENCES, models[0], "", "classification", False,
                                                     0.0, True, 1.0, 1.0)),
        ("FedAvg 4 local steps", lambda: h.run_text_attack(SENTENCES, models[0], "", "classification", False,
                                                           0.0, False, 1.0, 1.0, 0.0, "fp32", 4)),
        ("DLG text race (default steps)", lambda: h.run_text_baseline(SENTENCES, models[0], "", "classification")),
        ("noise sweep (text)", lambda: h.run_defense_sweep("text", "noise σ", SENTENCES, models[0], "",
                                                           "classification", False, "sample", None, None, None,
                                                           0, "lenet", "idlg", 50)),
    ]
    peak = baseline
    for name, make in heavy:
        took = _drain(make())
        rss = _rss_mb()
        peak = max(peak, rss)
        rows.append((name, took, rss))
    h.release_memory()
    after = _rss_mb()
    rows.append(("after the sequence and release_memory", 0.0, after))
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'seconds':>8}  {'RSS MB':>8}")
    for name, took, rss in rows:
        print(f"{name:<{width}}  {took:>8.1f}  {rss:>8.0f}")
    ratio = after / baseline
    print(f"\nafter / baseline = {ratio:.2f} (target <= 1.20): {'met' if ratio <= 1.2 else 'not met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
