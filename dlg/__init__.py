"""DLG: Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and its successors.

* :func:`iter_dlg` / :func:`run_dlg`: image reconstruction (DLG, iDLG, Geiping-style
  gradient matching) from a :class:`fedclient.SharedUpdate`, as an event stream.
* :func:`iter_dlg_text` / :func:`run_dlg_text`: DLG on text, the baseline raced
  against DAGER.
* :func:`build_model`, :func:`load_images`, :func:`evaluate_images`, :func:`save_gif`.
* :func:`lesson_config`: the app's lesson-sized settings.

Modules: ``config`` (settings), ``objective`` (distances, priors), ``labels`` (iDLG's
analytic labels), ``lbfgs`` (the optimizer), ``optimize`` (one restart's problem),
``attack`` (the event stream), ``presets``, ``text``, ``events``, ``metrics``,
``models``, ``images``, ``gif``, ``cli``.
"""

# Exports load lazily (PEP 562): importing the package pulls in no torch, so a
# command line can check its arguments, and set the CPU thread policy, before torch loads.
from __future__ import annotations

from typing import TYPE_CHECKING

from fedclient.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "MAX_IMAGES": "dlg.images",
    "METHODS": "dlg.config",
    "MODELS": "dlg.models",
    "DlgConfig": "dlg.config",
    "ImageScore": "dlg.metrics",
    "ImageScores": "dlg.metrics",
    "TextDlgConfig": "dlg.text",
    "build_model": "dlg.models",
    "evaluate_images": "dlg.metrics",
    "gradient_distance": "dlg.objective",
    "infer_labels": "dlg.labels",
    "iter_dlg": "dlg.attack",
    "iter_dlg_text": "dlg.text",
    "lesson_config": "dlg.presets",
    "load_images": "dlg.images",
    "run_dlg": "dlg.attack",
    "run_dlg_text": "dlg.text",
    "save_gif": "dlg.gif",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from dlg.images import MAX_IMAGES, load_images
    from dlg.attack import iter_dlg, run_dlg
    from dlg.config import METHODS, DlgConfig
    from dlg.labels import infer_labels
    from dlg.objective import gradient_distance
    from dlg.models import MODELS, build_model
    from dlg.metrics import ImageScore, ImageScores, evaluate_images
    from dlg.presets import lesson_config
    from dlg.text import TextDlgConfig, iter_dlg_text, run_dlg_text
    from dlg.gif import save_gif

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
