"""The app's handlers: form values in, component values out, attacks in worker threads.

``app.py`` only builds the Blocks and wires these. Each handler checks its inputs
(:mod:`labui.inputs`, which raises :class:`~fedclient.errors.LabInputError`
subclasses), starts a :class:`~labui.jobs.Job` that computes the client's update and
runs the attack in a worker thread, and folds what the worker sends into a view
(:mod:`labui.text_view`, :mod:`labui.image_view`) whose values it yields. One wrapper,
:func:`face`, turns every input error into a ``gr.Error`` with the library's sentence.

Nothing the visitor typed is logged; files made from their data (previews, the
comparison, the GIF) are written only to Gradio's cache folder, which
:func:`purge_user_files` and Gradio's ``delete_cache`` clean.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import html
import inspect
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from dager.events import (
    AttackFinished,
    AttackStarted,
    AttackWarning,
    PrefixesExtended,
    SentenceRecovered,
    SpectrumComputed,
    TokensFiltered,
)
from dager.zoo import load_model
from dlg.events import DlgFinished, DlgStarted, LabelsInferred, TextDlgFinished
from fedclient import ImageBatch, compute_update
from fedclient.errors import LabInputError
from labui import inputs
from labui.image_view import IMAGE_KEYS, DlgView, matched_psnr, to_grid
from labui.inputs import DEVICE, IMAGE_SHAPE, NUM_CLASSES, SWEEPS, DefenseSettings
from labui.jobs import JobRegistry, Tick
from labui.text_view import TEXT_DLG_KEYS, TEXT_KEYS, DagerView, TextDlgView

log = logging.getLogger(__name__)

GIF_MAX_FRAMES = 60
YIELD_EVERY_S = 0.1
"""Stream at most ~10 updates a second (plots are re-sent only when they change)."""
TIME_BUDGET_S = float(os.environ.get("GLL_TIME_BUDGET_S", "60"))
"""Per-run cap in seconds (passed to the engines as ``time_budget_s``): a visitor waits
at most this long behind another visitor's run of the same kind."""
SWEEP_BUDGET_S = float(os.environ.get("GLL_SWEEP_BUDGET_S", "180"))
"""Cap of a whole sweep; each setting gets an equal share."""
STOP_WAIT_S = 30.0
"""How long the Stop handler waits for the worker before saying it is still finishing."""
DEFAULT_RACE_ITERATIONS = 10
"""The DLG text race's default. Each Adam step differentiates a gradient through the
whole model (seconds per step on gpt2-small-random on the 2-core CPU; 200 steps took
tens of minutes), so the default is the slider's minimum and the run is capped at
:data:`TIME_BUDGET_S`; the status shows an estimate from the rate seen."""
DEFAULT_IMAGE_ITERATIONS = 100

JOBS = JobRegistry()
"""The current job per visitor session and kind (for Stop)."""

URGENT_TEXT = (AttackStarted, SpectrumComputed, TokensFiltered, PrefixesExtended, SentenceRecovered,
               AttackWarning, AttackFinished)
"""DAGER events shown at once (the rest, heartbeats, are throttled)."""
URGENT_IMAGE = (DlgStarted, LabelsInferred, DlgFinished)


# -- the one error wrapper ------------------------------------------------------------


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


# -- items the worker sends besides engine events --------------------------------------


@dataclass(frozen=True)
class ModelReady:
    """The text model is loaded (the handler builds its view with it)."""

    bundle: object


@dataclass(frozen=True)
class UpdateReady:
    """The client's update is computed; ``utility`` compares it with the clean gradient."""

    utility: dict[str, float] | None


# -- engines -------------------------------------------------------------------------


def dager_events(bundle, update, *, noise_tolerant: bool = False,  # noqa: ANN001
                 time_budget_s: float | None = None) -> Iterator[object]:
    """The DAGER event stream for a shared update (monkeypatched in handler tests)."""
    from dager.attack import iter_dager
    from dager.config import DagerConfig

    config = DagerConfig(device=DEVICE, noise_tolerant=bool(noise_tolerant), time_budget_s=time_budget_s)
    return iter_dager(bundle, update, config=config)


