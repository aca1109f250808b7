"""DAGER benchmark: model x task x batch size -> exact match, ROUGE, time, peak memory.

Each configuration runs in a fresh subprocess (this script with ``--worker``), which
drives the real command line (:func:`dager.cli.main`) on sentences from
``assets/sentences`` and reports its own peak resident memory (``ru_maxrss``), so the
memory column is the honest high-water mark of loading the model, computing the
client's update and attacking it. Attack and client seconds are means per batch.

Targets (issue 3, 2-core CPU) are printed beside the results; they are goals to
compare against, not assertions.

Examples::

    python benchmarks/dager_bench.py                  # the default grid
    python benchmarks/dager_bench.py --quick          # two fast configurations
    python benchmarks/dager_bench.py --models gpt2-small-random --batch-sizes 8 32 --markdown
    python benchmarks/dager_bench.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "assets" / "sentences"

DEFAULT_GRID: tuple[tuple[str, str, int], ...] = (
    ("gpt2-small-random", "classification", 1),
    ("gpt2-small-random", "classification", 8),
    ("gpt2-small-random", "classification", 32),
    ("gpt2-small-random", "next-token", 8),
    ("llama-small-random", "classification", 8),
    ("minilm-l6", "classification", 4),
)
QUICK_GRID: tuple[tuple[str, str, int], ...] = (
    ("gpt2-small-random", "classification", 8),
    ("minilm-l6", "classification", 4),
)
DEFAULT_MODELS = ("gpt2-small-random", "llama-small-random", "minilm-l6")
ENCODERS_CLASSIFICATION_ONLY = ("minilm-l6",)
MIN_SENTENCES = 8
"""Each configuration attacks at least this many sentences (several batches at small B)."""

GB = 1024**3


@dataclass(frozen=True)
class Target:
    """A goal from issue 3, checked against one result row."""

    text: str
    check: Callable[[dict[str, float]], bool]


TARGETS: dict[tuple[str, str, int], Target] = {
    ("gpt2-small-random", "classification", 8): Target(
        "all exact, <= 0.8 s, < 3 GB",
        lambda r: r["exact_match"] == 1.0 and r["attack_s"] <= 0.8 and r["peak_bytes"] < 3 * GB,
    ),
    ("gpt2-small-random", "classification", 32): Target(
        "all exact, <= 4 s, < 3 GB",
        lambda r: r["exact_match"] == 1.0 and r["attack_s"] <= 4.0 and r["peak_bytes"] < 3 * GB,
    ),
    ("llama-small-random", "classification", 8): Target("all exact", lambda r: r["exact_match"] == 1.0),
    ("minilm-l6", "classification", 4): Target(
        ">= 90% exact, < 3 s", lambda r: r["exact_match"] >= 0.9 and r["attack_s"] < 3.0
    ),
}


# ---------------------------------------------------------------------------
# Worker: one configuration, in its own process


def _worker(args: argparse.Namespace) -> int:
    """Run the CLI once in this process and print peak memory as one JSON line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dager.cli import main

    argv = [
        "--model", args.model, "--task", args.task, "--batch-size", str(args.batch_size),
        "--input", str(args.input), "--output", str(args.output), "--device", args.device,
        "--max-batches", str(args.batches), "--seed", str(args.seed), "--quiet",
    ]
    code = main(argv)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    cuda_peak = None
    if args.device == "cuda":
        import torch

        cuda_peak = int(torch.cuda.max_memory_allocated())
    print(json.dumps({"exit": code, "peak_bytes": int(peak_kib * scale), "cuda_peak_bytes": cuda_peak}))
    return 0


# ---------------------------------------------------------------------------
# Driver


