"""DAGER benchmark rows: the sentence sets, the named rows with the issue's targets, and
the set statistics every table states (GPT-2 tokens per line).

Imported by :mod:`dager_bench` (the command line), which re-exports these names.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
