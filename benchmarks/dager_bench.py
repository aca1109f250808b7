"""DAGER benchmark: named rows (model, task, sentence set, B) -> exact match, ROUGE, time, memory.

Every row runs in a fresh subprocess (this script with ``--worker``) that drives the
real command line (:func:`dager.cli.main`) on one sentence set from
``assets/sentences`` and reports its own peak resident memory (``ru_maxrss``): the
memory column is the honest high-water mark of loading the model, computing the
client's update and attacking it. Before the measured run the worker attacks one
short warm-up sentence in the same process, so the model is loaded and warm (torch's
lazy initialisation, the engine's per-model caches, CUDA kernels) and "attack s" is the
steady-state attack time. Attack and client seconds are wall-clock means per batch;
"CPU s" is the process's CPU time per batch (all threads), which other load on a
shared machine disturbs far less: compare engines with OMP_NUM_THREADS=1 and that column.

Every table states its input: the set each row reads, and the mean and maximum GPT-2
token counts of the sentences it attacked (the first release's speed table was
measured on 9-token messages, and 13-token sentences were several times slower).

Targets (issue 10) are printed beside the results; they are goals to compare against,
not assertions, and wall-clock seconds depend on the machine's load (the header
prints the load average).

Examples::

    python benchmarks/dager_bench.py                        # every row
    python benchmarks/dager_bench.py --quick                # two fast rows
    python benchmarks/dager_bench.py --rows gpt2-med --max-batches 1
    python benchmarks/dager_bench.py --rows wide-med-128 --device cuda --json new.json
    python benchmarks/dager_bench.py --compare old.json new.json   # side by side
    python benchmarks/dager_bench.py --models gpt2-small-random --batch-sizes 8 32 --set reviews
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    # The rows and tables live beside this script (run as a script or loaded by path).
    sys.path.insert(0, str(HERE))

from dager_rows import (  # noqa: E402 - after the path set-up; re-exported for callers and tests
    ADHOC_SENTENCES, CLS, DEFAULT_GRID, DEFAULT_MODELS, ENCODERS_CLASSIFICATION_ONLY, GB, GPT2, LLAMA,
    MINILM, NEXT, QUICK_ROWS, ROOT, ROWS, ROWS_BY_ID, SENTENCES, SETS, WARMUP_SENTENCE, WIDE, Row,
    SetStats, Target, _grid, gpt2_counter, read_set, select_rows, token_stats,
)
from dager_tables import _print_table, _table, compare, set_table  # noqa: E402

__all__ = [
    "ADHOC_SENTENCES", "CLS", "DEFAULT_GRID", "DEFAULT_MODELS", "ENCODERS_CLASSIFICATION_ONLY", "GB", "GPT2",
    "LLAMA", "MINILM", "NEXT", "QUICK_ROWS", "ROOT", "ROWS", "ROWS_BY_ID", "SENTENCES", "SETS",
    "WARMUP_SENTENCE", "WIDE", "Row", "SetStats", "Target", "build_parser", "compare", "gpt2_counter",
    "main", "read_set", "run_row", "select_rows", "set_table", "token_stats",
    "_grid", "_table",  # the tests' handles
]

# ---------------------------------------------------------------------------
# Worker: one row, in its own process


def _worker(args: argparse.Namespace) -> int:
    """Warm the model up, run the CLI once, print peak memory as one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dager.cli import main

    common = ["--model", args.model, "--task", args.task, "--device", args.device, "--seed", str(args.seed), "--quiet"]
    if args.warmup:
        with tempfile.TemporaryDirectory(prefix="dager-bench-warm-") as tmp:
            warm_in = Path(tmp) / "warm.txt"
            warm_in.write_text(WARMUP_SENTENCE + "\n", encoding="utf-8")
            main([*common, "--batch-size", "1", "--input", str(warm_in), "--output", str(Path(tmp) / "warm.json")])
    if args.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    argv = [
        *common, "--batch-size", str(args.batch_size), "--input", str(args.input),
        "--output", str(args.output), "--max-batches", str(args.batches),
    ]
    cpu0 = _cpu_seconds()
    code = main(argv)
    cpu_s = _cpu_seconds() - cpu0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    cuda_peak = None
    if args.device == "cuda":
        import torch

        cuda_peak = int(torch.cuda.max_memory_allocated())
    print(json.dumps({"exit": code, "peak_bytes": int(peak_kib * scale), "cuda_peak_bytes": cuda_peak, "cpu_s": cpu_s}))
    return 0


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): robust to other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------
# Driver