def dager_parameters(bundle) -> list[str]:  # noqa: ANN001
    """The parameter names DAGER reads (the client shares only those: faster)."""
    from dager.attack import required_parameters

    return list(required_parameters(bundle))


def text_baseline_events(bundle, update, iterations: int,  # noqa: ANN001
                         time_budget_s: float | None = None) -> Iterator[object]:
    """The DLG text baseline's event stream on the same update.

    The baseline works out the sequence length itself (``seq_len=None``): the app no
    longer tells it the private batch's padded length.
    """
    from dlg.text import TextDlgConfig, iter_dlg_text

    config = TextDlgConfig(iterations=iterations, seq_len=None, device=DEVICE, time_budget_s=time_budget_s)
    return iter_dlg_text(bundle, update, config=config)


def dlg_events(model, update, *, method: str, iterations: int,  # noqa: ANN001
               time_budget_s: float | None = None) -> Iterator[object]:
    """The DLG image attack's event stream, with the lesson-sized settings (:mod:`dlg.presets`)."""
    from dlg.attack import iter_dlg
    from dlg.presets import lesson_config

    config = lesson_config(method=method, batch_size=int(update.batch_size), iterations=iterations,
                           time_budget_s=time_budget_s, image_shape=IMAGE_SHAPE)
    return iter_dlg(model, update, config=config)


@functools.cache
def vision_model(name: str) -> torch.nn.Module:
    """The image model, built once per name (seeded, shared read-only by all users)."""
    from dlg.models import build_model

    return build_model(name, num_classes=NUM_CLASSES, seed=0).to(DEVICE)


def load_bundle(name: str, task: str):  # noqa: ANN201
    """The text model (cached by :func:`dager.zoo.load_model`)."""
    return load_model(name, task, device=DEVICE)


def model_name(model: str, hub_id: str | None) -> str:
    """The model to load: a checked hub id when one is typed, else the dropdown's.

    Raises:
        HubIdError: the box holds something other than ``owner/name``.
        HubUnreachableError: a hub id while the hub cannot be reached (checked here so
            that no hub id ever reaches the library's local-folder lookup offline).
    """
    hub = inputs.parse_hub_id(hub_id)
    if hub is None:
        return model
    from dager import zoo
    from fedclient.errors import HubUnreachableError

    if not zoo._hub_reachable():
        raise HubUnreachableError(f"Cannot load {hub!r}: the Hugging Face Hub is unreachable from here. "
                                  f"Embedded models that work offline: {', '.join(zoo.EMBEDDED)}.")
    return hub


def task_choices(model: str, task: str) -> object:
    """The task radio for a model: only the tasks its family supports (MiniLM, an
    encoder, has no next-token head), so a run never fails on the task."""
    try:
        tasks = tuple(load_bundle(model, "classification").family.tasks)
    except LabInputError:
        return gr.skip()
    value = task if task in tasks else tasks[0]
    info = ("" if "next-token" in tasks else
            "This model is an encoder: it has no next-token head, so only classification is offered.")
    return gr.Radio(choices=list(tasks), value=value, info=info or None)


def text_scorer(bundle) -> Callable[[Sequence[str], Sequence[str]], object]:  # noqa: ANN001
    """ROUGE / exact match, judged on what the tokenizer can represent."""
    from dager.metrics import evaluate_text

    return functools.partial(evaluate_text, normalize=functools.partial(normalize, bundle))


def normalize(bundle, text: str) -> str:  # noqa: ANN001
    """``text`` as the tokenizer sees it (e.g. lowercased, accents stripped for BERT)."""
    return " ".join(bundle.decode(bundle.tokenize(text.strip())).split())


def check_lengths(bundle, sentences: Sequence[str]) -> None:  # noqa: ANN001
    """Refuse sentences the tokenizer cannot represent or longer than the demo's limit.

    The representability rule is the CLI's (:func:`dager.textio.check_text`), so the app
    and the CLI accept the same text (e.g. an emoji on minilm is refused by both).

    Raises:
        UntokenizableTextError: a sentence holds characters the tokenizer cannot represent.
        FormInputError: a sentence is too long, named by its line number.
    """
    from dager.textio import check_text

    for i, s in enumerate(sentences, 1):
        check_text(bundle, s, where=f"sentence {i}")
        n = len(bundle.tokenize(s))
        if n > inputs.MAX_SENTENCE_TOKENS:
            raise inputs.FormInputError(f"Sentence {i} is {n} tokens long; the demo attacks sentences of at most "
                                        f"{inputs.MAX_SENTENCE_TOKENS} tokens. Shorten or split it.")


