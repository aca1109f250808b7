"""Command line: attack a file of sentences batch by batch and score the recovery.

Usage::

    python -m dager --model gpt2-small-random --input sentences.txt --batch-size 8 \\
        [--task classification|next-token] [--max-batches K] [--seed S] \\
        [--device cpu|cuda] --output result.json

For each consecutive batch of ``--batch-size`` lines, a simulated client computes the
update it would share (:func:`fedclient.compute_update`), DAGER reconstructs the batch
from the model and that update alone (:func:`dager.attack.run_dager`), and only then
:func:`dager.metrics.evaluate_text` compares the recovery with the lines.

Input rules (see :mod:`dager.textio`): blank lines are skipped with a note; a final
short batch is attacked as it is; lines the tokenizer cannot represent, or too long
for the model, stop the run before any attack and are reported by line number; a batch
far over the model's capacity (more than :data:`FAR_OVER_CAPACITY` times d distinct
token prefixes) is refused unless ``--allow-over-capacity``.

Defense sweep (attack success against defense strength)::

    python -m dager sweep --model gpt2-small-random --input sentences.txt --batch-size 4 \\
        --grid noise|prune|mask|precision|dp [--values V1,V2,...] [--variance] \\
        [--task ...] [--noise-tolerant] [--max-batches K] --csv out.csv [--plot out.html]

attacks the first ``--max-batches`` batches (default 1) once per grid point and writes
one CSV row per point (``label``, ``axis``, ``strength``, ``defense``, ``epsilon`` for
DP, ``rouge1``, ``rouge2``, ``exact_match``, ``utility_cosine``,
``utility_norm_ratio``, ``rank``, ``failed_batches``, ``seconds``), see
:func:`run_sweep_command`.

Exit codes: 0 success; 1 some batch failed, the run was interrupted (Ctrl-C or
SIGTERM: the JSON is still written, marked ``interrupted``; failed batches count as
unrecovered) or the JSON could not be written where asked (it is written to a fallback
file, named on stderr); 2 bad input or options (one line on stderr, nothing attacked);
130 (143 for SIGTERM) interrupted before the first batch.

Arguments, output paths and the input file are checked before torch or transformers
load, so a bad option is answered at once. Outputs are created with mode 0600: they
hold the private sentences.

Output JSON keys (a contract other tools read): ``model``, ``task``, ``batch_size``,
``rouge1``, ``rouge2``, ``rougeL``, ``exact_match``, ``token_accuracy``, ``seconds``
(attack only), ``client_seconds`` and ``batches``; each batch has ``references``,
``predictions``, ``exact``, ``rank``, ``total_tokens``, ``seconds``. ``predictions``
and ``exact`` are aligned with ``references``: the prediction matched to each
reference (``""`` if none) and whether it is an exact recovery. Extra keys are
documented in :func:`_batch_record` and :func:`_report`.

The sentences are printed only on request (``--show-text``) and written only to the
JSON the user asked for; logs carry counts and timings, never text.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# Torch-free imports only (issue 13): torch, transformers and the metrics load after the
# arguments have been checked (see _run / run_sweep_command).
import dager
from dager.config import DagerConfig
from dager.textio import Sentence, check_sentences, distinct_prefixes, read_sentences, split_batches
from fedclient.errors import LabInputError
from fedclient.threads import configure_cpu_threads
from labcli.common import (
    CliUsageError,
    LabParser,
    add_defense_argument,
    check_defense_specs,
    check_device,
    defense_record,
    write_json,
)
from labcli.outputs import check_output_path
from labcli.runtime import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    interrupt_exit_code,
    interrupt_word,
    interrupts_as_exceptions,
    pending_interrupt,
    positive_int,
    raise_if_interrupted,
)

if TYPE_CHECKING:
    from dager.metrics import PairScore

log = logging.getLogger("dager.cli")

FAR_OVER_CAPACITY = 1.5
"""A batch with more than this many times d distinct token prefixes is refused.

