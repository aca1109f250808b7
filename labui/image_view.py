"""The DLG image attack's event stream as display values."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from dlg.events import DlgFinished, DlgProgress, DlgStarted, DlgStep, LabelsInferred
from dlg.images import to_grid
from dlg.metrics import matched_psnr
from labui import plots
from labui.countdown import Countdown, EventFold

IMAGE_KEYS = ("status", "preview", "loss", "psnr", "comparison")
"""The DLG view's outputs, in the order the app wires them."""

HELD_BELOW_DB = 20.0
"""A reconstruction below this PSNR is no longer recognisable on the lab's 32x32 images."""


@dataclass
class DlgView(Countdown, EventFold):
    """Accumulated state of one DLG run, for display.

    Attributes:
        originals: ``(B, C, H, W)`` the client's images (the demo's evaluator knows them).
        labels: the client's true labels, for the label-accuracy line.
        clock: a monotonic clock (injectable for tests).
    """

    originals: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    clock: Callable[[], float] = time.perf_counter
    budget_s: float | None = None
    t0: float = 0.0
    note: str | None = None
    """A line about the input (e.g. "the GIF's first frame was used")."""

    started: DlgStarted | None = None
    inferred: LabelsInferred | None = None
    iterations: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    psnr_iterations: list[int] = field(default_factory=list)
    psnrs: list[float] = field(default_factory=list)
    preview: torch.Tensor | None = None
    restart: int = 0
    finished: DlgFinished | None = None
    scores: object | None = None
    utility: dict[str, float] | None = None
    frames_shown: int = 0
    dirty: set[str] = field(default_factory=lambda: set(IMAGE_KEYS))

    def __post_init__(self) -> None:
        if not self.t0:
            self.t0 = self.clock()
        self._handlers = {
            DlgStarted: self._started,
            LabelsInferred: self._labels,
            DlgStep: self._step,
            DlgProgress: lambda e: None,  # a heartbeat inside a long iteration: nothing to redraw
            DlgFinished: self._finished,
        }

    def mark_update_done(self, utility: dict[str, float] | None = None) -> None:
        """The client's update is computed (``utility``: its cost, for a defended run)."""
        self.utility = utility
        self.dirty.add("status")

    @property
    def where(self) -> str:
        """Where the run is, for "Stopped at ..."."""
        if self.finished is not None:
            return "the end"
        if self.started is None:
            return "the client's update"
        it = self.iterations[-1] if self.iterations else 0
        psnr = f" (PSNR {self.psnrs[-1]:.1f} dB)" if self.psnrs else ""
        return f"iteration {it} of {self.started.iterations}{psnr}"

    def verdict(self) -> str | None:
        """One line on a defended run: did the defense hold, and what did it cost?"""
        if self.utility is None or self.finished is None:
            return None
        kept = f"the update kept {float(self.utility.get('utility_cosine', float('nan'))):.3f} of its direction"
        psnr = self.final_psnr
        if psnr is None:
            return f"**Verdict:** {kept}."
        if psnr < HELD_BELOW_DB:
            head = f"defense held: {psnr:.1f} dB, below {HELD_BELOW_DB:.0f} dB"
        else:
            head = f"defense failed: {psnr:.1f} dB, at or above {HELD_BELOW_DB:.0f} dB (recognisable)"
        return f"**Verdict:** {head}; {kept}."

    def aggregation_verdict(self, clients: int, mixed: int, limit: int) -> str:
        """The status when secure aggregation mixes more images than DLG can reconstruct."""
        note = [self.note] if self.note else []
        return "\n\n".join([*note, f"**Verdict:** defense held: secure aggregation over {clients} clients "
                              f"mixes {mixed} images into one update, and DLG reconstructs at most {limit} at "
                              "once, so the attack could not start. Fewer clients (or images) let it run."])

    def _started(self, e: DlgStarted) -> None:
        self.started = e
        self.dirty.add("status")

    def _labels(self, e: LabelsInferred) -> None:
        self.inferred = e
        self.dirty.add("status")

    def _step(self, e: DlgStep) -> None:
        if e.restart != self.restart:  # a new restart: curves start over
            self.restart = int(e.restart)
            self.iterations.clear(), self.losses.clear()
            self.psnr_iterations.clear(), self.psnrs.clear()
        self.iterations.append(int(e.iteration))
        self.losses.append(float(e.loss))
        self.dirty |= {"status", "loss"}
        if e.preview is not None:
            self.preview = e.preview
            self.frames_shown += 1
            self.dirty.add("preview")
            if self.originals is not None and e.preview.shape == self.originals.shape:
                self.psnr_iterations.append(int(e.iteration))
                self.psnrs.append(matched_psnr(self.originals, e.preview))
                self.dirty.add("psnr")

    def _finished(self, e: DlgFinished) -> None:
        self.finished = e
        r = e.result
        self.preview = r.images
        if r.losses and len(r.losses) >= len(self.losses):
            self.iterations = list(range(1, len(r.losses) + 1))
            self.losses = [float(v) for v in r.losses]
        if self.originals is not None and r.images.shape == self.originals.shape:
            final = matched_psnr(self.originals, r.images)
            last = self.iterations[-1] if self.iterations else 0
            if not self.psnr_iterations or self.psnr_iterations[-1] < last:
                self.psnr_iterations.append(last)
                self.psnrs.append(final)
        self.dirty |= set(IMAGE_KEYS)

    @property
    def final_psnr(self) -> float | None:
        if self.finished is None or self.originals is None:
            return None
        return matched_psnr(self.originals, self.finished.result.images)

    def take_dirty(self) -> set[str]:
        d, self.dirty = self.dirty, set()
        return d

    def render(self, keys: Iterable[str] | None = None) -> dict[str, object]:
        """The outputs in ``keys`` (all when None: numpy images, plotly figures, Markdown);
        only those are built."""
        wanted = set(IMAGE_KEYS) if keys is None else set(keys)
        out: dict[str, object] = {}
        if "status" in wanted:
            out["status"] = self.status_markdown()
        if "preview" in wanted:
            out["preview"] = None if self.preview is None else to_grid(self.preview)
        if "loss" in wanted:
            out["loss"] = plots.curve_figure(self.iterations, self.losses, title="Gradient distance (matching loss)",
                                             ytitle="distance", log=True, empty="waiting for the first iteration…")
        if "psnr" in wanted:
            out["psnr"] = plots.curve_figure(self.psnr_iterations, self.psnrs, title="PSNR against the original",
                                             ytitle="PSNR (dB)", log=False, colour=plots.ACCEPT,
                                             empty="PSNR appears with the first preview", hline=30.0,
                                             hline_text="30 dB: visually identical")
        if "comparison" in wanted:
            out["comparison"] = self.comparison()
        return out

    def comparison(self) -> np.ndarray | None:
        """Originals beside (one image) or above (a batch) the final reconstructions."""
        if self.finished is None:
            return None
        rec = to_grid(self.finished.result.images)
        if self.originals is None or self.originals.shape != self.finished.result.images.shape:
            return rec
        ori = to_grid(self.originals)
        if self.originals.shape[0] == 1:  # side by side: original | reconstruction
            gap = np.full((ori.shape[0], 8, 3), 255, np.uint8)
            return np.concatenate([ori, gap, rec], axis=1)
        gap = np.full((8, ori.shape[1], 3), 255, np.uint8)  # a batch: originals above, reconstructions below
        return np.concatenate([ori, gap, rec], axis=0)

    def stop_phrase(self, reason: str) -> str:
        """Why DLG stopped, as the end of "stopped because ...".

        Raises:
            ValueError: a stop reason :class:`dlg.events.DlgResult` does not list.
        """
        if reason == "tolerance":
            return "the gradient distance fell below the tolerance"
        elif reason == "plateau":
            return "the gradient distance stopped improving"
        elif reason == "budget":
            return "the iteration budget ran out"
        elif reason == "diverged":
            return "the optimisation diverged"
        elif reason == "cancelled":
            return "it was stopped"
        elif reason == "time_budget":
            return f"it reached the {self.budget_s or 0:.0f} s time budget"
        else:
            raise ValueError(f"unknown DLG stop reason {reason!r}")

    def status_markdown(self) -> str:
        s = self.started
        note = [self.note] if self.note else []
        clock = self.countdown()
        if s is None:
            return "\n\n".join([*note, f"**Running:** computing the client's gradient… {clock}"])
        head = f"**{s.method.upper()}** on **{s.model}** · batch {s.batch_size} · budget {s.iterations} iterations"
        if s.restarts > 1:
            head += f" · restart {self.restart + 1} of {s.restarts}"
        lines = [head]
        if self.inferred is not None:
            inferred = sorted(int(v) for v in self.inferred.labels.tolist())
            line = f"Labels read from the last layer's gradient: {inferred}"
            if self.labels is not None:
                truth = sorted(int(v) for v in self.labels.tolist())
                line += " ✓ (correct)" if truth == inferred else f" (true: {truth})"
            lines.append(line)
        if self.finished is None:
            it = self.iterations[-1] if self.iterations else 0
            loss = f", distance {self.losses[-1]:.3g}" if self.losses else ""
            psnr = f", PSNR {self.psnrs[-1]:.1f} dB" if self.psnrs else ""
            lines.append(f"**Running:** iteration {it}{loss}{psnr}… {clock}")
        else:
            r = self.finished.result
            stop = self.stop_phrase(str(getattr(r.stop_reason, "value", r.stop_reason)))
            at = f" at iteration {r.converged_iteration}" if r.converged_iteration else ""
            psnr = self.final_psnr
            tail = f"; PSNR **{psnr:.1f} dB**" if psnr is not None else ""
            lines.append(f"**Done** in {r.seconds:.1f} s: stopped{at} because {stop}{tail}.")
            verdict = self.verdict()
            if verdict:
                lines.append(verdict)
        return "\n\n".join([*note, *lines])