def model_note(bundle) -> str:  # noqa: ANN001
    """An honest line about the model's weights."""
    if bundle.pretrained:
        return f"ℹ️ {bundle.description}"
    return (f"ℹ️ **Random weights.** {bundle.description} DAGER does not need trained weights: "
            "the leak comes from the gradient's low rank, so the recovery shown here is the same "
            "mechanism as on a trained model.")


def describe_defense(*settings: object) -> str:
    """One line about the panel's current defense (with DP's epsilon)."""
    from fedclient.defenses import describe

    try:
        return "**Shared update:** " + describe(DefenseSettings.from_inputs(*settings).build())
    except LabInputError as exc:
        return f"⚠️ {exc}"


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


# -- text tab ---------------------------------------------------------------------------


def _emit(view, keys: Sequence[str], force: bool = False) -> tuple:  # noqa: ANN001
    """Component values in ``keys`` order; unchanged ones are skipped (not re-sent)."""
    values = view.render()
    dirty = view.take_dirty()
    return tuple(values[k] if (force or k in dirty) else gr.skip() for k in keys)


def _result_json(view: DagerView) -> dict[str, object]:
    out: dict[str, object] = {"recovered": view.predictions,
                              "exact_check": [s.exact for s in view.recovered]}
    if view.finished is not None:
        r = view.finished.result
        out.update(rank=r.rank, hidden_size=r.hidden_size, over_capacity=r.over_capacity,
                   budget_exhausted=r.budget_exhausted, seconds=round(r.seconds, 3),
                   stop_reason=str(getattr(r.stop_reason, "value", r.stop_reason)),
                   first_tokens_seconds=None if view.first_tokens_s is None else round(view.first_tokens_s, 3))
    if view.scores is not None:
        sc = view.scores
        out.update(rouge1=sc.rouge1, rouge2=sc.rouge2, rougeL=sc.rougeL, exact_match=sc.exact_match)
    if view.utility is not None:
        out["utility_cosine"] = view.utility.get("utility_cosine")
    out["done"] = view.finished is not None
    return out


def _fold(view, items: Iterator[object], urgent_types: tuple[type, ...], *,  # noqa: ANN001
          clock: Callable[[], float], job=None) -> Iterator[None]:  # noqa: ANN001
    """Fold worker items into ``view``; yield whenever the screen should change.

    At once for ``urgent_types`` and the end of the client's update, otherwise at most
    every :data:`YIELD_EVERY_S` seconds; a :class:`~labui.jobs.Tick` updates the countdown.
    Both tabs' streams share it, so Stop is honoured the same way everywhere.
    """
    last = clock()
    for item in items:
        if isinstance(item, Tick):
            view.tick()
            urgent = False
        elif isinstance(item, UpdateReady):
            view.mark_update_done(item.utility)
            urgent = True
        else:
            view.apply(item)  # raises TypeError on an unknown event
            urgent = isinstance(item, urgent_types)
        if job is not None:
            job.where = view.where
        now = clock()
        if urgent or now - last >= YIELD_EVERY_S:
            last = now
            yield


def stream_dager(view: DagerView, items: Iterator[object], *, clock: Callable[[], float] = time.perf_counter,
                 job=None) -> Iterator[tuple]:  # noqa: ANN001
    """Fold worker items into ``view`` and yield component tuples (text outputs + JSON).

    Yields at once for the events that change what is on screen (spectrum, filter,
    prefixes, sentences, warnings, start, finish), otherwise throttled (:func:`_fold`).
    """
    for _ in _fold(view, items, URGENT_TEXT, clock=clock, job=job):
        yield (*_emit(view, TEXT_KEYS), _result_json(view))
    yield (*_emit(view, TEXT_KEYS, force=True), _result_json(view))


def _skips(n: int) -> tuple:
    return tuple(gr.skip() for _ in range(n))


