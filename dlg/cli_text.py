"""``python -m dlg text``: DLG's text baseline on the update DAGER sees, batch by batch.

Split from :mod:`dlg.cli` (which parses the arguments and dispatches here). The run has
three steps: torch-free checks of the arguments and the input, the attack of each batch
(finished batches survive Ctrl-C and SIGTERM), and the JSON report with DAGER's CLI's keys.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dlg.cli import _check_output, _configure
from labcli.common import CliUsageError, check_defense_specs, check_device, defense_record, write_json
from labcli.runtime import EXIT_FAILED, interrupt_word
from labcli.training import client_keys, dlg_training

if TYPE_CHECKING:
    from dager.metrics import PairScore, TextScores
    from dager.textio import Sentence
    from dlg.events import TextDlgResult

log = logging.getLogger("dlg.cli")  # the CLI's log, as before the split


@dataclass
class _Tally:
    """What the finished batches add up to (kept when the run is interrupted)."""

    records: list[dict[str, object]] = field(default_factory=list)
    pairs: list[PairScore] = field(default_factory=list)
    seconds: float = 0.0
    client_seconds: float = 0.0
    interrupted: bool = False


def _text_record(
    index: int, chunk: Sequence[Sentence], result: TextDlgResult, scores: TextScores, client_seconds: float
) -> dict[str, object]:
    """One entry of ``batches`` in the text baseline's JSON (DAGER's CLI's keys, plus the loss and seq_len)."""
    return {
        "index": index,
        "lines": [s.line for s in chunk],
        "references": [s.text for s in chunk],
        "predictions": [p.prediction for p in scores.pairs],
        "exact": [p.exact for p in scores.pairs],
        "seconds": result.seconds,
        "client_seconds": client_seconds,
        "rouge1": scores.rouge1,
        "rouge2": scores.rouge2,
        "rougeL": scores.rougeL,
        "exact_match": scores.exact_match,
        "token_accuracy": scores.token_accuracy,
        "final_loss": result.losses[-1] if result.losses else None,
        "seq_len": getattr(result, "seq_len", None),
        "seq_len_source": getattr(result, "seq_len_source", None),
    }


def _checked_batches(args: argparse.Namespace) -> list[tuple[Sentence, ...]]:
    """Cheap, torch-free checks of the arguments, then the input's batches."""
    from dager.textio import read_sentences, split_batches

    _check_output(args.output)
    check_defense_specs(args.defense)
    if args.input.exists() and args.output.exists() and args.input.resolve() == args.output.resolve():
        raise CliUsageError("--output names the input file: give the result another name, such as result.json.")
    sentences = read_sentences(args.input).sentences
    return split_batches(sentences, args.batch_size, args.max_batches)


def _attack_batches(args: argparse.Namespace, batches: Sequence[Sequence[Sentence]], bundle, defense,  # noqa: ANN001
                    training) -> _Tally:  # noqa: ANN001
    """Client update, baseline and scores of each batch; Ctrl-C or SIGTERM keeps the finished ones."""
    import fedclient
    from dager.metrics import evaluate_text, normalizer_for
    from dlg.text import TextDlgConfig, run_dlg_text

    # The attacker knows the batch size and nothing else about the batch: the sequence
    # length is inferred from the update or guessed (TextDlgConfig.seq_len=None).
    config = TextDlgConfig(iterations=args.iterations, seed=args.seed, device=args.device)
    tally = _Tally()
    try:
        for index, chunk in enumerate(batches, start=1):
            refs = [s.text for s in chunk]
            batch = bundle.encode(refs, seed=args.seed)
            t0 = time.perf_counter()
            update = fedclient.compute_update(bundle.model, batch, defense=defense, seed=args.seed, training=training)
            client_seconds = time.perf_counter() - t0
            del batch
            result = run_dlg_text(bundle, update, config=config)
            # Judged on what the model can represent, as DAGER's CLI does.
            scores = evaluate_text(refs, list(result.sentences), normalize=normalizer_for(bundle))
            tally.pairs.extend(scores.pairs)
            tally.seconds += result.seconds
            tally.client_seconds += client_seconds
            tally.records.append(_text_record(index, chunk, result, scores, client_seconds))
            log.info("batch %d: ROUGE-1 %.3f in %.1f s", index, scores.rouge1, result.seconds)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: keep the finished batches
        tally.interrupted = True
        print(
            f"dlg: {interrupt_word(exc)} after {len(tally.records)} of {len(batches)} batch(es); "
            "writing the finished ones.",
            file=sys.stderr,
        )
    return tally


def run_text(args: argparse.Namespace) -> int:
    """``python -m dlg text``: the text baseline, batch by batch.

    Returns:
        0 when every batch ran and the JSON was written where asked; 1 when the run was
        interrupted (the finished batches are written, ``"interrupted": true``) or the
        JSON went to a fallback file.
    """
    from dager.textio import check_sentences

    batches = _checked_batches(args)
    _configure(args.verbose, args.device)  # torch from here on

    import dager
    from dager.metrics import pooled_scores

    check_device(args.device)
    defense, defense_keys = defense_record(args.defense)
    bundle = dager.load_model(args.model, args.task, device=args.device)
    training = dlg_training(args, bundle.model)
    # The same rule as DAGER's CLI: text the tokenizer cannot represent is refused by line.
    check_sentences(bundle, [s for b in batches for s in b])
    tally = _attack_batches(args, batches, bundle, defense, training)
    report: dict[str, object] = {
        "method": "dlg-text",
        "model": args.model,
        "task": args.task,
        "batch_size": args.batch_size,
        **pooled_scores(tally.pairs),
        "seconds": tally.seconds,
        "client_seconds": tally.client_seconds,
        "batches": tally.records,
        "num_sentences": len(tally.pairs),
        "num_batches": len(tally.records),
        "interrupted": tally.interrupted,
        "iterations": args.iterations,
        "seed": args.seed,
        "device": args.device,
        **defense_keys,
        **client_keys(training),
    }
    ok = write_json(args.output, report, prog="dlg")
    print(
        f"DLG-text on {args.model} ({args.task}), batch size {args.batch_size}: ROUGE-1 {report['rouge1']:.3f}, "
        f"ROUGE-2 {report['rouge2']:.3f}, exact {report['exact_match']:.0%} in {tally.seconds:.1f} s"
        + (f" -> {args.output}" if ok else "")
    )
    return EXIT_FAILED if tally.interrupted or not ok else 0
