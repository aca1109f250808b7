"""The file run of ``python -m dager``: batch by batch, with a record per batch, the report and the summary.

Split from :mod:`dager.cli` (issue 12), which parses the arguments and keeps the engine
seam; the sweep lives in :mod:`dager.cli_sweep`. The JSON keys are the contract described
in :mod:`dager.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# Torch-free imports only (issue 13): torch, transformers and the metrics load after the
# arguments have been checked.
import dager
from dager.config import DagerConfig
from dager.textio import Sentence, SentenceFile, check_sentences, distinct_prefixes, read_sentences, split_batches
from fedclient.errors import LabInputError
from labcli.common import CliUsageError, check_defense_specs, check_device, defense_record, write_json
from labcli.outputs import check_output_path
from labcli.runtime import EXIT_FAILED, EXIT_OK, interrupt_word, raise_if_interrupted
from labcli.training import check_minibatch, client_keys, client_training, prepare_client
from dager.cli_report import Json, _line_span, _print_summary, _report

if TYPE_CHECKING:
    from dager.events import DagerResult
    from dager.metrics import PairScore, TextScores
    from dager.zoo import ModelBundle
    from fedclient.client import Defense
    from fedclient.training import ClientTraining

log = logging.getLogger("dager.cli")

Engine = Callable[[], tuple[Callable[..., "DagerResult"], Callable[["ModelBundle"], list[str]]]]
"""The engine seam: ``() -> (run_dager, required_parameters)`` (see :func:`dager.cli._engine`)."""

FAR_OVER_CAPACITY = 1.5
"""A batch with more than this many times d distinct token prefixes is refused.

DAGER separates a batch's distinct prefixes in a span of dimension at most d (the model
width); exact recovery holds up to about d of them (measured: 2-layer GPT-2, 770
tokens). A batch moderately past d is attacked as a flagged best effort; one far past
it would only spend its search budget, so the CLI asks for a smaller batch instead.
"""


@dataclass
class _BatchOutcome:
    index: int
    sentences: tuple[Sentence, ...]
    record: Json
    pairs: tuple[PairScore, ...] = ()
    failed: bool = False
    seconds: float = 0.0
    client_seconds: float = 0.0
    hidden_size: int = 0
    warnings: list[str] = field(default_factory=list)


def _quiet_hf(verbose: bool) -> None:
    """Quiet Hugging Face's logging; imports transformers, so only after the checks."""
    try:
        from transformers.utils import logging as hf_logging

        # Load reports (newly initialised task heads) and weight-loading bars are noise here.
        if verbose:
            hf_logging.set_verbosity_warning()
        else:
            hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # transformers is a dependency; stay usable without it anyway
        pass


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"note: {message}", file=sys.stderr)


def _check_outputs(args: argparse.Namespace) -> None:
    """Options that can be checked before anything heavy is loaded (torch-free)."""
    out: Path = args.output
    check_output_path("--output", out)
    if out.exists() and args.input.exists() and out.resolve() == args.input.resolve():
        raise CliUsageError("--output names the input file: give the result another name, such as result.json.")


def _build_config(args: argparse.Namespace) -> DagerConfig:
    """The attack's config from the options (DAGER's defaults where none is given)."""
    config = DagerConfig(device=args.device, noise_tolerant=bool(args.noise_tolerant))
    if args.max_prefixes is not None:
        config = dataclasses.replace(config, max_prefixes=args.max_prefixes)
    if args.max_combinations is not None:
        config = dataclasses.replace(config, max_combinations=args.max_combinations)
    return config


def _check_capacity(args: argparse.Namespace, bundle: ModelBundle, batches: list[tuple[Sentence, ...]]) -> list[int]:
    """Distinct token prefixes per batch; refuse batches far over capacity.

    Raises:
        CliUsageError: a batch exceeds ``FAR_OVER_CAPACITY * d`` and the user did not
            pass ``--allow-over-capacity``.
    """
    d = bundle.hidden_size
    counts = [distinct_prefixes([bundle.tokenize(s.text) for s in batch]) for batch in batches]
    worst = max(range(len(batches)), key=lambda i: counts[i])
    if counts[worst] > FAR_OVER_CAPACITY * d and not args.allow_over_capacity:
        per_sentence = counts[worst] / len(batches[worst])
        suggest = max(1, int(d / per_sentence))
        raise CliUsageError(
            f"Batch {worst + 1} (lines {_line_span(batches[worst])}) holds {counts[worst]} distinct "
            f"token prefixes, far over what {bundle.name} (width d={d}) can separate exactly "
            f"(about {d}): use --batch-size {suggest} or less, or --allow-over-capacity for a best effort."
        )
    over = [i + 1 for i, c in enumerate(counts) if c > d]
    if over:
        _note(
            args,
            f"{len(over)} batch(es) exceed the model's capacity (about {d} distinct token prefixes): "
            "they are attacked as a best effort and flagged over_capacity.",
        )
    return counts