def run_text_attack(sentences_text: str, model: str, hub_id: str | None, task: str, noise_tolerant: bool = False,
                    sigma: object = 0.0, dp: bool = False, clip: float = 1.0, z: float = 1.0, prune: float = 0.0,
                    precision: str = "fp32", fedavg_steps: int = 1, clients: int = 1,
                    request: gr.Request | None = None) -> Iterator[tuple]:
    """Gradio handler (``/dager``): the client shares its gradient; DAGER reconstructs; the app scores."""
    t0 = time.perf_counter()
    sentences = inputs.parse_sentences(sentences_text)
    settings = DefenseSettings.from_inputs(sigma, dp, clip, z, prune, precision, fedavg_steps, clients)
    defense = settings.build()  # a bad setting is reported before anything runs
    name = model_name(model, hub_id)
    job = JOBS.start(session_of(request), "text")
    yield (f"**Preparing:** loading {name} (only the first run of a model takes long)…", *_skips(len(TEXT_KEYS)))

    def produce() -> Iterator[object]:
        bundle = load_bundle(name, task)
        check_lengths(bundle, sentences)
        yield ModelReady(bundle)
        batch = bundle.encode(sentences, seed=0)
        update = compute_update(bundle.model, batch, parameters=dager_parameters(bundle), defense=defense, seed=0)
        yield UpdateReady(_utility(bundle.model, batch, update) if defense is not None else None)
        yield from dager_events(bundle, update, noise_tolerant=noise_tolerant, time_budget_s=TIME_BUDGET_S)

    items = job.run(produce)
    try:
        loading = f"**Preparing:** loading {name} (only the first run of a model takes long)…"
        bundle = None
        for item in items:  # until the model is loaded, the status says so (and Stop works)
            if isinstance(item, ModelReady):
                bundle = item.bundle
                break
            elif isinstance(item, Tick):
                yield (f"{loading} ⏱ {time.perf_counter() - t0:.0f} s", *_skips(len(TEXT_KEYS)))
            else:
                raise TypeError(f"expected the model first, got a {type(item).__name__}")
        if bundle is None:
            return
        view = DagerView(
            references=sentences,
            token_text=functools.partial(_token_text, bundle),
            special_ids=frozenset(int(i) for i in bundle.tokenizer.all_special_ids),
            normalize=functools.partial(normalize, bundle),
            model_note=model_note(bundle),
            scorer=text_scorer(bundle),
            noise_tolerant=bool(noise_tolerant),
            budget_s=TIME_BUDGET_S,
            t0=t0,
        )
        yield (*_emit(view, TEXT_KEYS, force=True), _result_json(view))
        yield from stream_dager(view, items, job=job)
    finally:
        items.close()
        release_memory()


def _token_text(bundle, token_id: int) -> str:  # noqa: ANN001
    """A token as text. A byte-level BPE piece that is not valid UTF-8 on its own (part
    of an emoji or accented letter) is shown as its bytes, e.g. ``⟨F0 9F⟩``, instead of
    the replacement character the tokenizer's decode gives."""
    text = bundle.tokenizer.decode([int(token_id)])
    if "\ufffd" not in text:
        return text
    piece = bundle.tokenizer.convert_ids_to_tokens(int(token_id))
    raw = _byte_decoder()
    if isinstance(piece, str) and piece and all(c in raw for c in piece):
        return "⟨" + " ".join(f"{raw[c]:02X}" for c in piece) + "⟩"
    return text


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table (Radford et al.'s encoder.py), inverted: the
    printable stand-in character -> the byte it encodes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in table.items()}


def _utility(model: torch.nn.Module, batch: object, update: object) -> dict[str, float]:
    from fedclient.defenses import utility_cost

    return utility_cost(model, batch, update)


