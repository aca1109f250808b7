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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    # Benchmark the code next to this script, installed or not (a bare GPU machine).
    sys.path.insert(0, str(ROOT))
SENTENCES = ROOT / "assets" / "sentences"
GB = 1024**3

WARMUP_SENTENCE = "A short warm-up line that loads the model before the clock starts."
"""Attacked once per worker before the measured run (not part of any set)."""

SETS: dict[str, str] = {
    "short": "short.txt",
    "medium": "medium.txt",
    "reviews": "reviews.txt",
    "documents": "documents.txt",
    "messages": "messages.txt",
}
"""Benchmark sets by short name (files in ``assets/sentences``)."""


# ---------------------------------------------------------------------------
# Rows and targets


Check = Callable[[dict[str, object]], bool]


@dataclass(frozen=True)
class Target:
    """A goal from the issue, checked against one result row.

    Attributes:
        text: the goal as printed in the table.
        check: whether a result row meets it.
    """

    text: str
    check: Check


def _goal(*, exact: float, seconds: float | None = None, memory_gb: float | None = None) -> Target:
    """A target: at least ``exact`` exact match, at most ``seconds`` per batch, under ``memory_gb``."""
    parts = ["all exact" if exact >= 1.0 else f">= {exact:.0%} exact"]
    if seconds is not None:
        parts.append(f"<= {seconds:g} s")
    if memory_gb is not None:
        parts.append(f"< {memory_gb:g} GB")

    def check(r: dict[str, object]) -> bool:
        ok = float(r["exact_match"]) >= exact  # type: ignore[arg-type]
        if seconds is not None:
            ok = ok and float(r["attack_s"]) <= seconds  # type: ignore[arg-type]
        if memory_gb is not None:
            ok = ok and int(r["peak_bytes"]) < memory_gb * GB  # type: ignore[call-overload]
        return ok

    return Target(", ".join(parts), check)


@dataclass(frozen=True)
class Row:
    """One benchmark row.

    Attributes:
        id: short name for ``--rows`` (and the key of the JSON output).
        model: embedded model name.
        task: ``"classification"`` or ``"next-token"``.
        set: sentence set (a key of :data:`SETS`).
        batch_size: sentences per batch.
        batches: batches attacked by default (``--max-batches`` caps it).
        target: the CPU goal, if any.
        gpu_target: the goal on CUDA (default: the CPU goal).
        default: part of the default run (``make bench``).
    """

    id: str
    model: str
    task: str
    set: str
    batch_size: int
    batches: int
    target: Target | None = None
    gpu_target: Target | None = None
    default: bool = True

    def target_for(self, device: str) -> Target | None:
        if device == "cuda" and self.gpu_target is not None:
            return self.gpu_target
        return self.target


GPT2 = "gpt2-small-random"
LLAMA = "llama-small-random"
WIDE = "llama2-7b-width-random"
MINILM = "minilm-l6"
CLS, NEXT = "classification", "next-token"

ROWS: tuple[Row, ...] = (
    Row("gpt2-med-8", GPT2, CLS, "medium", 8, 4, _goal(exact=1.0, seconds=0.5)),
    Row("gpt2-med-32", GPT2, CLS, "medium", 32, 2, _goal(exact=1.0, seconds=3)),
    Row("gpt2-rev-16", GPT2, CLS, "reviews", 16, 2, _goal(exact=1.0, seconds=4)),
    Row("gpt2-doc-1", GPT2, CLS, "documents", 1, 2, _goal(exact=1.0, seconds=10)),
    Row("gpt2-doc-2", GPT2, CLS, "documents", 2, 2, _goal(exact=1.0, seconds=10)),
    Row("gpt2-short-8", GPT2, CLS, "short", 8, 4),
    Row("gpt2-next-1", GPT2, NEXT, "medium", 1, 8, _goal(exact=1.0)),
    Row("gpt2-next-8", GPT2, NEXT, "medium", 8, 2, _goal(exact=1.0)),
    Row("llama-med-8", LLAMA, CLS, "medium", 8, 2, _goal(exact=1.0)),
    Row("wide-med-64", WIDE, CLS, "medium", 64, 2, _goal(exact=0.95, seconds=60, memory_gb=16)),
    Row(
        "wide-med-128", WIDE, CLS, "medium", 128, 1,
        _goal(exact=0.95, seconds=180, memory_gb=16),
        gpu_target=_goal(exact=0.95, seconds=10),
    ),
    Row("minilm-med-4", MINILM, CLS, "medium", 4, 8, _goal(exact=0.95, seconds=3)),
    Row("minilm-med-8", MINILM, CLS, "medium", 8, 4, _goal(exact=0.90, seconds=10)),
)
ROWS_BY_ID = {r.id: r for r in ROWS}
QUICK_ROWS = ("gpt2-med-8", "minilm-med-4")
DEFAULT_GRID: tuple[tuple[str, str, int], ...] = tuple((r.model, r.task, r.batch_size) for r in ROWS if r.default)
"""``(model, task, B)`` of the default rows (kept for callers of the first release's grid)."""
DEFAULT_MODELS = (GPT2, LLAMA, MINILM)
ENCODERS_CLASSIFICATION_ONLY = (MINILM,)
ADHOC_SENTENCES = 8
"""An ad-hoc row attacks at least this many sentences (several batches at small B)."""