def _batch_record(
    outcome: _BatchOutcome,
    *,
    result: DagerResult | None,
    scores: TextScores | None,
    total_tokens: int,
    prefixes: int,
    error: str | None,
) -> Json:
    """One entry of ``batches`` in the JSON.

    Contract keys: ``references``, ``predictions`` (aligned with references),
    ``exact`` (aligned booleans), ``rank``, ``total_tokens`` (real tokens in the padded
    batch, special tokens included), ``seconds`` (attack). Extra keys: ``index``
    (1-based), ``lines`` (file line numbers), ``client_seconds``, ``verified`` (the
    attacker's own exactness flag for each aligned prediction: it cannot see the
    references), ``unmatched_predictions`` (recovered texts matched to no reference),
    ``num_predictions``, ``hidden_size``, ``distinct_prefixes`` (of the true batch,
    known to the evaluation only), ``capacity_exceeded`` (``distinct_prefixes`` > d:
    exact recovery is not guaranteed), ``over_capacity`` (the attacker's own verdict,
    from the rank), ``budget_exhausted``, per-batch ``rouge1``/``rouge2``/``rougeL``/
    ``exact_match``/``token_accuracy``, and ``error`` (``null`` or why it failed).
    """
    refs = [s.text for s in outcome.sentences]
    record: Json = {
        "index": outcome.index,
        "lines": [s.line for s in outcome.sentences],
        "references": refs,
        "predictions": [""] * len(refs),
        "exact": [False] * len(refs),
        "rank": None,
        "total_tokens": total_tokens,
        "seconds": outcome.seconds,
        "client_seconds": outcome.client_seconds,
        "distinct_prefixes": prefixes,
        "capacity_exceeded": prefixes > outcome.hidden_size,
        "error": error,
    }
    if result is not None and scores is not None:
        flags = list(result.exact)
        predictions = list(result.sentences)
        pairs = scores.pairs
        record.update(
            predictions=[p.prediction for p in pairs],
            exact=[p.exact for p in pairs],
            verified=[
                bool(flags[p.prediction_index]) if p.prediction_index is not None else False for p in pairs
            ],
            unmatched_predictions=[predictions[j] for j in scores.unmatched_predictions],
            num_predictions=len(predictions),
            rank=int(result.rank),
            hidden_size=int(result.hidden_size),
            over_capacity=bool(result.over_capacity),
            budget_exhausted=bool(result.budget_exhausted),
            rouge1=scores.rouge1,
            rouge2=scores.rouge2,
            rougeL=scores.rougeL,
            exact_match=scores.exact_match,
            token_accuracy=scores.token_accuracy,
        )
    return record


def _attack_batch(
    index: int,
    sentences: tuple[Sentence, ...],
    *,
    args: argparse.Namespace,
    bundle: ModelBundle,
    config: DagerConfig,
    defense: Defense | None,
    prefixes: int,
    engine: Engine,
    training: ClientTraining | None = None,
    server: ModelBundle | None = None,
) -> _BatchOutcome:
    """Client update, attack and scoring of one batch; a failure is recorded, not raised."""
    from dager.metrics import evaluate_text, normalizer_for
    from fedclient import compute_update

    run_dager, required_parameters = engine()
    outcome = _BatchOutcome(index=index, sentences=sentences, record={}, hidden_size=bundle.hidden_size)
    refs = [s.text for s in sentences]
    total_tokens = 0
    try:
        batch = bundle.encode(refs, seed=args.seed)
        total_tokens = int(batch.attention_mask.sum())
        t0 = time.perf_counter()
        update = compute_update(
            bundle.model,
            batch,
            parameters=required_parameters(bundle, dropout=bool(training and training.dropout)),
            defense=defense,
            seed=args.seed,
            training=training,
        )
        outcome.client_seconds = time.perf_counter() - t0
        del batch  # the attacker gets the model and the update, nothing else
        t0 = time.perf_counter()
        result = run_dager(server or bundle, update, config=config)  # LoRA: the adapters merged
        outcome.seconds = time.perf_counter() - t0
    except LabInputError as exc:
        outcome.failed = True
        outcome.record = _batch_record(
            outcome, result=None, scores=None, total_tokens=total_tokens, prefixes=prefixes, error=str(exc)
        )
        print(f"dager: error: batch {index} (lines {_line_span(sentences)}): {exc}", file=sys.stderr)
        return outcome
    except Exception as exc:  # noqa: BLE001 - one failing batch must not end the run
        raise_if_interrupted()  # a library may have turned Ctrl-C/SIGTERM into another error
        if args.debug:
            raise
        outcome.failed = True
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        outcome.record = _batch_record(
            outcome, result=None, scores=None, total_tokens=total_tokens, prefixes=prefixes, error=message
        )
        print(
            f"dager: error: batch {index} (lines {_line_span(sentences)}) failed ({message}); "
            "continuing with the next batch (--debug shows the traceback).",
            file=sys.stderr,
        )
        return outcome
    scores = evaluate_text(refs, list(result.sentences), normalize=normalizer_for(bundle))
    outcome.pairs = scores.pairs
    outcome.record = _batch_record(
        outcome, result=result, scores=scores, total_tokens=total_tokens, prefixes=prefixes, error=None
    )
    if result.over_capacity or prefixes > outcome.hidden_size:
        outcome.warnings.append("over_capacity")
    if result.budget_exhausted:
        outcome.warnings.append("budget_exhausted")
    log.info(
        "batch %d: %d/%d exact, rank %d, attack %.2f s, client %.2f s",
        index,
        scores.num_exact,
        len(refs),
        int(result.rank),
        outcome.seconds,
        outcome.client_seconds,
    )
    return outcome


