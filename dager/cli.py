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
documented in :func:`dager.cli_batches._batch_record` and :func:`dager.cli_report._report`.

The sentences are printed only on request (``--show-text``) and written only to the
JSON the user asked for; logs carry counts and timings, never text.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# Torch-free imports only (issue 13): torch, transformers and the metrics load after the
# arguments have been checked (see dager.cli_batches / dager.cli_sweep).
from dager.cli_batches import FAR_OVER_CAPACITY, run_file
from dager.cli_sweep import run_sweep
from fedclient.threads import configure_cpu_threads
from labcli.common import CliUsageError, LabParser, add_defense_argument, run_guarded  # noqa: F401 - CliUsageError: old name
from labcli.runtime import EXIT_FAILED, EXIT_OK, EXIT_USAGE, positive_int  # noqa: F401 - the exit codes stay importable from here
from labcli.training import add_client_arguments

if TYPE_CHECKING:
    from dager.events import DagerResult
    from dager.zoo import ModelBundle

log = logging.getLogger("dager.cli")

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
    add_client_arguments(p)  # --client, --precision, --dropout (issue 11)
    p.add_argument("--show-text", action="store_true", help="print each sentence and its recovery in the summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, notes or summary table")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p


# ---------------------------------------------------------------------------
# The engine seam (tests replace it with a fake; the real one lives in dager.attack)


def _engine() -> tuple[Callable[..., DagerResult], Callable[[ModelBundle], list[str]]]:
    """``(run_dager, required_parameters)`` of :mod:`dager.attack`."""
    from dager.attack import required_parameters, run_dager

    return run_dager, required_parameters


class _CliHandler(logging.StreamHandler):
    """The CLI's stderr handler (found again when ``main`` runs twice in one process)."""


def _configure_logging(verbose: bool) -> None:
    """The only place that sets up logging (stderr); Hugging Face's is :func:`dager.cli_batches._quiet_hf`."""
    root = logging.getLogger()
    mine = [h for h in root.handlers if isinstance(h, _CliHandler)]
    if mine:  # main() called again in one process (tests): follow the current stderr
        mine[0].stream = sys.stderr  # not setStream: it would flush the old, maybe closed, stream
    else:
        handler = _CliHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _fail(message: str) -> int:
    print(f"dager: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    """``python -m dager``: the file, batch by batch (:func:`dager.cli_batches.run_file`)."""
    return run_file(args, engine=_engine)  # _engine looked up now, so a test's fake is used


def run_sweep_command(args: argparse.Namespace) -> int:
    """``python -m dager sweep``: attack the same batches once per grid point.

    Each point: the client computes the defended update of each batch, DAGER
    reconstructs from the model and that update alone, and the evaluation scores it.
    Row metrics: ``rouge1``, ``rouge2``, ``exact_match`` (over all attacked sentences;
    a batch whose attack raised counts as unrecovered), ``utility_cosine`` and
    ``utility_norm_ratio`` (mean over batches, :func:`fedclient.defenses.utility_cost`),
    ``rank`` (of the first batch's layer-1 update), ``failed_batches``
    (:func:`dager.cli_sweep.run_sweep`).

    Returns:
        0 when every attack ran (whatever it recovered), 1 when some batch raised.
    """
    return run_sweep(args, engine=_engine)


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
    add_client_arguments(p)  # the client's training setup under every grid point (issue 11)
    p.add_argument("--quiet", "-q", action="store_true", help="no notes")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress details to stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    return p




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

    def work() -> int:
        args = (build_sweep_parser() if sweep else build_parser()).parse_args(argv[1:] if sweep else argv)
        _configure_logging(args.verbose)
        return run_sweep_command(args) if sweep else _run(args)

    return run_guarded("dager", work, debug="--debug" in argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
