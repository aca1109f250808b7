"""``python -m dager sweep``: attack the same batches once per grid point of a defense.

Split from :mod:`dager.cli` (issue 12), which parses the arguments and keeps the engine seam.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import TYPE_CHECKING

# Torch-free imports only (issue 13).
import dager
from labcli.training import client_training, prepare_client
from dager.cli_batches import Engine, _build_config, _check_capacity, _quiet_hf
from dager.textio import check_sentences, read_sentences, split_batches
from labcli.common import check_device
from labcli.runtime import EXIT_FAILED, EXIT_OK, raise_if_interrupted

if TYPE_CHECKING:
    from dager.metrics import PairScore
    from fedclient.client import Defense

log = logging.getLogger("dager.cli")


def _row(
    pairs: list[PairScore], utility: list[dict[str, float]], ranks: list[int], errors: list[str]
) -> dict[str, float | int | str]:
    """One grid point's metrics: scores over every attacked sentence, utility over batches."""
    n = max(1, len(pairs))
    return {
        "rouge1": sum(p.rouge1 for p in pairs) / n,
        "rouge2": sum(p.rouge2 for p in pairs) / n,
        "exact_match": sum(float(p.exact) for p in pairs) / n,
        "utility_cosine": sum(u["utility_cosine"] for u in utility) / len(utility),
        "utility_norm_ratio": sum(u["utility_norm_ratio"] for u in utility) / len(utility),
        "rank": ranks[0] if ranks else -1,
        "failed_batches": len(errors),
        "error": "; ".join(errors),
    }


def _utility(model: object, batch: object, update: object, *, lora: bool) -> dict[str, float]:
    """How much of its direction the defended update kept; NaN for LoRA (adapters have no
    full-gradient counterpart to compare with)."""
    if lora:
        return {"utility_cosine": float("nan"), "utility_norm_ratio": float("nan")}
    from fedclient.defenses import utility_cost

    return utility_cost(model, batch, update)  # type: ignore[arg-type]


def _title(args: argparse.Namespace, num_batches: int, num_points: int) -> str:
    """The sweep plot's title."""
    mode = "noise-tolerant" if args.noise_tolerant else "exact thresholds"
    return (
        f"DAGER on {args.model} ({args.task}, {mode}), batch size {args.batch_size}, "
        f"{num_batches} batch(es), {num_points} point(s) of --grid {args.grid}"
    )


def run_sweep(args: argparse.Namespace, *, engine: Engine) -> int:
    """Attack the same batches once per grid point (see :func:`dager.cli.run_sweep_command`).

    Args:
        args: the parsed options of ``python -m dager sweep``.
        engine: the engine seam (:func:`dager.cli._engine`).

    Returns:
        0 when every attack ran (whatever it recovered), 1 when some batch raised.
    """
    from labcli.sweep import OutputsNotWritten, check_grid_name, check_sweep_outputs, run_cli_sweep, sweep_points

    # Cheap, torch-free checks first.
    check_sweep_outputs(args)
    check_grid_name(args)
    config = _build_config(args)
    training = client_training(args)
    file = read_sentences(args.input)
    batches = split_batches(file.sentences, args.batch_size, args.max_batches)

    from dager.metrics import evaluate_text, normalizer_for  # heavy from here on
    from fedclient import compute_update

    check_device(args.device)
    points = sweep_points(args)
    _quiet_hf(args.verbose)
    bundle = dager.load_model(args.model, args.task, device=args.device)
    check_sentences(bundle, [s for b in batches for s in b])
    _check_capacity(args, bundle, batches)
    merged = prepare_client(training, bundle.model, device=args.device)
    server = dataclasses.replace(bundle, model=merged) if merged is not None else bundle  # LoRA: adapters merged
    run_dager, required_parameters = engine()
    parameters = required_parameters(bundle, dropout=training.dropout)
    encoded = [([s.text for s in b], bundle.encode([s.text for s in b], seed=args.seed)) for b in batches]
    any_failed = False

    def attack(defense: Defense | None) -> dict[str, float | int | str]:
        nonlocal any_failed
        pairs: list[PairScore] = []
        utility: list[dict[str, float]] = []
        ranks: list[int] = []
        errors: list[str] = []
        for refs, batch in encoded:
            update = compute_update(
                bundle.model, batch, parameters=parameters, defense=defense, seed=args.seed, training=training
            )
            utility.append(_utility(bundle.model, batch, update, lora=training.lora is not None))
            try:
                result = run_dager(server, update, config=config)  # the attacker sees no batch
            except Exception as exc:  # noqa: BLE001 - one failing point must not end the sweep
                raise_if_interrupted()
                if args.debug:
                    raise
                errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                log.warning("sweep: attack failed (%s)", errors[-1])
                pairs.extend(evaluate_text(refs, []).pairs)
                continue
            ranks.append(int(result.rank))
            scores = evaluate_text(refs, list(result.sentences), normalize=normalizer_for(bundle))
            pairs.extend(scores.pairs)
        any_failed = any_failed or bool(errors)
        return _row(pairs, utility, ranks, errors)

    try:
        run_cli_sweep(
            points,
            attack,
            metrics=("rouge1", "rouge2", "exact_match"),
            csv_path=args.csv,
            plot_path=args.plot,
            title=_title(args, len(batches), len(points)),
        )
    except OutputsNotWritten as exc:
        print(f"dager: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if any_failed else EXIT_OK