def _sentences(path: Path | None) -> list[str]:
    files = [path] if path is not None else sorted(SENTENCES.glob("*.txt"))
    lines: list[str] = []
    for f in files:
        lines.extend(line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
    return lines


def _grid(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    if args.models is None and args.batch_sizes is None and args.tasks is None:
        return list(QUICK_GRID if args.quick else DEFAULT_GRID)
    models = args.models or list(DEFAULT_MODELS)
    sizes = args.batch_sizes or [8]
    tasks = args.tasks or ["classification"]
    grid = []
    for m in models:
        for t in tasks:
            if t != "classification" and m in ENCODERS_CLASSIFICATION_ONLY:
                print(f"skipping {m} {t}: an encoder only supports classification", file=sys.stderr)
                continue
            grid.extend((m, t, b) for b in sizes)
    return grid


def _run_one(
    model: str, task: str, batch_size: int, *, args: argparse.Namespace, input_path: Path, workdir: Path
) -> dict[str, object]:
    batches = args.batches or max(1, math.ceil(MIN_SENTENCES / batch_size))
    out = workdir / f"{model}-{task}-{batch_size}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker",
        "--model", model, "--task", task, "--batch-size", str(batch_size), "--batches", str(batches),
        "--input", str(input_path), "--output", str(out), "--device", args.device, "--seed", str(args.seed),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    row: dict[str, object] = {"model": model, "task": task, "batch_size": batch_size}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        row["error"] = f"timeout after {args.timeout} s"
        return row
    row["wall_s"] = time.perf_counter() - t0
    status = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            status = json.loads(line)
            break
    if proc.returncode != 0 or status is None or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        row["error"] = f"worker failed: {tail}"
        return row
    report = json.loads(out.read_text(encoding="utf-8"))
    n = max(1, int(report["num_batches"]))
    row.update(
        batches=n,
        sentences=report["num_sentences"],
        exact_match=report["exact_match"],
        rouge1=report["rouge1"],
        rouge2=report["rouge2"],
        attack_s=report["seconds"] / n,
        client_s=report["client_seconds"] / n,
        peak_bytes=status["peak_bytes"],
        cuda_peak_bytes=status["cuda_peak_bytes"],
        over_capacity=report.get("over_capacity", False),
        budget_exhausted=report.get("budget_exhausted", False),
        failed_batches=report.get("failed_batches", []),
    )
    if status["exit"] != 0:
        row["note"] = f"cli exit {status['exit']}"
    return row


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1024**2:.0f} MB"


def _table(rows: Sequence[dict[str, object]], *, cuda: bool) -> tuple[list[str], list[list[str]]]:
    cols = ["model", "task", "B", "batches", "exact", "ROUGE-1", "ROUGE-2", "attack s", "client s", "peak RSS"]
    if cuda:
        cols.append("GPU peak")
    cols += ["target", "met"]
    body = []
    for r in rows:
        key = (r["model"], r["task"], r["batch_size"])
        target = TARGETS.get(key)  # type: ignore[arg-type]
        if "error" in r:
            cells = [str(r["model"]), str(r["task"]), str(r["batch_size"]), "-", "error (below)", "", "", "", "", ""]
            if cuda:
                cells.append("")
            cells += [target.text if target else "", "no" if target else ""]
            body.append(cells)
            continue
        flags = [f for f in ("over_capacity", "budget_exhausted") if r.get(f)]
        if r.get("failed_batches"):
            flags.append(f"failed {r['failed_batches']}")
        exact = f"{100 * float(r['exact_match']):.1f}%" + (f" ({', '.join(flags)})" if flags else "")
        cells = [
            str(r["model"]), str(r["task"]), str(r["batch_size"]), str(r["batches"]), exact,
            f"{float(r['rouge1']):.3f}", f"{float(r['rouge2']):.3f}",
            f"{float(r['attack_s']):.2f}", f"{float(r['client_s']):.2f}", _fmt_bytes(r["peak_bytes"]),  # type: ignore[arg-type]
        ]
        if cuda:
            cells.append(_fmt_bytes(r.get("cuda_peak_bytes")))  # type: ignore[arg-type]
        met = ""
        if target is not None:
            met = "yes" if target.check(r) else "no"  # type: ignore[arg-type]
        cells += [target.text if target else "", met]
        body.append(cells)
    return cols, body


def _print_table(cols: list[str], body: list[list[str]], *, markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "|".join("---" for _ in cols) + "|")
        for row in body:
            print("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        return
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in body:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", help=f"models (default grid, or {', '.join(DEFAULT_MODELS)})")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="batch sizes (default grid, or 8)")
    p.add_argument("--tasks", nargs="+", choices=("classification", "next-token"), help="tasks (default grid, or classification)")
    p.add_argument("--quick", action="store_true", help="two fast configurations (gpt2 B=8, minilm B=4)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batches", type=int, default=None, help=f"batches per configuration (default: enough for {MIN_SENTENCES} sentences)")
    p.add_argument("--input", type=Path, default=None, help="sentence file (default: all of assets/sentences)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    # Internal: one configuration in a fresh process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--task", default="classification", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda was given but PyTorch sees no CUDA GPU here.", file=sys.stderr)
            return 2
    sentences = _sentences(args.input)
    grid = _grid(args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dager-bench-") as tmp:
        workdir = Path(tmp)
        input_path = workdir / "sentences.txt"
        input_path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
        for i, (model, task, b) in enumerate(grid, start=1):
            print(f"[{i}/{len(grid)}] {model} {task} B={b} ...", file=sys.stderr, flush=True)
            if b > len(sentences):
                rows.append({"model": model, "task": task, "batch_size": b,
                             "error": f"needs {b} sentences, the input has {len(sentences)}"})
                continue
            rows.append(_run_one(model, task, b, args=args, input_path=input_path, workdir=workdir))
    cols, body = _table(rows, cuda=args.device == "cuda")
    import platform

    print(
        f"DAGER benchmark on {args.device} ({platform.machine()}, {os.cpu_count()} CPU cores); "
        "seconds are means per batch; peak RSS per configuration (fresh process)."
    )
    _print_table(cols, body, markdown=args.markdown)
    for r in rows:
        if "error" in r:
            print(f"error: {r['model']} {r['task']} B={r['batch_size']}: {r['error']}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
