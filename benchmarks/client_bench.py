"""Client-training benchmark (issue 11): DAGER against LoRA, half precision, dropout and FedAvg.

Every row drives the real command line (``python -m dager``) in a fresh subprocess on the
medium-length sample set (``assets/sentences/medium.txt``, mean 13+ GPT-2 tokens) at B=8
and reads its result JSON. Columns: exact match, ROUGE-1, the attacker's capacity
verdict (``over_capacity``), ``false exact`` (sentences the attack flagged exact that are
not: the flag must stay trustworthy), client and attack wall seconds per batch (from the JSON),
and the subprocess's CPU seconds (``RUSAGE_CHILDREN``: loading, client and attack;
steadier than wall time on a shared machine). A row that runs past ``--row-timeout``
is printed as ``timeout``.

Three tables:

* ``setups``: plain FedSGD, LoRA r=256, bf16, fp16, dropout (the model's rates, which
  are 0 in the embedded random models, and p=0.1), FedAvg 2 epochs of
  minibatches of 2 (8 local steps) at lr 1e-4, with the targets of issue 11;
* ``lora``: exact match against r in {16, 32, 64, 128, 256} and the verdict;
* ``fedavg``: exact match over lr in {1e-5, 1e-4, 1e-3} x epochs in {1, 2, 5}.

Examples::

    nice -n 5 python benchmarks/client_bench.py                      # every table, both models
    python benchmarks/client_bench.py --tables setups --models gpt2-small-random --max-batches 1
    python benchmarks/client_bench.py --tables lora --json lora.json
    python benchmarks/client_bench.py --tables fedavg --lrs 1e-4 --epochs 2 --max-batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDIUM = ROOT / "assets" / "sentences" / "medium.txt"
MODELS = ("gpt2-small-random", "llama-small-random")
TABLES = ("setups", "lora", "fedavg")

SETUPS: list[tuple[str, list[str], str]] = [
    ("plain FedSGD", [], "-"),
    ("LoRA r=256", ["--client", "lora:r=256"], "all exact"),
    ("bf16", ["--precision", "bf16"], ">= 95% exact"),
    ("fp16", ["--precision", "fp16"], ">= 95% exact"),
    ("dropout (model rates)", ["--dropout"], ">= 95% exact"),
    ("dropout p=0.1", ["--client", "dropout:p=0.1"], ">= 95% exact"),
    ("FedAvg 2 ep x mb 2, lr 1e-4", ["--defense", "fedavg:epochs=2,minibatch=2,lr=1e-4"], ">= 90% exact"),
]
LORA_RANKS = (16, 32, 64, 128, 256)
FEDAVG_LRS = ("1e-5", "1e-4", "1e-3")
FEDAVG_EPOCHS = (1, 2, 5)


def run_row(model: str, extra: list[str], *, batch_size: int, max_batches: int, timeout: float) -> dict[str, object]:
    """One ``python -m dager`` run; its JSON's scores and the child's CPU seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable, "-m", "dager", "--model", model, "--input", str(MEDIUM),
            "--batch-size", str(batch_size), "--max-batches", str(max_batches), "--output", str(out), "-q", *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "wall": time.perf_counter() - t0}
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if not out.exists():
            return {"status": "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:120], "cpu": cpu}
        report = json.loads(out.read_text())
    n = max(1, int(report["num_batches"]))
    return {
        "status": "ok",
        "exact": report["exact_match"],
        "num_exact": report["num_exact"],
        "num": report["num_sentences"],
        "rouge1": report["rouge1"],
        "over": report["over_capacity"],
        "ranks": [b.get("rank") for b in report["batches"]],
        # sentences the attack flagged exact that are not (the flag must be trustworthy)
        "false_exact": sum(
            bool(v) and not bool(e) for b in report["batches"] for v, e in zip(b.get("verified") or [], b.get("exact") or [])
        ),
        "client_s": report["client_seconds"] / n,
        "attack_s": report["seconds"] / n,
        "cpu": cpu,
    }


def _cells(r: dict[str, object]) -> list[str]:
    if r.get("status") != "ok":
        return [str(r.get("status")), "-", "-", "-", "-", "-", "-", "-"]
    return [
        f"{r['num_exact']}/{r['num']} ({100 * float(r['exact']):.0f}%)",
        f"{float(r['rouge1']):.3f}",
        str(r["false_exact"]),
        ",".join(str(x) for x in r["ranks"]),  # type: ignore[union-attr]
        "over capacity" if r["over"] else "within capacity",
        f"{float(r['client_s']):.1f}",
        f"{float(r['attack_s']):.1f}",
        f"{float(r['cpu']):.0f}",
    ]


def _table(title: str, head: list[str], rows: list[list[str]]) -> None:
    cols = [*head, "exact", "ROUGE-1", "false exact", "rank", "verdict", "client s", "attack s", "CPU s"]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |", flush=True)


def _progress(model: str, row: str, r: dict[str, object]) -> None:
    """One line per finished row (stderr), so a long run shows its results as they come."""
    print(f"  done: {model} | {row} | " + " | ".join(_cells(r)), file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=2, help="batches of the medium set per row (default 2)")
    p.add_argument("--row-timeout", type=float, default=600.0, help="seconds before a row is called a timeout")
    p.add_argument("--json", type=Path, default=None, help="also write every row's numbers here")
    p.add_argument("--lrs", nargs="+", default=list(FEDAVG_LRS), help="FedAvg table: learning rates")
    p.add_argument("--epochs", nargs="+", type=int, default=list(FEDAVG_EPOCHS), help="FedAvg table: epochs")
    p.add_argument("--ranks", nargs="+", type=int, default=list(LORA_RANKS), help="LoRA table: ranks r")
    p.add_argument("--setups", nargs="+", default=None,
                   help="setups table: only the rows whose name starts with one of these (e.g. bf16 fp16)")
    args = p.parse_args(argv)
    print(
        f"client_bench: medium set, B={args.batch_size}, {args.max_batches} batch(es) per row, "
        f"load {os.getloadavg()[0]:.1f}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    dump: list[dict[str, object]] = []
    kw = {"batch_size": args.batch_size, "max_batches": args.max_batches, "timeout": args.row_timeout}
    for model in args.models:
        if "setups" in args.tables:
            rows = []
            for name, extra, target in SETUPS:
                if args.setups and not any(name.startswith(w) for w in args.setups):
                    continue
                r = run_row(model, extra, **kw)
                _progress(model, name, r)
                dump.append({"table": "setups", "model": model, "row": name, **r})
                rows.append([name, target, *_cells(r)])
            _table(f"Client setups on {model} (cost: compare CPU s with plain FedSGD)", ["client", "target"], rows)
        if "lora" in args.tables:
            rows = []
            for rank in args.ranks:
                r = run_row(model, ["--client", f"lora:r={rank}"], **kw)
                _progress(model, f"lora r={rank}", r)
                dump.append({"table": "lora", "model": model, "r": rank, **r})
                rows.append([str(rank), *_cells(r)])
            _table(f"LoRA rank r on {model} (exact needs r >= distinct inputs per A matrix)", ["r"], rows)
        if "fedavg" in args.tables:
            rows = []
            for lr in args.lrs:
                for epochs in args.epochs:
                    spec = f"fedavg:epochs={epochs},minibatch=2,lr={lr}"
                    r = run_row(model, ["--defense", spec], **kw)
                    _progress(model, spec, r)
                    dump.append({"table": "fedavg", "model": model, "lr": lr, "epochs": epochs, **r})
                    rows.append([lr, str(epochs), str(epochs * -(-args.batch_size // 2)), *_cells(r)])
            _table(f"FedAvg over minibatches of 2 on {model}", ["lr", "epochs", "steps"], rows)
    if args.json is not None:
        args.json.write_text(json.dumps(dump, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