def select_rows(args: argparse.Namespace) -> list[Row]:
    """The rows to run: ``--rows`` filters, an ad-hoc grid, ``--quick`` or the defaults.

    ``--rows`` takes ids or substrings of ids, models or set names (``gpt2-med``,
    ``wide``, ``reviews``); an ad-hoc grid (``--models``/``--batch-sizes``/``--tasks``)
    builds rows on ``--set`` with the issue's target where one exists.

    Raises:
        SystemExit: a ``--rows`` pattern matches nothing (exit 2, one line).
    """
    if args.models is not None or args.batch_sizes is not None or args.tasks is not None:
        rows = _adhoc_rows(args)
    elif args.quick:
        rows = [ROWS_BY_ID[i] for i in QUICK_ROWS]
    else:
        rows = [r for r in ROWS if r.default or args.rows]
    if args.rows:
        chosen = []
        for pattern in args.rows:
            hits = [r for r in rows if r.id == pattern] or [
                r for r in rows if pattern in r.id or pattern == r.model or pattern == r.set
            ]
            if not hits:
                raise SystemExit(f"dager_bench: error: --rows {pattern!r} matches no row; rows: {', '.join(ROWS_BY_ID)}")
            chosen.extend(h for h in hits if h not in chosen)
        rows = chosen
    return rows


