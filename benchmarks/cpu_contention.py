"""CPU contention benchmark: DAGER beside a busy process, under each thread policy.

Issue 13: with another process keeping the CPU busy, a DAGER batch ran 16x slower with
torch's default threads, because OpenMP's idle workers spin (busy-wait) and fight the
other process for the cores. This script measures it so the thread policy of
:mod:`fedclient.threads` is chosen from numbers, and so anyone can re-run it on a
quiet machine.

For every policy (``default``: torch's own choice; ``passive``: OMP_WAIT_POLICY=PASSIVE;
``threads1``: OMP_NUM_THREADS=1; ``both``) and every load (``quiet``, or 1, 2 ...
"hog" processes each spinning on one core), a fresh worker subprocess (this script
with ``--worker``; the policy is in its environment before torch loads) loads
gpt2-small-random, computes the client's update for a batch of everyday sentences
(``assets/sentences/tweets.txt``, about 13 tokens each), attacks it once to warm up,
then ``--repeats`` times. The table gives the median attack wall time, the attack's
CPU time (``time.process_time``: all of the worker's threads, spinning included), the
slowdown against the same policy's quiet run and against the best quiet run, and
"fair": the slowdown that a fair share of the cores would give (hogs and the
attack's threads sharing the cores equally). The target is a slowdown no worse
than "fair".

Examples::

    python benchmarks/cpu_contention.py                       # B=8, hogs 0 1 2
    python benchmarks/cpu_contention.py --hogs 0 1 --repeats 5 --markdown
    python benchmarks/cpu_contention.py --policies default both --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "assets" / "sentences" / "tweets.txt"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT")

POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "threads1": {"OMP_NUM_THREADS": "1"},
    "both": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
}
"""Environment of each policy (applied to a clean environment: no inherited OMP_*)."""

HOG = "import os, time\nwhile True:\n    pass\n"
"""One hog: a Python process spinning on one core (a stand-in for a visitor's process)."""


def _worker(args: argparse.Namespace) -> int:
    """Run in a fresh process: time the attack under this process's thread policy."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    from dager.attack import required_parameters, run_dager
    from dager.zoo import load_model
    from fedclient import compute_update

    sentences = [s.strip() for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]
    bundle = load_model(args.model, "classification")
    batch = bundle.encode(sentences[: args.batch_size], seed=0)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle))
    result = run_dager(bundle, update)  # warm-up (lazy initialisation, caches)
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(args.repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        result = run_dager(bundle, update)
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    print(json.dumps({
        "threads": torch.get_num_threads(),
        "attack_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "exact": sum(result.exact) / max(1, args.batch_size),
    }))
    return 0


def _start_hogs(n: int) -> list[subprocess.Popen]:
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(n)]
    time.sleep(0.5)  # let them reach full speed
    return hogs


def _stop(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.terminate()
    for hog in hogs:
        hog.wait(timeout=10)


def _measure(args: argparse.Namespace, policy: str, hogs: int) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(POLICIES[policy])
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--model", args.model,
        "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
    ]
    running = _start_hogs(hogs)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"policy": policy, "hogs": hogs, "error": f"timeout after {args.timeout} s"}
    finally:
        _stop(running)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        return {"policy": policy, "hogs": hogs, "error": f"worker failed: {tail}"}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"policy": policy, "hogs": hogs, **row}


def _fair(threads: int, hogs: int, cores: int) -> float:
    """Slowdown under a fair share: ``threads`` attack threads beside ``hogs`` spinners."""
    quiet_cores = min(threads, cores)
    runnable = threads + hogs
    shared = cores * threads / runnable if runnable > cores else float(threads)
    return max(1.0, quiet_cores / min(shared, quiet_cores))


HEAD = ["policy", "hogs", "threads", "attack s", "CPU s", "slowdown", "vs best quiet", "fair", "exact"]
WIDTHS = [9, 5, 8, 9, 7, 9, 14, 6, 6]


def _cells(r: dict[str, object], quiet: dict[str, float], cores: int) -> list[str]:
    """One table row; slowdowns need the quiet rows measured before it."""
    if "error" in r:
        return [str(r["policy"]), str(r["hogs"]), "-", str(r["error"]), "", "", "", "", ""]
    own = quiet.get(str(r["policy"]))
    best_quiet = min(quiet.values()) if quiet else None
    return [
        str(r["policy"]), str(r["hogs"]), str(r["threads"]),
        f"{r['attack_s']:.2f}", f"{r['cpu_s']:.2f}",
        f"{r['attack_s'] / own:.1f}x" if own else "-",
        f"{r['attack_s'] / best_quiet:.1f}x" if best_quiet else "-",
        f"{_fair(int(r['threads']), int(r['hogs']), cores):.1f}x",
        f"{r['exact']:.0%}",
    ]


def _line(cells: list[str], markdown: bool) -> str:
    if markdown:
        return "| " + " | ".join(cells) + " |"
    return "  ".join(c.ljust(w) for c, w in zip(cells, WIDTHS))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="gpt2-small-random")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed attacks per worker (median)")
    parser.add_argument("--hogs", type=int, nargs="+", default=[0, 1, 2], help="spinning processes beside it")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    cores = os.cpu_count() or 1
    print(
        f"{cores} cores; load average before: {os.getloadavg()[0]:.2f}; B={args.batch_size}, "
        f"{args.model}, median of {args.repeats}",
        file=sys.stderr,
    )
    # Rows print as they are measured (quiet ones first), so a cut-short run still reports.
    print(_line(HEAD, args.markdown), flush=True)
    if args.markdown:
        print("|" + "---|" * len(HEAD), flush=True)
    rows: list[dict[str, object]] = []
    quiet: dict[str, float] = {}
    for hogs in sorted(args.hogs):
        for policy in args.policies:
            row = _measure(args, policy, hogs)
            rows.append(row)
            if hogs == 0 and "attack_s" in row:
                quiet[policy] = float(row["attack_s"])  # type: ignore[arg-type]
            print(_line(_cells(row, quiet, cores), args.markdown), flush=True)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    print(f"load average after: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