def run_text_baseline(sentences_text: str, model: str, hub_id: str | None, task: str,
                      iterations: float = DEFAULT_RACE_ITERATIONS, sigma: object = 0.0, dp: bool = False,
                      clip: float = 1.0, z: float = 1.0, prune: float = 0.0, precision: str = "fp32",
                      fedavg_steps: int = 1, clients: int = 1,
                      request: gr.Request | None = None) -> Iterator[tuple]:
    """Gradio handler (``/dlg_text``): DLG's text baseline on the same shared update, for comparison."""
    sentences = inputs.parse_sentences(sentences_text)
    n_iter = inputs.iterations(iterations)
    settings = DefenseSettings.from_inputs(sigma, dp, clip, z, prune, precision, fedavg_steps, clients)
    defense = settings.build()
    name = model_name(model, hub_id)
    job = JOBS.start(session_of(request), "race")
    view = TextDlgView(references=sentences, budget_s=TIME_BUDGET_S)
    yield _emit_plain(view, TEXT_DLG_KEYS)

    def produce() -> Iterator[object]:
        bundle = load_bundle(name, task)
        check_lengths(bundle, sentences)
        yield ModelReady(bundle)
        batch = bundle.encode(sentences, seed=0)
        update = compute_update(bundle.model, batch, defense=defense, seed=0)
        yield UpdateReady(None)
        yield from text_baseline_events(bundle, update, n_iter, time_budget_s=TIME_BUDGET_S)

    items = job.run(produce)
    try:
        bundle = None
        for item in items:
            if isinstance(item, ModelReady):
                bundle = item.bundle
                break
            elif isinstance(item, Tick):
                yield (view.render()["race_status"], gr.skip(), gr.skip())
            else:
                raise TypeError(f"expected the model first, got a {type(item).__name__}")
        if bundle is None:
            return
        view.normalize = functools.partial(normalize, bundle)
        view.scorer = text_scorer(bundle)
        last = time.perf_counter()
        for item in items:
            if isinstance(item, Tick):  # only the countdown changed: re-send the status alone
                yield (view.render()["race_status"], gr.skip(), gr.skip())
                continue
            elif isinstance(item, UpdateReady):
                view.phase = "the attacker starts matching gradients…"
            else:
                view.apply(item)
            job.where = view.where
            if view.urgent(item) or time.perf_counter() - last >= 0.25:
                last = time.perf_counter()
                yield _emit_plain(view, TEXT_DLG_KEYS)
        yield _emit_plain(view, TEXT_DLG_KEYS)
    finally:
        items.close()
        release_memory()


def _emit_plain(view, keys: Sequence[str]) -> tuple:  # noqa: ANN001
    values = view.render()
    return tuple(values[k] for k in keys)


# -- image tab ------------------------------------------------------------------------


def stream_dlg(view: DlgView, items: Iterator[object], *, clock: Callable[[], float] = time.perf_counter,
               job=None) -> Iterator[tuple]:  # noqa: ANN001
    """Fold DLG worker items into ``view`` and yield the image outputs (throttled, :func:`_fold`)."""
    for _ in _fold(view, items, URGENT_IMAGE, clock=clock, job=job):
        yield (*_emit(view, IMAGE_KEYS), gr.skip())
    yield (*_emit(view, IMAGE_KEYS, force=True), write_gif(view))


def user_files_dir() -> Path:
    """Where files made from a visitor's data go: Gradio's cache folder (purged with uploads)."""
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_gif(view: DlgView) -> str | None:
    """The reconstruction over iterations as a GIF in Gradio's cache folder (None if no frames)."""
    if view.finished is None or not view.finished.result.frames:
        return None
    frames = list(view.finished.result.frames)
    if len(frames) > GIF_MAX_FRAMES:  # keep the first and last, evenly spaced between
        picks = np.linspace(0, len(frames) - 1, GIF_MAX_FRAMES).round().astype(int)
        frames = [frames[i] for i in sorted(set(picks.tolist()))]
    fd, path = tempfile.mkstemp(prefix="gll-dlg-", suffix=".gif", dir=user_files_dir())
    os.close(fd)
    from dlg import gif as dlg_gif

    dlg_gif.save_gif(frames, path)
    return path