DAGER separates a batch's distinct prefixes in a span of dimension at most d (the model
width); exact recovery holds up to about d of them (measured: 2-layer GPT-2, 770
tokens). A batch moderately past d is attacked as a flagged best effort; one far past
it would only spend its search budget, so the CLI asks for a smaller batch instead.
"""

TASKS = ("classification", "next-token")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m dager`` / ``dager``."""
    p = LabParser(
        prog="dager",
        description=(
            "DAGER (Petrov et al., NeurIPS 2024): recover a file of sentences, batch by "
            "batch, from the gradients a federated client would share, and score the recovery."
        ),
    )
    p.add_argument("--model", required=True, help="embedded model name (e.g. gpt2-small-random), hub id or folder")
    p.add_argument("--input", required=True, type=Path, help="UTF-8 text file, one sentence per line")
    p.add_argument("--batch-size", required=True, type=positive_int, help="sentences per client batch")
    p.add_argument("--task", default="classification", choices=TASKS, help="client training task")
    p.add_argument("--max-batches", type=positive_int, default=None, help="attack at most K batches")
    p.add_argument("--seed", type=int, default=0, help="seed of the client's labels and defenses")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device")
    p.add_argument("--output", required=True, type=Path, help="where to write the result JSON")
    p.add_argument(
        "--allow-over-capacity",
        action="store_true",
        help=f"attack batches with more than {FAR_OVER_CAPACITY} x d distinct token prefixes (best effort)",
    )
    p.add_argument("--max-prefixes", type=positive_int, default=None, help="decoder search budget per position")
    p.add_argument("--max-combinations", type=positive_int, default=None, help="encoder search budget")
    p.add_argument(
        "--noise-tolerant",
        action="store_true",
        help="rank candidates by distance instead of fixed thresholds (for noisy, defended updates)",
    )
    add_defense_argument(p)
    p.add_argument("--show-text", action="store_true", help="print each sentence and its recovery in the summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, notes or summary table")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p


# ---------------------------------------------------------------------------
# The engine seam (tests replace it with a fake; the real one lives in dager.attack)


def _engine() -> tuple[Callable[..., object], Callable[..., list[str]]]:
    """``(run_dager, required_parameters)`` of :mod:`dager.attack`."""
    from dager.attack import required_parameters, run_dager

    return run_dager, required_parameters


# ---------------------------------------------------------------------------
# Running


@dataclass
class _BatchOutcome:
    index: int
    sentences: tuple[Sentence, ...]
    record: dict[str, object]
    pairs: tuple[PairScore, ...] = ()
    failed: bool = False
    seconds: float = 0.0
    client_seconds: float = 0.0
    hidden_size: int = 0
    warnings: list[str] = field(default_factory=list)


def _configure_logging(verbose: bool) -> None:
    """The only place that sets up logging (stderr); Hugging Face's is :func:`_quiet_hf`."""
    root = logging.getLogger()
    mine = [h for h in root.handlers if getattr(h, "_dager_cli", False)]
    if mine:  # main() called again in one process (tests): follow the current stderr
        mine[0].stream = sys.stderr  # type: ignore[attr-defined]
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._dager_cli = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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