def _noted_batches(args: argparse.Namespace, file: SentenceFile) -> list[tuple[Sentence, ...]]:
    """The file's batches, with a note for skipped blank lines, unattacked sentences and a short last batch."""
    if file.blank_lines:
        shown = ", ".join(str(n) for n in file.blank_lines[:10])
        more = "..." if len(file.blank_lines) > 10 else ""
        _note(args, f"skipped {len(file.blank_lines)} blank line(s) ({shown}{more}).")
    batches = split_batches(file.sentences, args.batch_size, args.max_batches)
    attacked = sum(len(b) for b in batches)
    if attacked < len(file.sentences):
        _note(
            args,
            f"the file has {len(file.sentences)} sentences; attacking the first {attacked} "
            f"({len(batches)} batch(es) of {args.batch_size}, --max-batches {args.max_batches}).",
        )
    if len(batches[-1]) < args.batch_size:
        _note(args, f"the last batch holds {len(batches[-1])} sentence(s), fewer than --batch-size; attacked as is.")
    return batches


def run_file(args: argparse.Namespace, *, engine: Engine) -> int:
    """Attack the file batch by batch, write the JSON and print the summary.

    Args:
        args: the parsed options of ``python -m dager``.
        engine: the engine seam (:func:`dager.cli._engine`).

    Returns:
        The exit code: 0, or 1 when a batch failed, the run was interrupted or the JSON
        went to a fallback file.
    """
    # Cheap, torch-free checks first: a bad option or path is answered at once.
    _check_outputs(args)
    check_defense_specs(args.defense)
    training = client_training(args)
    config = _build_config(args)
    file = read_sentences(args.input)
    batches = _noted_batches(args, file)

    # Heavy from here on (torch, transformers).
    defense, defense_keys = defense_record(args.defense)
    check_minibatch(defense, [len(b) for b in batches])
    check_device(args.device)
    _quiet_hf(args.verbose)
    bundle = dager.load_model(args.model, args.task, device=args.device)
    check_sentences(bundle, [s for b in batches for s in b])
    prefixes = _check_capacity(args, bundle, batches)
    merged = prepare_client(training, bundle.model, device=args.device)
    server = dataclasses.replace(bundle, model=merged) if merged is not None else None
    engine()  # fail before the first batch when the engine cannot be imported

    from tqdm.auto import tqdm

    outcomes: list[_BatchOutcome] = []
    interrupted = False
    bar = tqdm(total=len(batches), desc="DAGER", unit="batch", file=sys.stderr, disable=args.quiet, leave=False)
    exact = total = 0
    try:
        for i, batch in enumerate(batches):
            o = _attack_batch(
                i + 1, batch, args=args, bundle=bundle, config=config, defense=defense, prefixes=prefixes[i],
                engine=engine, training=training, server=server,
            )
            outcomes.append(o)
            if not o.failed:
                exact += sum(o.record["exact"])
            total += len(batch)
            bar.set_postfix_str(f"exact {exact}/{total}")
            bar.update(1)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (labcli.runtime.Terminated)
        interrupted = True
        print(
            f"dager: {interrupt_word(exc)} after {len(outcomes)} of {len(batches)} batch(es); "
            "writing what was recovered.",
            file=sys.stderr,
        )
    finally:
        bar.close()
    report = _report(
        args, bundle, outcomes, defenses=list(args.defense), interrupted=interrupted,
        num_sentences_in_file=len(file.sentences),
    )
    report.update(defense_keys)  # the specs as given, their description and epsilon
    report.update(client_keys(training))  # the client's training setup (issue 11)
    written = write_json(args.output, report, prog="dager")
    if not args.quiet:
        _print_summary(args, report, outcomes)
        if written:
            print(f"wrote {args.output}")
    return EXIT_FAILED if interrupted or report["failed_batches"] or not written else EXIT_OK