def purge_user_files(older_than_s: float = 0.0, folder: Path | None = None) -> int:
    """Delete the GIFs this app wrote (``gll-*``) older than ``older_than_s``; returns how many.

    Gradio's ``delete_cache`` removes its own cached outputs (previews, comparisons);
    this covers the files the app writes itself, on the same schedule and at shutdown.
    """
    folder = folder or user_files_dir()
    now = time.time()
    removed = 0
    for path in folder.glob("gll-*"):
        try:
            if now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def run_image_attack(source: str, upload: object, sketch: object, batch_files: object, label: float, model: str,
                     method: str, iterations: float = DEFAULT_IMAGE_ITERATIONS, sigma: object = 0.0,
                     dp: bool = False, clip: float = 1.0, z: float = 1.0, prune: float = 0.0,
                     precision: str = "fp32", fedavg_steps: int = 1, clients: int = 1,
                     request: gr.Request | None = None) -> Iterator[tuple]:
    """Gradio handler (``/dlg``): the client shares its gradient on its images; DLG reconstructs them."""
    t0 = time.perf_counter()
    n_iter = inputs.iterations(iterations)
    inputs.class_label(label)  # a bad label is reported before any file is read
    settings = DefenseSettings.from_inputs(sigma, dp, clip, z, prune, precision, fedavg_steps, clients)
    defense = settings.build()
    images = inputs.load_client_image(source, upload, sketch, batch_files)
    note = inputs.input_note(source, upload, batch_files)
    labels = inputs.client_labels(label, images.shape[0])
    job = JOBS.start(session_of(request), "image")
    view = DlgView(originals=images, labels=labels, budget_s=TIME_BUDGET_S, t0=t0, note=note)
    yield (*_emit(view, IMAGE_KEYS, force=True), None)

    def produce() -> Iterator[object]:
        net = vision_model(model)
        batch = ImageBatch(images=images.to(DEVICE), labels=labels.to(DEVICE))
        update = compute_update(net, batch, defense=defense, seed=0)
        yield UpdateReady(_utility(net, batch, update) if defense is not None else None)
        yield from dlg_events(net, update, method=method, iterations=n_iter, time_budget_s=TIME_BUDGET_S)

    items = job.run(produce)
    try:
        yield from stream_dlg(view, items, job=job)
    finally:
        items.close()
        release_memory()


# -- defense sweep ---------------------------------------------------------------------


def _drain(events: Iterator[object], stop) -> object:  # noqa: ANN001
    """The last event's result; stops (closing the engine) when ``stop`` is set."""
    last = None
    try:
        for event in events:
            last = event
            if stop.is_set():
                return None
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()
    return getattr(last, "result", None)


@dataclass(frozen=True)
class SweepRow:
    """One finished setting of a sweep, with what to show next to it."""

    row: dict[str, object]
    shown: str
    """A thumbnail path (images) or the recovered text (text)."""


