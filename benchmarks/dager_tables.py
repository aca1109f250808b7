"""DAGER benchmark tables: the results table, the input sets' table and the side-by-side
comparison of two JSON outputs (``--compare OLD NEW``).

Imported by :mod:`dager_bench` (the command line), which re-exports these names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from dager_rows import GB, SETS, _row_spec, read_set, token_stats

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