def _fail(message: str) -> int:
    print(f"dager: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_outputs(args: argparse.Namespace) -> None:
    """Options that can be checked before anything heavy is loaded (torch-free)."""
    out: Path = args.output
    check_output_path("--output", out)
    if out.exists() and args.input.exists() and out.resolve() == args.input.resolve():
        raise CliUsageError("--output names the input file: give the result another name, such as result.json.")


def _build_config(args: argparse.Namespace) -> DagerConfig:
    changes: dict[str, object] = {"device": args.device}
    if args.max_prefixes is not None:
        changes["max_prefixes"] = args.max_prefixes
    if args.max_combinations is not None:
        changes["max_combinations"] = args.max_combinations
    if args.noise_tolerant:
        changes["noise_tolerant"] = True
    return DagerConfig(**changes)


def _line_span(sentences: Sequence[Sentence]) -> str:
    first, last = sentences[0].line, sentences[-1].line
    return f"{first}" if first == last else f"{first}-{last}"


def _check_capacity(args: argparse.Namespace, bundle: object, batches: list[tuple[Sentence, ...]]) -> list[int]:
    """Distinct token prefixes per batch; refuse batches far over capacity.

    Raises:
        CliUsageError: a batch exceeds ``FAR_OVER_CAPACITY * d`` and the user did not
            pass ``--allow-over-capacity``.
    """
    d = int(bundle.hidden_size)  # type: ignore[attr-defined]
    counts = [distinct_prefixes([bundle.tokenize(s.text) for s in batch]) for batch in batches]  # type: ignore[attr-defined]
    worst = max(range(len(batches)), key=lambda i: counts[i])
    if counts[worst] > FAR_OVER_CAPACITY * d and not args.allow_over_capacity:
        per_sentence = counts[worst] / len(batches[worst])
        suggest = max(1, int(d / per_sentence))
        raise CliUsageError(
            f"Batch {worst + 1} (lines {_line_span(batches[worst])}) holds {counts[worst]} distinct "
            f"token prefixes, far over what {bundle.name} (width d={d}) can separate exactly "  # type: ignore[attr-defined]
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
    result: object | None,
    scores: object | None,
    total_tokens: int,
    prefixes: int,
    error: str | None,
) -> dict[str, object]:
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
    record: dict[str, object] = {
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
        flags = list(result.exact)  # type: ignore[attr-defined]
        predictions = list(result.sentences)  # type: ignore[attr-defined]
        pairs = scores.pairs  # type: ignore[attr-defined]
        record.update(
            predictions=[p.prediction for p in pairs],
            exact=[p.exact for p in pairs],
            verified=[
                bool(flags[p.prediction_index]) if p.prediction_index is not None else False for p in pairs
            ],
            unmatched_predictions=[predictions[j] for j in scores.unmatched_predictions],  # type: ignore[attr-defined]
            num_predictions=len(predictions),
            rank=int(result.rank),  # type: ignore[attr-defined]
            hidden_size=int(result.hidden_size),  # type: ignore[attr-defined]
            over_capacity=bool(result.over_capacity),  # type: ignore[attr-defined]
            budget_exhausted=bool(result.budget_exhausted),  # type: ignore[attr-defined]
            rouge1=scores.rouge1,  # type: ignore[attr-defined]
            rouge2=scores.rouge2,  # type: ignore[attr-defined]
            rougeL=scores.rougeL,  # type: ignore[attr-defined]
            exact_match=scores.exact_match,  # type: ignore[attr-defined]
            token_accuracy=scores.token_accuracy,  # type: ignore[attr-defined]
        )
    return record


def _attack_batch(
    index: int,
    sentences: tuple[Sentence, ...],
    *,
    args: argparse.Namespace,
    bundle: object,
    config: DagerConfig,
    defense: object | None,
    prefixes: int,
) -> _BatchOutcome:
    """Client update, attack and scoring of one batch; a failure is recorded, not raised."""
    from dager.metrics import evaluate_text, normalizer_for
    from fedclient import compute_update

    run_dager, required_parameters = _engine()
    outcome = _BatchOutcome(index=index, sentences=sentences, record={}, hidden_size=int(bundle.hidden_size))  # type: ignore[attr-defined]
    refs = [s.text for s in sentences]
    total_tokens = 0
    try:
        batch = bundle.encode(refs, seed=args.seed)  # type: ignore[attr-defined]
        total_tokens = int(batch.attention_mask.sum())
        t0 = time.perf_counter()
        update = compute_update(
            bundle.model,  # type: ignore[attr-defined]
            batch,
            parameters=required_parameters(bundle),
            defense=defense,
            seed=args.seed,
        )
        outcome.client_seconds = time.perf_counter() - t0
        del batch  # the attacker gets the model and the update, nothing else
        t0 = time.perf_counter()
        result = run_dager(bundle, update, config=config)
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
    if result.over_capacity or prefixes > outcome.hidden_size:  # type: ignore[attr-defined]
        outcome.warnings.append("over_capacity")
    if result.budget_exhausted:  # type: ignore[attr-defined]
        outcome.warnings.append("budget_exhausted")
    log.info(
        "batch %d: %d/%d exact, rank %d, attack %.2f s, client %.2f s",
        index,
        scores.num_exact,
        len(refs),
        int(result.rank),  # type: ignore[attr-defined]
        outcome.seconds,
        outcome.client_seconds,
    )
    return outcome


def _report(
    args: argparse.Namespace,
    bundle: object,
    outcomes: list[_BatchOutcome],
    *,
    defenses: list[str],
    interrupted: bool,
    num_sentences_in_file: int,
) -> dict[str, object]:
    """The result JSON.

    Contract keys: see the module docstring. Scores are over all attacked sentences
    (failed batches count as unrecovered). Extra keys: ``num_sentences``,
    ``num_exact``, ``num_batches``, ``failed_batches`` (1-based indices),
    ``interrupted``, ``over_capacity``/``capacity_exceeded``/``budget_exhausted`` (any batch),
    ``hidden_size``, ``device``, ``seed``, ``max_batches``, ``defense`` (the
    ``--defense`` specs as given), ``defense_description`` (one sentence),
    ``epsilon`` (DP epsilon, or ``null``), ``sentences_in_file``.
    """
    from dager.metrics import evaluate_text, pooled_scores

    pairs: list[PairScore] = []
    for o in outcomes:
        if o.failed:
            refs = [s.text for s in o.sentences]
            pairs.extend(evaluate_text(refs, []).pairs)
        else:
            pairs.extend(o.pairs)

    return {
        "model": args.model,
        "task": args.task,
        "batch_size": args.batch_size,
        **pooled_scores(pairs),
        "seconds": sum(o.seconds for o in outcomes),
        "client_seconds": sum(o.client_seconds for o in outcomes),
        "batches": [o.record for o in outcomes],
        "num_sentences": len(pairs),
        "num_exact": sum(p.exact for p in pairs),
        "num_batches": len(outcomes),
        "failed_batches": [o.index for o in outcomes if o.failed],
        "interrupted": interrupted,
        "over_capacity": any(bool(o.record.get("over_capacity")) for o in outcomes),
        "capacity_exceeded": any(bool(o.record.get("capacity_exceeded")) for o in outcomes),
        "budget_exhausted": any(bool(o.record.get("budget_exhausted")) for o in outcomes),
        "hidden_size": int(bundle.hidden_size),  # type: ignore[attr-defined]
        "device": args.device,
        "seed": args.seed,
        "max_batches": args.max_batches,
        "defense": defenses,
        "sentences_in_file": num_sentences_in_file,
    }


def _print_summary(args: argparse.Namespace, report: dict[str, object], outcomes: list[_BatchOutcome]) -> None:
    """The summary table on stdout (sentences only with ``--show-text``)."""
    head = (
        f"DAGER on {report['model']} ({report['task']}), batch size {report['batch_size']}, "
        f"{report['num_batches']} batch(es), {report['num_sentences']} sentence(s)"
    )
    if report["defense"]:
        head += f", defense: {' + '.join(report['defense'])}"  # type: ignore[arg-type]
    print(head)
    cols = ("batch", "lines", "sent", "tokens", "rank", "exact", "ROUGE-1", "ROUGE-2", "attack s", "client s", "flags")
    rows: list[tuple[str, ...]] = []
    for o in outcomes:
        r = o.record
        n = len(o.sentences)
        if o.failed:
            rows.append((str(o.index), _line_span(o.sentences), str(n), str(r["total_tokens"]), "-", "failed",
                         "-", "-", "-", "-", "error"))
            continue
        rows.append((
            str(o.index),
            _line_span(o.sentences),
            str(n),
            str(r["total_tokens"]),
            str(r["rank"]),
            f"{sum(r['exact'])}/{n}",  # type: ignore[arg-type]
            f"{r['rouge1']:.3f}",
            f"{r['rouge2']:.3f}",
            f"{o.seconds:.2f}",
            f"{o.client_seconds:.2f}",
            ",".join(o.warnings),
        ))
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    print(
        f"total: {report['num_exact']}/{report['num_sentences']} exact ({100 * report['exact_match']:.1f}%), "  # type: ignore[operator]
        f"ROUGE-1 {report['rouge1']:.3f}, ROUGE-2 {report['rouge2']:.3f}, ROUGE-L {report['rougeL']:.3f}, "
        f"token accuracy {report['token_accuracy']:.3f}; attack {report['seconds']:.2f} s, "
        f"client {report['client_seconds']:.2f} s"
    )
    if args.show_text:
        for o in outcomes:
            for s, pred, ok in zip(o.sentences, o.record["predictions"], o.record["exact"]):  # type: ignore[call-overload]
                mark = "=" if ok else "x"
                print(f"  line {s.line} {mark} {s.text}")
                print(f"  {'':>{len(str(s.line)) + 5}}-> {pred}")


def _run(args: argparse.Namespace) -> int:
    # Cheap, torch-free checks first: a bad option or path is answered at once.
    _check_outputs(args)
    check_defense_specs(args.defense)
    config = _build_config(args)
    file = read_sentences(args.input)
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

    # Heavy from here on (torch, transformers).
    defense, defense_keys = defense_record(args.defense)
    check_device(args.device)
    _quiet_hf(args.verbose)
    bundle = dager.load_model(args.model, args.task, device=args.device)
    check_sentences(bundle, [s for b in batches for s in b])
    prefixes = _check_capacity(args, bundle, batches)
    _engine()  # fail before the first batch when the engine cannot be imported

    from tqdm.auto import tqdm

    outcomes: list[_BatchOutcome] = []
    interrupted = False
    bar = tqdm(total=len(batches), desc="DAGER", unit="batch", file=sys.stderr, disable=args.quiet, leave=False)
    exact = total = 0
    try:
        for i, batch in enumerate(batches):
            o = _attack_batch(
                i + 1, batch, args=args, bundle=bundle, config=config, defense=defense, prefixes=prefixes[i]
            )
            outcomes.append(o)
            if not o.failed:
                exact += sum(o.record["exact"])  # type: ignore[arg-type]
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
    written = write_json(args.output, report, prog="dager")
    if not args.quiet:
        _print_summary(args, report, outcomes)
        if written:
            print(f"wrote {args.output}")
    return EXIT_FAILED if interrupted or report["failed_batches"] or not written else EXIT_OK


# ---------------------------------------------------------------------------
# Defense sweep


def build_sweep_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m dager sweep``."""
    from labcli.sweep import add_sweep_arguments

    p = LabParser(
        prog="dager sweep",
        description="DAGER under a grid of client-side defenses: one attack per defense level, "
        "scored (ROUGE-1/2, exact match) with the update's utility cost; writes a CSV and a plot.",
    )
    p.add_argument("--model", required=True, help="embedded model name (e.g. gpt2-small-random), hub id or folder")
    p.add_argument("--input", required=True, type=Path, help="UTF-8 text file, one sentence per line")
    p.add_argument("--batch-size", required=True, type=positive_int, help="sentences per client batch")
    p.add_argument("--task", default="classification", choices=TASKS, help="client training task")
    p.add_argument("--max-batches", type=positive_int, default=1, help="batches attacked per grid point (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the client's labels and defenses")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch device")
    p.add_argument("--noise-tolerant", action="store_true", help="DAGER's noise-tolerant mode (rank by distance)")
    p.add_argument("--max-prefixes", type=positive_int, default=None, help="decoder search budget per position")
    p.add_argument("--max-combinations", type=positive_int, default=None, help="encoder search budget")
    p.add_argument(
        "--allow-over-capacity",
        action="store_true",
        help=f"attack batches with more than {FAR_OVER_CAPACITY} x d distinct token prefixes (best effort)",
    )
    add_sweep_arguments(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no notes")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p


def run_sweep_command(args: argparse.Namespace) -> int:
    """``python -m dager sweep``: attack the same batches once per grid point.

    Each point: the client computes the defended update of each batch, DAGER
    reconstructs from the model and that update alone, and the evaluation scores it.
    Row metrics: ``rouge1``, ``rouge2``, ``exact_match`` (over all attacked sentences;
    a batch whose attack raised counts as unrecovered), ``utility_cosine`` and
    ``utility_norm_ratio`` (mean over batches, :func:`fedclient.defenses.utility_cost`),
    ``rank`` (of the first batch's layer-1 update), ``failed_batches``.

    Returns:
        0 when every attack ran (whatever it recovered), 1 when some batch raised.
    """
    from labcli.sweep import OutputsNotWritten, check_grid_name, check_sweep_outputs, run_cli_sweep, sweep_points

    # Cheap, torch-free checks first.
    check_sweep_outputs(args)
    check_grid_name(args)
    config = _build_config(args)
    file = read_sentences(args.input)
    batches = split_batches(file.sentences, args.batch_size, args.max_batches)

    from dager.metrics import evaluate_text, normalizer_for  # heavy from here on
    from fedclient import compute_update
    from fedclient.defenses import utility_cost

    check_device(args.device)
    points = sweep_points(args)
    _quiet_hf(args.verbose)
    bundle = dager.load_model(args.model, args.task, device=args.device)
    check_sentences(bundle, [s for b in batches for s in b])
    _check_capacity(args, bundle, batches)
    run_dager, required_parameters = _engine()
    parameters = required_parameters(bundle)
    encoded = [([s.text for s in b], bundle.encode([s.text for s in b], seed=args.seed)) for b in batches]  # type: ignore[attr-defined]
    any_failed = False

    def attack(defense: object | None) -> dict[str, float]:
        nonlocal any_failed
        pairs: list[PairScore] = []
        utility: list[dict[str, float]] = []
        ranks: list[int] = []
        errors: list[str] = []
        failed = 0
        for refs, batch in encoded:
            update = compute_update(
                bundle.model, batch, parameters=parameters, defense=defense, seed=args.seed  # type: ignore[attr-defined]
            )
            utility.append(utility_cost(bundle.model, batch, update))  # type: ignore[attr-defined]
            try:
                result = run_dager(bundle, update, config=config)  # the attacker sees no batch
            except Exception as exc:  # noqa: BLE001 - one failing point must not end the sweep
                raise_if_interrupted()
                if args.debug:
                    raise
                failed += 1
                errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                log.warning("sweep: attack failed (%s)", errors[-1])
                pairs.extend(evaluate_text(refs, []).pairs)
                continue
            ranks.append(int(result.rank))  # type: ignore[attr-defined]
            scores = evaluate_text(refs, list(result.sentences), normalize=normalizer_for(bundle))  # type: ignore[attr-defined]
            pairs.extend(scores.pairs)
        any_failed = any_failed or failed > 0
        n = max(1, len(pairs))
        return {
            "rouge1": sum(p.rouge1 for p in pairs) / n,
            "rouge2": sum(p.rouge2 for p in pairs) / n,
            "exact_match": sum(float(p.exact) for p in pairs) / n,
            "utility_cosine": sum(u["utility_cosine"] for u in utility) / len(utility),
            "utility_norm_ratio": sum(u["utility_norm_ratio"] for u in utility) / len(utility),
            "rank": ranks[0] if ranks else -1,
            "failed_batches": failed,
            "error": "; ".join(errors),
        }

    mode = "noise-tolerant" if args.noise_tolerant else "exact thresholds"
    title = (
        f"DAGER on {args.model} ({args.task}, {mode}), batch size {args.batch_size}, "
        f"{len(batches)} batch(es), {len(points)} point(s) of --grid {args.grid}"
    )
    try:
        run_cli_sweep(
            points,
            attack,
            metrics=("rouge1", "rouge2", "exact_match"),
            csv_path=args.csv,
            plot_path=args.plot,
            title=title,
        )
    except OutputsNotWritten as exc:
        print(f"dager: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if any_failed else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dager`` and the ``dager`` console script.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 1 a batch failed or the run was interrupted, 2 bad
        input or options.
    """
    configure_cpu_threads()  # the console script's first act: before anything imports torch
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep = bool(argv) and argv[0] == "sweep"
    parser = build_sweep_parser() if sweep else build_parser()
    try:
        args = parser.parse_args(argv[1:] if sweep else argv)
    except SystemExit as exc:  # --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except LabInputError as exc:  # a usage error (LabParser): one line
        return _fail(str(exc))
    _configure_logging(args.verbose)
    try:
        with interrupts_as_exceptions():
            return run_sweep_command(args) if sweep else _run(args)
    except LabInputError as exc:  # every user-facing input error of the lab
        return _fail(str(exc))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM before the first batch (e.g. loading torch)
        print(f"dager: {interrupt_word(exc)}.", file=sys.stderr)
        return interrupt_exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        interrupted = pending_interrupt()
        if interrupted is not None:  # a library turned the interrupt into another error
            print(f"dager: {interrupt_word(interrupted)}.", file=sys.stderr)
            return interrupt_exit_code(interrupted)
        if args.debug:
            raise
        first = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"dager: internal error ({first}); rerun with --debug for the traceback.", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
