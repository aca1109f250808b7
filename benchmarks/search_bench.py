"""DAGER's decoder search alone: CPU seconds per batch, its calibration, parity.

The attack benchmark (``benchmarks/dager_bench.py``) times whole attacks; this script
times step 3, the decoder search (:func:`dager.search.decoder_search`), in isolation.
It attacks each batch once (the client's update, the spans and the layer-1 candidates
as the attack computes them), keeps the arguments the attack passed to the search, then
replays the search alone ``--reps`` times on one thread and reports CPU seconds per
batch (``time.process_time``: robust to other load on a shared machine), the part of
it spent calibrating the thresholds, and, with ``--reference``, whether the slow
reference search (:mod:`dager.decoder_reference`) finds the same sentences.

``--width`` builds ``llama2-7b-width-random``'s recipe at a smaller width (heads of
128, MLP 2.6875 d), to iterate on the wide model's search in seconds.

Examples::

    python benchmarks/search_bench.py                                   # gpt2, medium, B=8
    python benchmarks/search_bench.py --reference --batches 2
    python benchmarks/search_bench.py --model llama2-7b-width-random -B 64 --batches 1 --reps 1
    python benchmarks/search_bench.py --width 1024 -B 16 --batches 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _Timed:
    """CPU seconds spent inside a generator function's items (and in its calibration)."""

    def __init__(self, fn: Callable[..., Iterator]) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: object, **kwargs: object) -> Iterator:
        it = self.fn(*args, **kwargs)
        while True:
            t0 = time.process_time()
            try:
                item = next(it)
            except StopIteration:
                self.seconds += time.process_time() - t0
                return
            self.seconds += time.process_time() - t0
            yield item


def _bundle(args: argparse.Namespace):  # -> ModelBundle
    if not args.width:
        from dager.zoo import load_model

        return load_model(args.model, "classification")
    from dager.bundle import ModelBundle
    from dager.families import family_for
    from dager.zoo_models import LlamaShape, build_llama_width_random

    shape = LlamaShape(hidden_size=args.width, num_heads=args.width // 128, intermediate_size=int(args.width * 2.6875))
    model, tok = build_llama_width_random("classification", shape)
    model.eval()
    return ModelBundle(
        name=f"llama-width-{args.width}", task="classification", model=model, tokenizer=tok,
        family=family_for("llama"), pretrained=False, description="reduced-width llama2-7b-width-random",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-small-random")
    p.add_argument("--set", default="medium", help="sentence set in assets/sentences (default medium)")
    p.add_argument("-B", "--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--reps", type=int, default=3, help="replays of the search (the best is reported)")
    p.add_argument("--width", type=int, default=0, help="reduced-width llama2-7b-width-random (d, a multiple of 128)")
    p.add_argument("--reference", action="store_true", help="also run the reference search and compare")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import torch

    import dager.attack_search as attack_search
    import dager.search as search
    from dager.attack import required_parameters, run_dager
    from fedclient import compute_update

    torch.set_num_threads(1)
    text = (ROOT / "assets" / "sentences" / f"{args.set}.txt").read_text(encoding="utf-8")
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    bundle = _bundle(args)
    names = required_parameters(bundle)
    calls: list[tuple[tuple, dict]] = []
    real = search.decoder_search

    def capture(*a: object, **kw: object) -> Iterator:
        th = kw["thresholds"]
        calls.append((a, {**kw, "thresholds": search.Thresholds(th.mlp, th.layer2)}))  # before calibration sets it
        return real(*a, **kw)

    attack_search.decoder_search = capture
    exact = total = 0
    attack_cpu = 0.0
    for b in range(args.batches):
        batch = lines[b * args.batch_size : (b + 1) * args.batch_size]
        update = compute_update(bundle.model, bundle.encode(batch, seed=0), parameters=names)
        t0 = time.process_time()
        result = run_dager(bundle, update)
        attack_cpu += time.process_time() - t0
        exact += sum(1 for s, e in zip(result.sentences, result.exact) if e and s in batch)
        total += len(batch)
    attack_search.decoder_search = real

    def replay(fn: Callable[..., Iterator]) -> tuple[float, float, list]:
        timed, calib = _Timed(fn), _Timed(search._calibrate)
        search._calibrate = calib
        found = []
        try:
            with torch.no_grad():
                for a, kw in calls:
                    th = kw["thresholds"]
                    items = list(timed(*a, **{**kw, "thresholds": search.Thresholds(th.mlp, th.layer2)}))
                    found.append(sorted(f.token_ids for f in items if isinstance(f, search.Found)))
        finally:
            search._calibrate = calib.fn
        return timed.seconds / len(calls), calib.seconds / len(calls), found

    runs = [replay(search.decoder_search) for _ in range(args.reps)]
    best = min(runs, key=lambda r: r[0])
    name = f"llama-width-{args.width}" if args.width else args.model
    cols = ["model", "set", "B", "batches", "exact", "attack CPU s", "search CPU s", "of it calibration"]
    row = [name, args.set, str(args.batch_size), str(len(calls)), f"{exact}/{total}", f"{attack_cpu / len(calls):.2f}",
           f"{best[0]:.3f}", f"{best[1]:.3f}"]
    if args.reference:
        ref = replay(search._reference_decoder_search)
        cols += ["reference CPU s", "same as reference"]
        row += [f"{ref[0]:.3f}", "yes" if ref[2] == best[2] else "NO"]
    widths = [max(len(c), len(v)) for c, v in zip(cols, row)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print(f"(one thread; CPU seconds per batch, best of {args.reps} replays; reps: "
          + ", ".join(f"{r[0]:.3f}" for r in runs) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
