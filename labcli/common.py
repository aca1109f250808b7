"""What both command lines share: the usage error, the parser, defense options, the CUDA check, JSON.

Torch-free at import (issue 13): :func:`check_device` and :func:`defense_record` import
torch and the defenses only when called, after the cheap checks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from fedclient.errors import LabInputError
from labcli.outputs import lost_sentence, save_json
from labcli.runtime import (
    EXIT_FAILED,
    EXIT_USAGE,
    interrupt_exit_code,
    interrupt_word,
    interrupts_as_exceptions,
    pending_interrupt,
)

if TYPE_CHECKING:
    from fedclient.client import Defense


class CliUsageError(LabInputError):
    """An option or input the CLI cannot use (exit code 2, one line on stderr)."""


class LabParser(argparse.ArgumentParser):
    """argparse, with a usage error raised as :class:`CliUsageError` (one line) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise CliUsageError(f"{message} (see {self.prog} --help)")


DEFENSE_HELP = (
    "client-side defense, repeatable: noise:1e-3 (sigma), noise:var=1e-4 (variance, DLG's convention), "
    "dp:clip=1.0,noise=1.0, prune:0.3, mask:0.3, fp16, int8, fedavg:steps=4,lr=0.01, secagg:clients=4"
)
"""The ``--defense`` help of both CLIs (the forms of :func:`fedclient.defenses.parse_defense`)."""


def add_defense_argument(parser: argparse.ArgumentParser) -> None:
    """The repeatable ``--defense SPEC`` option."""
    parser.add_argument("--defense", action="append", default=[], metavar="SPEC", help=DEFENSE_HELP)


def check_defense_specs(specs: Sequence[str]) -> None:
    """Refuse an empty ``--defense ""`` (it would silently mean no defense; issue 14).

    Raises:
        CliUsageError: a spec is empty.
    """
    for spec in specs:
        if not spec.strip().strip(";").strip():
            raise CliUsageError(
                "--defense was given an empty spec: drop the option for no defense, or give one such as noise:1e-3."
            )


def defense_record(specs: Sequence[str]) -> tuple[Defense | None, dict[str, object]]:
    """The defense of the ``--defense`` specs and its JSON keys (imports torch).

    :func:`fedclient.defenses.parse_defenses` orders the specs by role (how the update is
    computed, then transforms in the order given, then secure aggregation).

    Returns:
        ``(defense or None, {"defense": specs as given, "defense_description": one
        sentence, "epsilon": DP epsilon or None})``.

    Raises:
        CliUsageError: an empty spec.
        fedclient.errors.InvalidConfigError: a spec cannot be parsed.
    """
    from fedclient.defenses import describe, epsilon_of, parse_defenses

    check_defense_specs(specs)
    defense = parse_defenses(list(specs)) if specs else None
    eps = epsilon_of(defense)
    return defense, {
        "defense": list(specs),
        "defense_description": describe(defense),
        "epsilon": eps if eps is not None and math.isfinite(eps) else None,  # JSON has no inf
    }


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` without a GPU (imports torch).

    Raises:
        CliUsageError: CUDA was asked for and PyTorch sees none.
    """
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliUsageError(
                "--device cuda was given but PyTorch sees no CUDA GPU on this machine: use --device cpu."
            )


def write_json(path: Path, report: dict[str, object], *, prog: str) -> bool:
    """Write the result JSON (mode 0600); on failure keep it elsewhere and say where.

    Returns:
        True when it went to ``path``; False when it went to a fallback (one sentence on
        stderr names it).
    """
    saved = save_json(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n", prog=prog)
    if not saved.ok:
        print(f"{prog}: error: {lost_sentence('--output', path, saved)}", file=sys.stderr)
    return saved.ok


def run_guarded(prog: str, work: Callable[[], int], *, debug: bool) -> int:
    """Run a CLI's work and turn every way it can end into one line and an exit code.

    * a :class:`~fedclient.errors.LabInputError` (bad input or option): ``PROG: error:
      ...``, exit 2;
    * Ctrl-C or SIGTERM (also when a library turned it into another error): one line,
      exit 130 (143);
    * ``--help``: its exit code;
    * anything else: ``PROG: internal error (...)``, exit 1, or the traceback with
      ``--debug``.
    """
    try:
        with interrupts_as_exceptions():
            return work()
    except SystemExit as exc:  # --help
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    except LabInputError as exc:  # every user-facing input error of the lab
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM, e.g. while torch or the model loads
        print(f"{prog}: {interrupt_word(exc)}.", file=sys.stderr)
        return interrupt_exit_code(exc)
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        interrupted = pending_interrupt()
        if interrupted is not None:  # a library turned the interrupt into another error
            print(f"{prog}: {interrupt_word(interrupted)}.", file=sys.stderr)
            return interrupt_exit_code(interrupted)
        if debug:
            raise
        first = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        print(f"{prog}: internal error ({first}); rerun with --debug for the traceback.", file=sys.stderr)
        return EXIT_FAILED


__all__ = [
    "DEFENSE_HELP",
    "CliUsageError",
    "LabParser",
    "add_defense_argument",
    "check_defense_specs",
    "check_device",
    "defense_record",
    "run_guarded",
    "write_json",
]
