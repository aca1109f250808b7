"""The app's access to the attack engines and models (one place, so tests can swap them).

Handlers call these through the module (``engines.dager_events(...)``), so a test
monkeypatches :mod:`labui.engines` once and every handler, the sweep included, sees
the stand-in. Nothing here formats anything for the page.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from dager.zoo import load_model
from fedclient import compute_update
from labui.inputs import DEVICE, IMAGE_SHAPE, NUM_CLASSES

DLG_MAX_BATCH = 8
"""The largest batch DLG reconstructs (``dlg.attack.MAX_BATCH``; a test keeps them equal):
a securely aggregated update mixes every client's images, so past this the attack
cannot start."""

__all__ = ["DLG_MAX_BATCH", "compute_update", "dager_events", "dager_parameters", "dlg_events", "load_bundle",
           "server_bundle",
           "load_model", "text_baseline_events", "utility", "vision_model"]


def dager_events(bundle, update, *, noise_tolerant: bool = False,  # noqa: ANN001
                 time_budget_s: float | None = None) -> Iterator[object]:
    """The DAGER event stream for a shared update (monkeypatched in handler tests)."""
    from dager.attack import iter_dager
    from dager.config import DagerConfig

    config = DagerConfig(device=DEVICE, noise_tolerant=bool(noise_tolerant), time_budget_s=time_budget_s)
    return iter_dager(bundle, update, config=config)


def dager_parameters(bundle, dropout: bool = False) -> list[str]:  # noqa: ANN001
    """The parameter names DAGER reads (the client shares only those: faster); a client
    training with dropout also shares block 0's attention output projection."""
    from dager.attack import required_parameters

    return list(required_parameters(bundle, dropout=dropout))


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

    # A frame every iteration, throttled in time by the engine: smooth previews and GIFs.
    config = lesson_config(method=method, batch_size=int(update.batch_size), iterations=iterations,
                           time_budget_s=time_budget_s, image_shape=IMAGE_SHAPE)
    return iter_dlg(model, update, config=config)


def server_bundle(bundle, training):  # noqa: ANN001, ANN201
    """What the server holds for this client setup (checked against the model first).

    The bundle itself, or for a LoRA client the base model with the seeded adapters
    merged, which the attack reads: the CLIs' :func:`labcli.training.prepare_client`.

    Raises:
        fedclient.errors.InvalidConfigError: r too large, or a precision this device cannot run.
    """
    import dataclasses

    from labcli.training import prepare_client

    merged = prepare_client(training, bundle.model, device=DEVICE)
    return bundle if merged is None else dataclasses.replace(bundle, model=merged)


@functools.cache
def vision_model(name: str) -> torch.nn.Module:
    """The image model, built once per name (seeded, shared read-only by all users)."""
    from dlg.models import build_model

    return build_model(name, num_classes=NUM_CLASSES, seed=0).to(DEVICE)


def load_bundle(name: str, task: str):  # noqa: ANN201
    """The text model (cached by :func:`dager.zoo.load_model`)."""
    return load_model(name, task, device=DEVICE)


def utility(model: torch.nn.Module, batch: object, update: object) -> dict[str, float]:
    """How much of its direction a defended update kept (:func:`fedclient.defenses.utility_cost`)."""
    from fedclient.defenses import utility_cost

    return utility_cost(model, batch, update)

