"""DLG: Deep Leakage from Gradients (Zhu et al., NeurIPS 2019) and its successors.

* :func:`iter_dlg` / :func:`run_dlg`: image reconstruction (DLG, iDLG, Geiping-style
  gradient matching) from a :class:`fedclient.SharedUpdate`, as an event stream.
* :func:`iter_dlg_text` / :func:`run_dlg_text`: DLG on text, the baseline raced
  against DAGER.
* :func:`build_model`, :func:`load_images`, :func:`evaluate_images`, :func:`save_gif`.
"""

from dlg.attack import METHODS, DlgConfig, gradient_distance, infer_labels, iter_dlg, run_dlg
from dlg.gif import save_gif
from dlg.images import MAX_IMAGES, load_images
from dlg.metrics import ImageScore, ImageScores, evaluate_images
from dlg.models import MODELS, build_model
from dlg.text import TextDlgConfig, iter_dlg_text, run_dlg_text

__all__ = [
    "MAX_IMAGES",
    "METHODS",
    "MODELS",
    "DlgConfig",
    "ImageScore",
    "ImageScores",
    "TextDlgConfig",
    "build_model",
    "evaluate_images",
    "gradient_distance",
    "infer_labels",
    "iter_dlg",
    "iter_dlg_text",
    "load_images",
    "run_dlg",
    "run_dlg_text",
    "save_gif",
]
