"""The app's handlers: form values in, component values out, attacks in worker threads.

``app.py`` only builds the Blocks and wires these. Each handler checks its inputs
(:mod:`labui.inputs`, which raises :class:`~fedclient.errors.LabInputError`
subclasses), starts a :class:`~labui.jobs.Job` that computes the client's update and
runs the attack in a worker thread (:mod:`labui.engines`), and folds what the worker
sends into a view (:mod:`labui.stream`, :mod:`labui.text_view`,
:mod:`labui.image_view`) whose values it yields. One wrapper, :func:`~labui.session.face`,
turns every input error into a ``gr.Error`` with the library's sentence.

The rest lives next door: Run/Stop and sessions in :mod:`labui.session`, the model
helpers in :mod:`labui.textmodel`, files made from a visitor's data in
:mod:`labui.userfiles`, the defense sweep in :mod:`labui.sweep`. The names the app and
older callers use are re-exported here.

Nothing the visitor typed is logged.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING

import gradio as gr

from fedclient import ImageBatch
from fedclient.client import Defense
from fedclient.errors import LabInputError
from labui import engines, inputs, session
from labui.image_view import IMAGE_KEYS, DlgView
from labui.inputs import (
    DEFAULT_IMAGE_ITERATIONS,
    DEFAULT_RACE_ITERATIONS,
    DEVICE,
    SWEEP_BUDGET_S,
    TIME_BUDGET_S,
    DefenseSettings,
)
from labui.jobs import Tick
from labui.session import (
    face,
    forget_session,
    lock_run,
    release_memory,
    session_of,
    stopped_for,
    stopping_for,
    unlock_run,
)
from labui.stream import (
    PLOT_KEYS,
    URGENT_IMAGE,
    URGENT_TEXT,
    ModelReady,
    UpdateReady,
    emit,
    emit_plain,
    result_json,
    skips,
    stream_dager,
    stream_dlg,
)
from labui.sweep import run_defense_sweep
from labui.race_view import TEXT_DLG_KEYS, TextDlgView
from labui.text_view import TEXT_KEYS, DagerView
from labui.textmodel import check_lengths, model_name, model_note, normalize, task_choices, text_scorer, token_text
from labui.userfiles import purge_user_files, start_purger, user_files_dir, write_gif

if TYPE_CHECKING:  # pragma: no cover
    from fedclient.training import ClientTraining

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IMAGE_ITERATIONS", "DEFAULT_RACE_ITERATIONS", "SWEEP_BUDGET_S", "TIME_BUDGET_S", "URGENT_IMAGE",
    "URGENT_TEXT", "describe_defense", "face", "forget_session", "lock_run", "model_name", "model_note",
    "normalize", "prewarm", "purge_user_files", "release_memory", "run_defense_sweep", "run_image_attack",
    "run_text_attack", "run_text_baseline", "start_purger", "stopped_for", "stopping_for", "stream_dager",
    "stream_dlg", "task_choices", "text_scorer", "unlock_run", "user_files_dir", "write_gif",
]


def describe_defense(*settings: object) -> str:
    """One line about the panel's current defense (with DP's epsilon)."""
    from fedclient.defenses import describe

    try:
        return "**Shared update:** " + describe(DefenseSettings.from_inputs(*settings).build())
    except LabInputError as exc:
        return f"⚠️ {exc}"


def run_text_attack(sentences_text: str, model: str, hub_id: str | None, task: str, noise_tolerant: bool = False,
                    sigma: object = 0.0, dp: bool = False, clip: float = 1.0, z: float = 1.0, prune: float = 0.0,
                    precision: str = "fp32", fedavg_steps: int = 1, clients: int = 1,
                    client_setup: str = inputs.DEFAULT_CLIENT_SETUP,
                    request: gr.Request | None = None) -> Iterator[tuple]:
    """Gradio handler (``/dager``): the client shares its gradient; DAGER reconstructs; the app scores.

    ``client_setup`` is the "Client training" choice (:data:`labui.inputs.CLIENT_SETUPS`):
    LoRA, bf16 or dropout, built as the CLI's ``--client`` builds it.
    """
    t0 = time.perf_counter()
    sentences = inputs.parse_sentences(sentences_text)
    settings = DefenseSettings.from_inputs(sigma, dp, clip, z, prune, precision, fedavg_steps, clients)
    defense = settings.build()  # a bad setting is reported before anything runs
    training = inputs.client_training(client_setup)
    name = model_name(model, hub_id)
    job = session.JOBS.start(session_of(request), "text")
    # The worker starts before the first frame is sent: the client's update is
    # computed while Gradio delivers it, not after.
    items = job.run(functools.partial(_text_items, name, task, sentences, defense, training, noise_tolerant))
    loading = f"**Preparing:** loading {name} (only the first run of a model takes long)…"
    try:
        # The first frame clears the previous run's results at once (the plots show
        # their "waiting" state), so nothing stale is mistaken for this run's tokens.
        blank = DagerView().render()
        yield (loading, *(blank[k] for k in TEXT_KEYS[1:]), gr.skip())
        bundle = yield from _await_model(
            items, lambda: (f"{loading} ⏱ {time.perf_counter() - t0:.0f} s", *skips(len(TEXT_KEYS))))
        if bundle is None:
            return
        view = DagerView(
            references=sentences,
            token_text=functools.partial(token_text, bundle),
            special_ids=frozenset(int(i) for i in bundle.tokenizer.all_special_ids),
            normalize=functools.partial(normalize, bundle),
            model_note=model_note(bundle),
            scorer=text_scorer(bundle),
            noise_tolerant=bool(noise_tolerant),
            budget_s=TIME_BUDGET_S,
            t0=t0,
        )
        view.dirty -= PLOT_KEYS  # their waiting state is on screen since the first frame
        yield (*emit(view, TEXT_KEYS), result_json(view))
        yield from stream_dager(view, items, job=job)
    finally:
        items.close()
        release_memory()


def _text_items(name: str, task: str, sentences: list[str], defense: Defense | None, training: ClientTraining,
                noise_tolerant: bool) -> Iterator[object]:
    """The text run's worker: the model, the client's update, then DAGER's events."""
    bundle = engines.load_bundle(name, task)
    check_lengths(bundle, sentences)
    yield ModelReady(bundle)
    server = engines.server_bundle(bundle, training)  # LoRA: the base with the adapters merged
    batch = bundle.encode(sentences, seed=0)
    update = engines.compute_update(bundle.model, batch, parameters=engines.dager_parameters(bundle, training.dropout),
                                    defense=defense, seed=0, training=training)
    plain_utility = defense is not None and training.lora is None
    yield UpdateReady(engines.utility(bundle.model, batch, update) if plain_utility else None)
    yield from engines.dager_events(server, update, noise_tolerant=noise_tolerant, time_budget_s=TIME_BUDGET_S)


