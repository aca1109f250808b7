"""Defense cost: per-example gradients (DP-SGD) against the plain FedSGD gradient.

Target (issue 6): per-example gradients for B=8 on ``gpt2-small-random`` cost at most
3x the plain FedSGD gradient. Prints one table row per method with the median wall time
over ``--repeats`` runs (after one warm-up run) and the ratio to the plain gradient.

    HF_HUB_OFFLINE=1 python benchmarks/defense_bench.py [--model gpt2-small-random]
        [--batch-size 8] [--repeats 3] [--threads N] [--with-loop] [--target-only]

Rows:
    fedsgd            the plain gradient of the mean loss (all parameters)
    per-example vmap  torch.func vmap(grad) per-example gradients (all parameters)
    per-example loop  one backward per example (the fallback), with --with-loop
    dp-sgd            the whole DPSGD defense (per-example grads, clip, noise)
    noise / prune / int8 / fedavg   the cheaper defenses, for scale
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "The patient was admitted on Monday with chest pain.",
    "My password is hunter2 and nobody knows.",
    "Alice sent Bob the quarterly report yesterday.",
    "We met at the cafe near the station at noon.",
    "The bank account number ends in 4471.",
    "Please call me back after the meeting tonight.",
    "Her diagnosis was confirmed by the lab results.",
    "They moved to Berlin last spring for work.",
    "The contract was signed in the back office.",
    "Our flight leaves from gate twelve at dawn.",
    "He keeps the spare key under the blue pot.",
    "The invoice total came to three hundred euros.",
    "She said the results would stay confidential.",
    "I forgot my badge at home again today.",
    "The server logs were deleted last night.",
    "Send the draft to the whole team by Friday.",
]


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocator, vmap tracing caches)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-small-random")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--with-loop", action="store_true", help="also time the per-example loop fallback")
    parser.add_argument("--target-only", action="store_true", help="time only fedsgd and per-example vmap")
    args = parser.parse_args(argv)

    import torch

    import dager
    from fedclient import DPSGD, FedAvg, GaussianNoise, Prune, Quantize, compute_update
    from fedclient.client import fedsgd_gradient
    from fedclient.dp import per_example_gradients, trainable_names

    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.batch_size <= len(SENTENCES):
        parser.error(f"--batch-size must be between 1 and {len(SENTENCES)}")

    bundle = dager.load_model(args.model)
    model = bundle.model
    batch = bundle.encode(SENTENCES[: args.batch_size], seed=0)
    names = trainable_names(model)
    params = sum(p.numel() for _, p in model.named_parameters())

    cases: list[tuple[str, Callable[[], object]]] = [
        ("fedsgd", lambda: fedsgd_gradient(model, batch, parameters=names)),
        ("per-example vmap", lambda: per_example_gradients(model, batch, parameters=names, method="vmap")),
    ]
    if args.with_loop:
        cases.append(("per-example loop", lambda: per_example_gradients(model, batch, parameters=names, method="loop")))
    cases += [] if args.target_only else [
        ("dp-sgd (clip all, share all)", lambda: compute_update(model, batch, defense=DPSGD(1.0, 1.0))),
        ("noise", lambda: compute_update(model, batch, defense=GaussianNoise(1e-3))),
        ("prune 30%", lambda: compute_update(model, batch, defense=Prune(0.3))),
        ("int8", lambda: compute_update(model, batch, defense=Quantize("int8"))),
        ("fedavg 2 steps", lambda: compute_update(model, batch, defense=FedAvg(local_steps=2, lr=0.01))),
    ]

    print(
        f"model={args.model} ({params / 1e6:.0f}M parameters)  B={batch.batch_size}  "
        f"T={batch.input_ids.shape[1]}  threads={torch.get_num_threads()}  repeats={args.repeats}  "
        f"torch={torch.__version__}"
    )
    print(f"{'method':32s} {'seconds':>9s} {'x fedsgd':>9s}")
    base = None
    for label, fn in cases:
        seconds = _time(fn, args.repeats)
        base = base or seconds
        print(f"{label:32s} {seconds:9.3f} {seconds / base:9.2f}", flush=True)
    print("target: per-example vmap <= 3.00 x fedsgd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
