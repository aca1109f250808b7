"""Running an attack in a worker thread so that the page stays responsive.

Gradio runs a generator handler one ``next()`` at a time in a thread; a Stop (a
cancel) takes effect only when that ``next()`` returns. A client update under DP-SGD
(per-example gradients) or a long search step can hold ``next()`` for seconds, so Stop
and the status froze. Here the heavy work runs in a :class:`Job`'s own thread that
pushes items into a queue; the handler waits on the queue at most :data:`POLL_S` and
yields in between, so it hands control back to Gradio several times a second.

Stop is a flag, not only a cancel: the Stop button sets it through the
:class:`JobRegistry` (keyed by the visitor's session and the kind of job), the worker
checks it between items and closes the engine's generator (engines yield heartbeats,
so this is prompt), and the Stop handler waits for :meth:`Job.wait_released` before
it re-enables Run. A Run can therefore never start while the previous worker still
holds the CPU, which is what made a Run pressed a few seconds after Stop vanish.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

POLL_S = 0.2
"""The longest the handler waits for the worker before yielding to Gradio."""


@dataclass(frozen=True)
class Tick:
    """Nothing new from the worker within :data:`POLL_S` (the handler may yield)."""

    seconds: float


class _End:
    """The worker's last item (its error, if any, travels with it)."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


@dataclass
class Job:
    """One run of one visitor: a worker thread, its stop flag and where it got to.

    Attributes:
        kind: the job's kind (``"text"``, ``"race"``, ``"image"``, ``"sweep"``).
        stop: set by Stop; the worker stops at its next item.
        where: a short phrase saying where the run is (shown as "Stopped at ...").
        released: set when the worker thread has let go of its work.
    """

    kind: str
    stop: threading.Event = field(default_factory=threading.Event)
    where: str = "the start"
    released: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    user_stopped: bool = False
    """Set when the visitor pressed Stop while this job ran (not when it ended by itself)."""
    _items: queue.Queue[object] | None = field(default=None, repr=False)

    def backlog(self) -> int:
        """How many items the worker has sent that the handler has not taken yet.

        The handler folds a backlog into one screen update instead of rendering each
        item: rendering every event (plots included) made the page fall seconds behind
        the search.
        """
        return 0 if self._items is None else self._items.qsize()

    def run(self, produce: Callable[[], Iterator[object]], *, poll_s: float = POLL_S) -> JobStream:
        """Start ``produce()`` in a worker thread now; return the stream of its items.

        The worker starts at this call, not at the stream's first ``next()``: a handler
        starts the work and then yields its first frame, so the client's update is
        computed while Gradio sends that frame instead of after it. The worker stops
        between items once :attr:`stop` is set (the generator is closed, so the
        engine's ``finally`` blocks run). An exception in the worker is re-raised by
        the stream, in the handler's thread. Closing the stream (even before its first
        item) stops the worker.

        Returns:
            The producer's items, and a :class:`Tick` at least every ``poll_s`` seconds
            when the worker is quiet.
        """
        items: queue.Queue[object] = queue.Queue()
        self._items = items
        self.thread = threading.Thread(target=self._work, args=(produce, items), name=f"gll-{self.kind}",
                                       daemon=True)
        self.thread.start()
        return JobStream(self, self._drain(items, poll_s))

    def _work(self, produce: Callable[[], Iterator[object]], items: queue.Queue[object]) -> None:
        """The worker thread: ``produce()``'s items into the queue until the end or Stop."""
        error: BaseException | None = None
        gen = produce()
        try:
            for item in gen:
                if self.stop.is_set():
                    break
                items.put(item)
                if self.stop.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the handler thread
            error = exc
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - closing must not mask the run's end
                    log.exception("closing the %s job's generator failed", self.kind)
            self.released.set()
            items.put(_End(error))

    def _drain(self, items: queue.Queue[object], poll_s: float) -> Iterator[object]:
        try:
            while True:
                try:
                    item = items.get(timeout=poll_s)
                except queue.Empty:
                    yield Tick(time.monotonic() - self.started)
                    continue
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            # The handler is gone (finished, failed or cancelled): the worker stops too.
            self.stop.set()

    def wait_released(self, timeout: float) -> bool:
        """Wait until the worker has let go (True) or ``timeout`` passed (False)."""
        if self.thread is None:
            return True
        return self.released.wait(timeout)

    @property
    def running(self) -> bool:
        return self.thread is not None and not self.released.is_set()


class JobStream(Iterator[object]):
    """A running job's items (:meth:`Job.run`); ``close()`` stops the worker.

    A plain generator would not do: closing one that never started runs none of its
    code, and the worker, already started, would run on.
    """

    def __init__(self, job: Job, items: Iterator[object]) -> None:
        self._job = job
        self._items = items

    def __iter__(self) -> JobStream:
        return self

    def __next__(self) -> object:
        return next(self._items)

    def close(self) -> None:
        """Stop the worker (at its next item) and end the stream."""
        self._job.stop.set()
        close = getattr(self._items, "close", None)
        if close is not None:
            close()


class JobRegistry:
    """The current job per (session, kind): what Stop stops and waits for.

    One registry serves the whole app; it holds only thread handles and stop flags
    (nothing the visitor typed), and a job is dropped when the next one of the same
    session and kind starts.
    """

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], Job] = {}
        self._lock = threading.Lock()

    def start(self, session: str, kind: str) -> Job:
        """A new job for this session and kind (the previous one is told to stop)."""
        job = Job(kind)
        with self._lock:
            old = self._jobs.get((session, kind))
            self._jobs[(session, kind)] = job
        if old is not None:
            old.stop.set()
        return job

    def get(self, session: str, kind: str) -> Job | None:
        with self._lock:
            return self._jobs.get((session, kind))

    def stop(self, session: str, kind: str) -> Job | None:
        """Set the stop flag of the session's current job of that kind (if any)."""
        job = self.get(session, kind)
        if job is not None and job.running:
            job.user_stopped = True
            job.stop.set()
        return job

    def forget(self, session: str) -> None:
        """Drop a session's jobs (its tab was closed), stopping them."""
        with self._lock:
            keys = [k for k in self._jobs if k[0] == session]
            jobs = [self._jobs.pop(k) for k in keys]
        for job in jobs:
            job.stop.set()