def run_defense_sweep(target: str, axis: str, sentences_text: str, model: str, hub_id: str | None, task: str,
                      noise_tolerant: bool, source: str, upload: object, sketch: object, batch_files: object,
                      label: float, vmodel: str, method: str, iterations: float,
                      request: gr.Request | None = None) -> Iterator[tuple]:
    """Gradio handler (``/sweep``): attack success and utility against defense strength, row by row."""
    from fedclient.sweep import grid, iter_sweep, plot_sweep

    if axis not in SWEEPS:
        raise inputs.UnknownChoiceError(f"Unknown sweep {axis!r}; choose one of {', '.join(SWEEPS)}.")
    points = grid(SWEEPS[axis])
    per_point = SWEEP_BUDGET_S / max(len(points), 1)
    job = JOBS.start(session_of(request), "sweep")
    if target == "text":
        sentences = inputs.parse_sentences(sentences_text)
        name = model_name(model, hub_id)
        metrics = ["rouge1", "exact_match"]

        def attack_factory() -> Callable[[object], dict[str, object]]:
            bundle = load_bundle(name, task)
            check_lengths(bundle, sentences)
            batch = bundle.encode(sentences, seed=0)
            params = dager_parameters(bundle)
            scorer = text_scorer(bundle)

            def attack(defense):  # noqa: ANN001, ANN202
                update = compute_update(bundle.model, batch, parameters=params, defense=defense, seed=0)
                result = _drain(dager_events(bundle, update, noise_tolerant=noise_tolerant,
                                             time_budget_s=per_point), job.stop)
                if result is None:
                    raise _Stopped
                sc = scorer(sentences, list(result.sentences))
                shown = " / ".join(result.sentences)[:160]
                return {"rouge1": sc.rouge1, "exact_match": sc.exact_match, "_shown": shown,
                        **_utility(bundle.model, batch, update)}
            return attack
    elif target == "images":
        n_iter = inputs.iterations(iterations)
        images = inputs.load_client_image(source, upload, sketch, batch_files)
        labels = inputs.client_labels(label, images.shape[0])
        metrics = ["psnr"]

        def attack_factory() -> Callable[[object], dict[str, object]]:
            net = vision_model(vmodel)
            batch = ImageBatch(images=images.to(DEVICE), labels=labels.to(DEVICE))

            def attack(defense):  # noqa: ANN001, ANN202
                update = compute_update(net, batch, defense=defense, seed=0)
                result = _drain(dlg_events(net, update, method=method, iterations=n_iter, time_budget_s=per_point), job.stop)
                if result is None:
                    raise _Stopped
                return {"psnr": matched_psnr(images, result.images), "_shown": _thumbnail(result.images),
                        **_utility(net, batch, update)}
            return attack
    else:
        raise inputs.UnknownChoiceError(f"Unknown sweep target {target!r}; choose text or images.")

    def produce() -> Iterator[object]:
        attack = attack_factory()
        try:
            yield from iter_sweep(points, attack)
        except _Stopped:
            return

    rows: list[dict[str, object]] = []
    title = f"{'DAGER' if target == 'text' else method.upper()} under {axis}"
    yield f"**Sweep:** {len(points)} settings of {axis}, at most {per_point:.0f} s each…", gr.skip(), gr.skip()
    items = job.run(produce)
    try:
        for item in items:
            if isinstance(item, Tick):
                continue
            elif isinstance(item, dict):
                rows.append(item)
            else:
                raise TypeError(f"the sweep cannot show a {type(item).__name__}")
            item["_shown"] = _shown_cell(item.get("_shown"))
            job.where = f"setting {len(rows)} of {len(points)}"
            table = [[str(r["label"]), *(round(float(r[m]), 4) for m in metrics),
                      round(float(r.get("utility_cosine", float("nan"))), 4),
                      round(float(r["seconds"]), 2), r["_shown"]] for r in rows]
            done = len(rows) == len(points)
            status = f"**Sweep:** {len(rows)} of {len(points)} settings done" + ("." if done else "…")
            fig = plot_sweep(rows, y=[*metrics, "utility_cosine"], title=f"{title}: attack success and utility")
            yield status, fig, {"headers": ["setting", *metrics, "utility cosine", "seconds", "recovered"],
                                "data": table}
    finally:
        items.close()
        release_memory()


class _Stopped(Exception):
    """The visitor stopped the sweep (ends the worker's generator quietly)."""


def _thumbnail(images: torch.Tensor) -> str:
    from PIL import Image

    fd, path = tempfile.mkstemp(prefix="gll-sweep-", suffix=".png", dir=user_files_dir())
    os.close(fd)
    Image.fromarray(to_grid(images, scale=1, pad=1)).save(path)
    return path


def _shown_cell(shown: object) -> str:
    """A table cell: an inline thumbnail for an image path (the file is then deleted:
    the page holds the only copy), else the recovered text."""
    if isinstance(shown, str) and shown.endswith(".png") and os.path.isfile(shown):
        import base64

        data = base64.b64encode(Path(shown).read_bytes()).decode("ascii")
        Path(shown).unlink(missing_ok=True)
        return (f'<img src="data:image/png;base64,{data}" alt="reconstruction" '
                'style="image-rendering:pixelated;height:32px">')
    return "" if shown is None else html.escape(str(shown))


_purger_lock = threading.Lock()
_purger: threading.Thread | None = None


def start_purger(every_s: float) -> None:
    """Delete the app's own user-derived files every ``every_s`` seconds (once per process).

    Gradio's ``delete_cache`` purges uploads and its cached copies of outputs on the
    same schedule; this covers what :func:`write_gif` and the sweep write themselves.
    """
    global _purger
    with _purger_lock:
        if _purger is not None and _purger.is_alive():
            return

        def loop() -> None:
            while True:
                time.sleep(every_s)
                purge_user_files(older_than_s=every_s)

        _purger = threading.Thread(target=loop, name="gll-purge", daemon=True)
        _purger.start()


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
