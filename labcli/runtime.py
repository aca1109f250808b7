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


_received: list[int] = []  # signals received inside interrupts_as_exceptions(), in order


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def interrupts_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` and Ctrl-C ``KeyboardInterrupt``,
    and both are recorded (:func:`pending_interrupt`).

    The record matters because some libraries catch the exception and raise another in
    its place (transformers' lazy imports turn an interrupt during ``import`` into a
    ``ModuleNotFoundError``); the CLI then still knows it was interrupted. A SIGINT the
    parent shell told us to ignore stays ignored. The previous handlers come back
    afterwards (tests call ``main()`` in-process). Off the main thread Python cannot
    install handlers; the block then runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


sigterm_as_interrupt = interrupts_as_exceptions  # the first name of this helper


def pending_interrupt() -> KeyboardInterrupt | None:
    """The interrupt received in :func:`interrupts_as_exceptions`, if any, as an exception."""
    if not _received:
        return None
    return Terminated() if _received[-1] == signal.SIGTERM else KeyboardInterrupt()


def raise_if_interrupted() -> None:
    """Re-raise a recorded interrupt (call where a broad ``except Exception`` may have eaten it)."""
    exc = pending_interrupt()
    if exc is not None:
        raise exc


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
    "interrupts_as_exceptions",
    "pending_interrupt",
    "positive_int",
    "raise_if_interrupted",
    "sigterm_as_interrupt",
]
