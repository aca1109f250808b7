"""Argument types, exit codes and interrupt handling shared by the lab's CLIs (torch-free)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered as an interrupt so the code that keeps finished work on
    Ctrl-C (``except KeyboardInterrupt``) keeps it on a polite kill too."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``).

    The previous handler comes back afterwards (tests call ``main()`` in-process). Off
    the main thread Python cannot install handlers; the block then runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(exc: BaseException) -> int:
    """130 for Ctrl-C, 143 (128 + SIGTERM) for :class:`Terminated`."""
    return 128 + int(signal.SIGTERM) if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def interrupt_word(exc: BaseException) -> str:
    """``"terminated"`` or ``"interrupted"``, for the one line the CLI prints."""
    return "terminated" if isinstance(exc, Terminated) else "interrupted"


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1, with a one-line error otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def class_label(text: str) -> int:
    """An argparse type: a class id, a whole number >= 0 (``7.5`` and ``7.0`` are refused).

    ``int("7.5")`` already fails, but a float-looking label is refused explicitly so the
    message says why instead of silently rounding (issue 14).
    """
    stripped = text.strip()
    try:
        value = int(stripped)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a label is a whole-number class id such as 3, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a label is a class id of at least 0, got {value}")
    return value


__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Terminated",
    "class_label",
    "interrupt_exit_code",
    "interrupt_word",
    "positive_int",
    "sigterm_as_interrupt",
]
