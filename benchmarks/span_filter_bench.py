"""CPU seconds of DAGER's span and layer-1 filter stages on one client update (issue 10).

The attack's first stages, timed one by one as the attack runs them: the layer-1 span
(``span1``), block 1's span (``span2``), block 0's MLP span (``span_mlp``) and the
layer-1 token filter with its threshold (``filter``). The first repetition runs with
the per-model caches cold (the filter's token and position terms); the "warm" column is
the best of the others, what every later batch of a warm model pays. Times are
``time.process_time`` (this process, all threads): run with ``OMP_NUM_THREADS=1`` for
one-thread figures that other load on the machine barely disturbs.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/span_filter_bench.py --model gpt2-small-random --batch-size 8
    OMP_NUM_THREADS=1 python benchmarks/span_filter_bench.py --model llama2-7b-width-random --batch-size 64 --reps 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("span1", "span2", "span_mlp", "filter")


def _lines(name: str, count: int) -> list[str]:
    path = ROOT / "assets" / "sentences" / f"{name}.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) < count:
        raise SystemExit(f"the {name} set has {len(lines)} lines, fewer than --batch-size {count}")
    return lines[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small-random")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--set", default="medium")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (the first is cold)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from dager.attack import _Deadline, _layer1, _layer1_threshold, required_parameters
    from dager.config import DagerConfig
    from dager.layers import hooks_for
    from dager.span import span_of
    from dager.zoo import load_model
    from fedclient import compute_update

    bundle = load_model(args.model)
    hooks = hooks_for(bundle.model)
    batch = bundle.encode(_lines(args.set, args.batch_size), seed=0)
    update = compute_update(bundle.model, batch, parameters=required_parameters(bundle))
    config = DagerConfig()
    per_sentence = 16 if hooks.positional else 8  # the attack's first rank hint
    runs: list[dict[str, float]] = []
    info: dict[str, str] = {}
    with torch.no_grad():
        for _ in range(max(1, args.reps)):
            t: dict[str, float] = {}
            c = time.process_time()
            m = hooks.input_matrix(update, hooks.attention_parameters(0))
            s1 = span_of(m, tolerance=config.rank_tolerance, rank_hint=per_sentence * args.batch_size)
            t["span1"] = time.process_time() - c
            c = time.process_time()
            more = s1.rank // 4 if hooks.positional else s1.rank
            m = hooks.input_matrix(update, hooks.attention_parameters(1))
            s2 = span_of(m, tolerance=config.rank_tolerance, rank_hint=s1.rank + more)
            t["span2"] = time.process_time() - c
            c = time.process_time()
            sm = None
            if hooks.is_decoder:
                m = hooks.input_matrix(update, hooks.mlp_parameters(0))
                sm = span_of(m, tolerance=config.rank_tolerance, rank_hint=s2.rank)
            t["span_mlp"] = time.process_time() - c
            del m
            c = time.process_time()
            dists, _ = _layer1(hooks, s1, _Deadline(time.perf_counter(), None), lower_bounds=True)
            thr = _layer1_threshold(config, dists, s1)
            t["filter"] = time.process_time() - c
            runs.append(t)
            info = {
                "span1": f"rank {s1.rank} ({s1.method})",
                "span2": f"rank {s2.rank} ({s2.method})",
                "span_mlp": f"rank {sm.rank} ({sm.method})" if sm is not None else "-",
                "filter": f"{dists.shape[0]} positions, {int((dists < thr).sum())} pairs kept",
            }
    threads = torch.get_num_threads()
    print(f"{args.model}, {args.set} set, B={args.batch_size}, {threads} thread(s); CPU s (time.process_time)")
    rows = [("stage", "cold", "warm", "")]
    for stage in STAGES:
        cold = runs[0][stage]
        warm = min(r[stage] for r in runs[1:]) if len(runs) > 1 else float("nan")
        rows.append((stage, f"{cold:.3f}", f"{warm:.3f}", info[stage]))
    total_cold = sum(runs[0].values())
    total_warm = min(sum(r.values()) for r in runs[1:]) if len(runs) > 1 else float("nan")
    rows.append(("total", f"{total_cold:.3f}", f"{total_warm:.3f}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