def _adhoc_rows(args: argparse.Namespace) -> list[Row]:
    models = args.models or list(DEFAULT_MODELS)
    sizes = args.batch_sizes or [8]
    tasks = args.tasks or [CLS]
    rows = []
    for m in models:
        for t in tasks:
            if t != CLS and m in ENCODERS_CLASSIFICATION_ONLY:
                print(f"skipping {m} {t}: an encoder only supports classification", file=sys.stderr)
                continue
            for b in sizes:
                known = next(
                    (r for r in ROWS if (r.model, r.task, r.batch_size, r.set) == (m, t, b, args.set)), None
                )
                batches = max(1, -(-ADHOC_SENTENCES // b))
                rows.append(known or Row(f"{m}-{args.set}-{t}-{b}", m, t, args.set, b, batches))
    return rows


def _grid(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """``(model, task, B)`` of the selected rows."""
    return [(r.model, r.task, r.batch_size) for r in select_rows(args)]


def _row_spec(result: dict[str, object]) -> Row | None:
    """The named row a result belongs to (by id, else by model, task, B and set)."""
    if result.get("id") in ROWS_BY_ID:
        return ROWS_BY_ID[str(result["id"])]
    for r in ROWS:
        if (r.model, r.task, r.batch_size) == (result.get("model"), result.get("task"), result.get("batch_size")):
            if result.get("set", r.set) == r.set:
                return r
    return None


# ---------------------------------------------------------------------------
# Set statistics (GPT-2 tokens, whatever the model: one ruler for every table)


@dataclass(frozen=True)
class SetStats:
    """Length statistics of a list of lines, in GPT-2 tokens (no special tokens)."""

    lines: int
    mean_tokens: float
    max_tokens: int


def read_set(name: str) -> list[str]:
    """The non-blank lines of a benchmark set, as the CLI reads them."""
    path = SENTENCES / SETS[name]
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def token_stats(lines: Sequence[str], count: Callable[[str], int]) -> SetStats:
    """Mean and maximum token counts of ``lines``."""
    counts = [count(ln) for ln in lines]
    return SetStats(len(counts), statistics.fmean(counts) if counts else 0.0, max(counts, default=0))


def gpt2_counter() -> Callable[[str], int]:
    """Counts GPT-2 tokens with the embedded tokenizer (the zoo's)."""
    from dager.zoo import gpt2_tokenizer

    tok = gpt2_tokenizer()
    return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


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


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1024**2:.0f} MB"


def _tokens(r: dict[str, object]) -> str:
    if "mean_tokens" not in r:
        return "-"
    return f"{float(r['mean_tokens']):.1f} / {r['max_tokens']}"  # type: ignore[arg-type]


def _table(
    rows: Sequence[dict[str, object]], *, cuda: bool, device: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """Column names and cells of the results table (one row per result)."""
    device = device or ("cuda" if cuda else "cpu")
    cols = ["id", "model", "task", "set", "tokens mean/max", "B", "batches", "exact", "ROUGE-1", "ROUGE-2",
            "attack s", "client s", "CPU s", "peak RSS"]
    if cuda:
        cols.append("GPU peak")
    cols += ["target", "met"]
    body = []
    for r in rows:
        spec = _row_spec(r)
        target = spec.target_for(device) if spec is not None else None
        head = [str(r.get("id", spec.id if spec else "-")), str(r["model"]), str(r["task"]),
                str(r.get("set", spec.set if spec else "-")), _tokens(r), str(r["batch_size"])]
        if "error" in r:
            what = "timed out" if r.get("timed_out") else "error (below)"
            cells = [*head, str(r.get("batches", "-")), what, "", "", "", "", "", ""]
            if cuda:
                cells.append("")
            body.append([*cells, target.text if target else "", "no" if target else ""])
            continue
        flags = [f for f in ("over_capacity", "budget_exhausted") if r.get(f)]
        if r.get("failed_batches"):
            flags.append(f"failed {r['failed_batches']}")
        exact = f"{100 * float(r['exact_match']):.1f}%" + (f" ({', '.join(flags)})" if flags else "")  # type: ignore[arg-type]
        cells = [
            *head, str(r["batches"]), exact,
            f"{float(r['rouge1']):.3f}", f"{float(r['rouge2']):.3f}",  # type: ignore[arg-type]
            f"{float(r['attack_s']):.2f}", f"{float(r['client_s']):.2f}",  # type: ignore[arg-type]
            f"{float(r['cpu_s']):.2f}" if "cpu_s" in r else "-", _fmt_bytes(r["peak_bytes"]),  # type: ignore[arg-type]
        ]
        if cuda:
            cells.append(_fmt_bytes(r.get("cuda_peak_bytes")))  # type: ignore[arg-type]
        met = ("yes" if target.check(r) else "no") if target is not None else ""  # type: ignore[arg-type]
        body.append([*cells, target.text if target else "", met])
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


def set_table(names: Sequence[str], count: Callable[[str], int]) -> tuple[list[str], list[list[str]], dict]:
    """The input sets' statistics: columns, cells and a JSON-ready dict."""
    cols = ["set", "file", "lines", "mean GPT-2 tokens", "max GPT-2 tokens"]
    body, data = [], {}
    for name in names:
        s = token_stats(read_set(name), count)
        data[name] = {"file": SETS[name], "lines": s.lines, "mean_tokens": round(s.mean_tokens, 2), "max_tokens": s.max_tokens}
        body.append([name, SETS[name], str(s.lines), f"{s.mean_tokens:.1f}", str(s.max_tokens)])
    return cols, body, data


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
# Side by side: two JSON outputs (e.g. the old and the new engine)


def compare(old_path: Path, new_path: Path, *, markdown: bool) -> int:
    """Print two result files side by side, joined on row id."""
    old, new = (json.loads(p.read_text(encoding="utf-8")) for p in (old_path, new_path))
    name_a = old.get("meta", {}).get("label") or old_path.stem
    name_b = new.get("meta", {}).get("label") or new_path.stem
    by_id = {r["id"]: r for r in old.get("rows", [])}
    cols = ["id", "set", "B", f"exact {name_a}", f"exact {name_b}", f"attack s {name_a}", f"attack s {name_b}",
            "speed-up", f"peak RSS {name_a}", f"peak RSS {name_b}"]
    body = []

    def cell(r: dict | None, key: str) -> str:
        if r is None:
            return "-"
        if "error" in r:
            return "timed out" if r.get("timed_out") else "error"
        if key == "exact_match":
            return f"{100 * float(r[key]):.1f}%"
        if key == "peak_bytes":
            return _fmt_bytes(r.get(key))
        return f"{float(r[key]):.2f}"

    for b in new.get("rows", []):
        a = by_id.pop(b["id"], None)
        speed = "-"
        if a is not None and "error" not in a and "error" not in b and float(b["attack_s"]) > 0:
            speed = f"{float(a['attack_s']) / float(b['attack_s']):.1f}x"
        body.append([b["id"], str(b.get("set", "")), str(b["batch_size"]), cell(a, "exact_match"),
                     cell(b, "exact_match"), cell(a, "attack_s"), cell(b, "attack_s"), speed,
                     cell(a, "peak_bytes"), cell(b, "peak_bytes")])
    for a in by_id.values():
        body.append([a["id"], str(a.get("set", "")), str(a["batch_size"]), cell(a, "exact_match"), "-",
                     cell(a, "attack_s"), "-", "-", cell(a, "peak_bytes"), "-"])
    for tag, data in ((name_a, old), (name_b, new)):
        meta = data.get("meta", {})
        print(f"{tag}: engine {meta.get('engine_commit')}, {meta.get('device')}, {meta.get('cpu_cores')} cores, "
              f"load {meta.get('load_average_start')}, started {meta.get('started')}")
    _print_table(cols, body, markdown=markdown)
    return 0


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