def _batches(row: Row, args: argparse.Namespace, available: int) -> int:
    n = row.batches if args.max_batches is None else min(row.batches, args.max_batches)
    return max(1, min(n, -(-available // row.batch_size)))


def run_row(row: Row, *, args: argparse.Namespace, workdir: Path, count: Callable[[str], int]) -> dict[str, object]:
    """Run one row in a subprocess; a failure or a timeout is recorded in the result."""
    lines = read_set(row.set)
    result: dict[str, object] = {
        "id": row.id, "model": row.model, "task": row.task, "set": row.set, "batch_size": row.batch_size,
    }
    if row.batch_size > len(lines):
        result["error"] = f"needs {row.batch_size} sentences, the {row.set} set has {len(lines)}"
        return result
    batches = _batches(row, args, len(lines))
    attacked = lines[: batches * row.batch_size]
    stats = token_stats(attacked, count)
    result.update(batches=batches, sentences=len(attacked), mean_tokens=stats.mean_tokens, max_tokens=stats.max_tokens)
    out = workdir / f"{row.id}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker",
        "--model", row.model, "--task", row.task, "--batch-size", str(row.batch_size), "--batches", str(batches),
        "--input", str(SENTENCES / SETS[row.set]), "--output", str(out), "--device", args.device,
        "--seed", str(args.seed),
    ]
    if not args.warmup:
        cmd.append("--no-warmup")
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        result["error"] = f"timed out after {args.row_timeout:g} s"
        result["timed_out"] = True
        return result
    result["wall_s"] = time.perf_counter() - t0
    status = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            status = json.loads(line)
            break
    if proc.returncode != 0 or status is None or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result["error"] = f"worker failed: {tail}"
        return result
    report = json.loads(out.read_text(encoding="utf-8"))
    n = max(1, int(report["num_batches"]))
    per_batch = [float(b["seconds"]) for b in report["batches"]]
    result.update(
        batches=n,
        sentences=report["num_sentences"],
        exact_match=report["exact_match"],
        num_exact=report.get("num_exact"),
        rouge1=report["rouge1"],
        rouge2=report["rouge2"],
        attack_s=report["seconds"] / n,
        attack_max_s=max(per_batch, default=0.0),
        client_s=report["client_seconds"] / n,
        cpu_s=float(status.get("cpu_s", 0.0)) / n,
        peak_bytes=status["peak_bytes"],
        cuda_peak_bytes=status["cuda_peak_bytes"],
        over_capacity=report.get("over_capacity", False),
        budget_exhausted=report.get("budget_exhausted", False),
        failed_batches=report.get("failed_batches", []),
    )
    if status["exit"] != 0:
        result["note"] = f"cli exit {status['exit']}"
    return result


def _engine_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "dager", "fedclient"], cwd=ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def _meta(args: argparse.Namespace) -> dict[str, object]:
    import torch

    meta: dict[str, object] = {
        "label": args.label,
        "device": args.device,
        "machine": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "engine_commit": _engine_commit(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "warmup": args.warmup,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", metavar="ID", help=f"rows by id or substring (ids: {', '.join(ROWS_BY_ID)})")
    p.add_argument("--quick", action="store_true", help=f"two fast rows ({', '.join(QUICK_ROWS)})")
    p.add_argument("--max-batches", "--batches", dest="max_batches", type=int, default=None,
                   help="attack at most N batches per row (default: each row's own count)")
    p.add_argument("--row-timeout", "--timeout", dest="row_timeout", type=float, default=900.0,
                   help="seconds per row before it is stopped and reported as timed out (default 900)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None, help="also write meta, set statistics and rows as JSON here")
    p.add_argument("--label", default=None, help="a name for this run in the JSON (e.g. old-engine)")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables (for the README)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="time the first batch cold (model load excluded, first-use costs included)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"),
                   help="print two --json outputs side by side and exit")
    # An ad-hoc grid instead of the named rows.
    p.add_argument("--models", nargs="+", help=f"ad-hoc grid: models (default {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="ad-hoc grid: batch sizes (default 8)")
    p.add_argument("--tasks", nargs="+", choices=(CLS, NEXT), help="ad-hoc grid: tasks (default classification)")
    p.add_argument("--set", default="medium", choices=tuple(SETS), help="ad-hoc grid: sentence set (default medium)")
    # Internal: one row in a fresh process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--task", default=CLS, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        args.batches = args.max_batches or 1
        return _worker(args)
    if args.compare:
        return compare(*args.compare, markdown=args.markdown)
    if args.max_batches is not None and args.max_batches < 1:
        print("dager_bench: error: --max-batches must be at least 1", file=sys.stderr)
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("dager_bench: error: --device cuda was given but PyTorch sees no CUDA GPU here.", file=sys.stderr)
            return 2
    rows = select_rows(args)
    count = gpt2_counter()
    meta = _meta(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="dager-bench-") as tmp:
        for i, row in enumerate(rows, start=1):
            print(f"[{i}/{len(rows)}] {row.id}: {row.model} {row.task} {row.set} B={row.batch_size} ...",
                  file=sys.stderr, flush=True)
            results.append(run_row(row, args=args, workdir=Path(tmp), count=count))
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    set_names = list(dict.fromkeys(r.set for r in rows))
    scols, sbody, sets = set_table(set_names, count)
    print(f"Input sets (GPT-2 tokens per line, text only): {', '.join(set_names)}")
    _print_table(scols, sbody, markdown=args.markdown)
    print()
    load = meta["load_average_start"]
    where = f"DAGER benchmark on {args.device}" + (f" ({meta['gpu']})" if "gpu" in meta else "")
    where += f", {platform.machine()}, {os.cpu_count()} CPU cores"
    if load:
        where += f", load average {load[0]:.1f} at start, {meta['load_average_end'][0]:.1f} at end"  # type: ignore[index]
    print(where)
    print(
        f"engine {meta['engine_commit']}; attack/client seconds are wall-clock means per batch, CPU s is the "
        "process's CPU time per batch (client + attack + input checks, all threads; robust to other load), "
        f"{'models warm' if args.warmup else 'first batch cold'}; tokens = GPT-2 tokens of the attacked lines; "
        "peak RSS per row (fresh process, model included)."
    )
    cols, body = _table(results, cuda=args.device == "cuda", device=args.device)
    _print_table(cols, body, markdown=args.markdown)
    for r in results:
        if "error" in r:
            print(f"error: {r['id']}: {r['error']}")
    if args.json is not None:
        payload = {"meta": meta, "sets": sets, "rows": results}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
