"""Sessions, Run/Stop and the one error wrapper: what every tab shares.

:func:`face` turns the library's input errors into ``gr.Error``; :data:`JOBS` holds
each visitor's current job per kind, which Stop stops and waits for.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import inspect
from collections.abc import Callable, Iterator

import gradio as gr

from fedclient.errors import LabInputError
from labui.jobs import JobRegistry

STOP_WAIT_S = 30.0
"""How long the Stop handler waits for the worker before saying it is still finishing."""

JOBS = JobRegistry()
"""The current job per visitor session and kind (for Stop)."""


def face(fn: Callable) -> Callable:
    """Wrap a handler so that input errors reach the visitor as one sentence.

    A :class:`~fedclient.errors.LabInputError` from the library (or from
    :mod:`labui.inputs`) becomes ``gr.Error`` with its message; anything else propagates
    (Gradio shows a generic error and the server log has the traceback, without inputs).
    """
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args: object, **kwargs: object) -> Iterator[object]:
            try:
                yield from fn(*args, **kwargs)
            except LabInputError as exc:
                raise gr.Error(str(exc)) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except LabInputError as exc:
            raise gr.Error(str(exc)) from None
    return wrapper


def session_of(request: gr.Request | None) -> str:
    """The visitor's session id (``"local"`` when a test calls a handler directly)."""
    return str(getattr(request, "session_hash", None) or "local")


def release_memory() -> None:
    """Give freed heap pages back to the OS after a heavy run (glibc only).

    PyTorch's CPU allocator returns big blocks itself, but many small tensors freed
    after a run stay in glibc's arenas; ``malloc_trim(0)`` hands them back, so the
    server's RSS falls between visitors instead of staying at its peak.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl or another libc: nothing to do
        return
    trim(0)


def forget_session(request: gr.Request | None = None) -> None:
    """The visitor closed the page: their running jobs stop."""
    JOBS.forget(session_of(request))


# -- Run / Stop buttons -----------------------------------------------------------------


def lock_run() -> tuple:
    """Run pressed: Run disabled until the worker has let go, Stop enabled."""
    return gr.Button(interactive=False), gr.Button(interactive=True)


def unlock_run() -> tuple:
    """The run ended (finished, failed or stopped): Run enabled again, Stop disabled."""
    return gr.Button(interactive=True), gr.Button(interactive=False)


def stopping_for(kind: str) -> Callable:
    """A Stop handler for jobs of ``kind``: sets the stop flag, says "Stopping…" at once."""

    def stopping(request: gr.Request | None = None) -> str:
        JOBS.stop(session_of(request), kind)
        return "**Stopping…**"

    stopping.__name__ = f"stopping_{kind}"
    return stopping


def stopped_for(kind: str) -> Callable:
    """The handler after Stop: waits for the worker to let go, then says where it stopped."""

    def stopped(request: gr.Request | None = None) -> tuple:
        job = JOBS.get(session_of(request), kind)
        if job is None or not job.user_stopped:
            message = "**Stopped** before the run started (it was waiting for a free worker)."
        elif job.wait_released(STOP_WAIT_S):
            message = f"**Stopped** at {job.where}."
        else:
            message = f"**Stopping…** the worker is finishing {job.where}; Run comes back when it has."
            job.wait_released(STOP_WAIT_S * 4)
        release_memory()
        return (message, *unlock_run())

    stopped.__name__ = f"stopped_{kind}"
    return stopped