def _await_model(items: Iterator[object], waiting: Callable[[], tuple]) -> Generator[tuple, None, object | None]:
    """Until the worker has loaded the model, yield ``waiting()`` on every tick (Stop stays live).

    Returns:
        The model bundle (:class:`~labui.stream.ModelReady`), or ``None`` when the worker
        ended first (stopped).

    Raises:
        TypeError: the worker sent something else first.
    """
    for item in items:
        if isinstance(item, ModelReady):
            return item.bundle
        elif isinstance(item, Tick):
            yield waiting()
        else:
            raise TypeError(f"expected the model first, got a {type(item).__name__}")
    return None


WARM_UP_SENTENCES = ("The server warms up before the first visitor arrives.", "Nothing typed is used here.")


def prewarm(model: str) -> None:
    """Pay a first run's one-off costs before any visitor does (run at start-up in a thread).

    Loads ``model`` (the zoo caches it), computes one update and runs DAGER on two fixed
    sentences (tokenizer, autograd and linear-algebra first calls), and renders the
    text view once (plotly's validators, figure serialisation). Failures are logged,
    never raised: a cold first run is slower, not broken.
    """
    t0 = time.perf_counter()
    try:
        bundle = engines.load_bundle(model, "classification")
        batch = bundle.encode(list(WARM_UP_SENTENCES), seed=0)
        update = engines.compute_update(bundle.model, batch, parameters=engines.dager_parameters(bundle), seed=0)
        view = DagerView(token_text=functools.partial(token_text, bundle), references=WARM_UP_SENTENCES,
                         scorer=text_scorer(bundle), normalize=functools.partial(normalize, bundle))
        for event in engines.dager_events(bundle, update, time_budget_s=TIME_BUDGET_S):
            view.apply(event)
        for fig in view.render(["spectrum", "distances"]).values():
            fig.to_json()
    except Exception:  # noqa: BLE001 - a warm-up must never take the app down
        log.exception("prewarm of %s failed", model)
        return
    log.info("prewarm of %s done in %.1f s", model, time.perf_counter() - t0)
    release_memory()


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
    job = session.JOBS.start(session_of(request), "race")
    view = TextDlgView(references=sentences, budget_s=TIME_BUDGET_S)
    yield emit_plain(view, TEXT_DLG_KEYS)

    def produce() -> Iterator[object]:
        bundle = engines.load_bundle(name, task)
        check_lengths(bundle, sentences)
        yield ModelReady(bundle)
        batch = bundle.encode(sentences, seed=0)
        update = engines.compute_update(bundle.model, batch, defense=defense, seed=0)
        yield UpdateReady(None)
        yield from engines.text_baseline_events(bundle, update, n_iter, time_budget_s=TIME_BUDGET_S)

    items = job.run(produce)
    try:
        bundle = yield from _await_model(items, lambda: (view.render()["race_status"], gr.skip(), gr.skip()))
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
                yield emit_plain(view, TEXT_DLG_KEYS)
        yield emit_plain(view, TEXT_DLG_KEYS)
    finally:
        items.close()
        release_memory()


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
    view = DlgView(originals=images, labels=labels, budget_s=TIME_BUDGET_S, t0=t0, note=note)
    mixed = images.shape[0] * settings.clients
    if mixed > engines.DLG_MAX_BATCH:  # the defense wins before the attack starts: say so as a verdict
        yield (view.aggregation_verdict(settings.clients, mixed, engines.DLG_MAX_BATCH), *skips(len(IMAGE_KEYS)))
        return
    job = session.JOBS.start(session_of(request), "image")
    yield (*emit(view, IMAGE_KEYS, force=True), None)

    def produce() -> Iterator[object]:
        net = engines.vision_model(model)
        batch = ImageBatch(images=images.to(DEVICE), labels=labels.to(DEVICE))
        update = engines.compute_update(net, batch, defense=defense, seed=0)
        yield UpdateReady(engines.utility(net, batch, update) if defense is not None else None)
        yield from engines.dlg_events(net, update, method=method, iterations=n_iter, time_budget_s=TIME_BUDGET_S)

    items = job.run(produce)
    try:
        yield from stream_dlg(view, items, job=job)
    finally:
        items.close()
        release_memory()

