"""What a visitor types, checked: limits, parsing and the defense panel's settings.

Every check raises a :class:`~fedclient.errors.LabInputError` subclass whose message is
one sentence saying what to change; the face (:func:`labui.handlers.face`) turns them
into ``gr.Error``. Nothing here imports gradio, and nothing typed is logged.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedclient.errors import LabInputError, UnknownModelError

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"

# -- limits (the CPU Space is the reference machine) ----------------------------
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
MAX_SENTENCES = 32 if ON_GPU else 16
MAX_SENTENCE_CHARS = 300
MAX_SENTENCE_TOKENS = 64
MAX_ITERATIONS = 2000 if ON_GPU else 500
MAX_IMAGE_SIDE = 4096
NUM_CLASSES = 100
IMAGE_SHAPE = (3, 32, 32)

# -- the app's run defaults (one place: the DLG defaults are tuned for a lesson) --------
TIME_BUDGET_S = float(os.environ.get("GLL_TIME_BUDGET_S", "60"))
"""Per-run cap in seconds (passed to the engines as ``time_budget_s``): a visitor waits
at most this long behind another visitor's run of the same kind."""
SWEEP_BUDGET_S = float(os.environ.get("GLL_SWEEP_BUDGET_S", "180"))
"""Cap of a whole sweep; each setting gets an equal share."""
DEFAULT_RACE_ITERATIONS = 10
"""The DLG text race's default. Each Adam step differentiates a gradient through the
whole model (seconds per step on gpt2-small-random on the 2-core CPU; 200 steps took
tens of minutes), so the default is the slider's minimum and the run is capped at
:data:`TIME_BUDGET_S`; the status shows an estimate from the rate seen."""
DEFAULT_IMAGE_ITERATIONS = 100
"""The image tab's iteration slider starts here."""

SWEEPS = {"noise σ": "noise", "prune fraction": "prune", "DP-SGD noise multiplier": "dp", "precision": "precision"}
"""Sweep axes offered in the panel (label -> :func:`fedclient.sweep.grid` name)."""

FALLBACK_SENTENCES = {
    "everyday": "The patient was prescribed a low dose of insulin.\n"
    "My password is the name of my first dog.\n"
    "We will meet at the station at nine.\n"
    "Her salary rose by twelve percent this year.",
}


class FormInputError(LabInputError):
    """A value typed or chosen in the app's form cannot be used."""


class UnknownChoiceError(FormInputError):
    """A mode value (image source, sweep target, ...) is not one the app offers."""


class HubIdError(UnknownModelError):
    """The hub-id box holds something that is not a Hugging Face model id."""


# -- text ---------------------------------------------------------------------------


def parse_sentences(text: str | None) -> list[str]:
    """One sentence per non-empty line, within the app's limits.

    Raises:
        FormInputError: no sentences, too many, or one too long.
    """
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        raise FormInputError("Type at least one sentence (one per line), or pick a sample set.")
    if len(lines) > MAX_SENTENCES:
        raise FormInputError(f"{len(lines)} sentences given; this machine attacks at most {MAX_SENTENCES} "
                             "at once. Remove some lines.")
    for i, line in enumerate(lines, 1):
        if len(line) > MAX_SENTENCE_CHARS:
            raise FormInputError(f"Sentence {i} has {len(line)} characters; keep each under "
                                 f"{MAX_SENTENCE_CHARS} (split it into several lines).")
    return lines


# A hub id is ``owner/name`` (letters, digits, '-', '_', '.'; no leading dot, no '..'),
# as the Hub itself allows. Anything else (an absolute path, '../x', 'C:\\x', a bare
# folder name) is refused here, before any code looks at the filesystem: local model
# folders are a CLI feature, and a public Space must not answer questions about its disk.
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")


def parse_hub_id(text: str | None) -> str | None:
    """The hub id typed in the model box, or None when the box is empty.

    Raises:
        HubIdError: the text is not of the form ``owner/name``.
    """
    value = (text or "").strip()
    if not value:
        return None
    if not _HUB_ID.fullmatch(value) or ".." in value or value.endswith((".", "-")):
        raise HubIdError("The model box takes a Hugging Face model id of the form owner/name "
                         "(e.g. openai-community/gpt2); local folders work only with the command-line tool.")
    return value


def check_task(task: str, *, model_type: str | None, tasks: Sequence[str]) -> None:
    """Refuse a task the model's family cannot do, before anything runs.

    Raises:
        UnknownChoiceError: the task is not offered for this model.
    """
    if task not in tasks:
        family = f"a {model_type} model" if model_type else "this model"
        raise UnknownChoiceError(f"{family.capitalize()} supports {', '.join(tasks)}, not {task!r}: "
                                 "choose another task or model.")


# -- numbers ------------------------------------------------------------------------


def iterations(value: float | None) -> int:
    """The iteration slider's value as a whole number within the machine's limit.

    Raises:
        FormInputError: out of range.
    """
    try:
        n = int(value or 0)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= MAX_ITERATIONS:
        raise FormInputError(f"Iterations must be between 1 and {MAX_ITERATIONS} on this machine.")
    return n


def class_label(label: float | None) -> int:
    """The class label typed in the image tab.

    Raises:
        FormInputError: the label is not a whole number in range.
    """
    try:
        value = int(label)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = -1
    if value != label or not 0 <= value < NUM_CLASSES:
        raise FormInputError(f"The class label must be a whole number from 0 to {NUM_CLASSES - 1}.")
    return value


def client_labels(label: float | None, batch_size: int) -> torch.Tensor:
    """The client's labels: ``label`` for the first image, the next classes for the rest.

    Raises:
        FormInputError: the label is not a whole number in range.
    """
    return (class_label(label) + torch.arange(batch_size)) % NUM_CLASSES


def _number(value: object, what: str, *, example: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        x = float(value)
    else:
        text = str(value if value is not None else "").strip()
        try:
            x = float(text) if text else 0.0
        except ValueError:
            raise FormInputError(f"{what} must be a number such as {example}; {text[:20]!r} is not one.") from None
    if not math.isfinite(x):
        raise FormInputError(f"{what} must be a finite number such as {example}.")
    return x


# -- defenses -----------------------------------------------------------------------


@dataclass(frozen=True)
class DefenseSettings:
    """The defense panel's values (one field per control, in the panel's order).

    The Gradio endpoints keep receiving the eight values as separate inputs (so the
    ``/dager``, ``/dlg`` and ``/dlg_text`` signatures stay as they are);
    :meth:`from_inputs` gathers them and :meth:`build` makes the fedclient defense.

    Attributes:
        sigma: Gaussian noise standard deviation (0: off); typed values arrive as text.
        dp: DP-SGD on (per-example clipping and noise).
        clip: DP-SGD clip norm C.
        z: DP-SGD noise multiplier.
        prune: fraction of smallest entries zeroed (0: off).
        precision: ``"fp32"`` (off), ``"fp16"`` or ``"int8"``.
        fedavg_steps: local steps; 1 is FedSGD.
        clients: secure-aggregation clients; 1 is off.
    """

    sigma: float = 0.0
    dp: bool = False
    clip: float = 1.0
    z: float = 1.0
    prune: float = 0.0
    precision: str = "fp32"
    fedavg_steps: int = 1
    clients: int = 1

    @classmethod
    def from_inputs(cls, *values: object) -> DefenseSettings:
        """From the panel's eight values (none given: everything off).

        Raises:
            FormInputError: a value is not a number (e.g. sigma ``abc``).
        """
        if not values:
            return cls()
        if len(values) != 8:
            raise FormInputError(f"The defense panel sends 8 values, got {len(values)}.")
        sigma, dp, clip, z, prune, precision, steps, clients = values
        return cls(
            sigma=_number(sigma, "The noise σ", example="0.001"),
            dp=bool(dp),
            clip=_number(clip, "The DP clip norm C", example="1.0"),
            z=_number(z, "The DP noise multiplier z", example="1.0"),
            prune=_number(prune, "The prune fraction", example="0.3"),
            precision=str(precision or "fp32"),
            fedavg_steps=int(_number(steps if steps is not None else 1, "FedAvg local steps", example="3")),
            clients=int(_number(clients if clients is not None else 1, "The number of clients", example="4")),
        )

    def build(self) -> object | None:
        """The client-side defense (None when every control is off).

        Raises:
            FormInputError: DP-SGD and FedAvg both on.
            LabInputError: a value the defense itself refuses (its message says which).
        """
        from fedclient import defenses as dfn

        if self.dp and self.fedavg_steps > 1:
            raise FormInputError("DP-SGD and FedAvg both change how the update is computed: pick one.")
        if self.precision not in ("fp32", "fp16", "int8"):
            raise UnknownChoiceError(f"Unknown precision {self.precision!r}; choose fp32, fp16 or int8.")
        computing = None
        if self.dp:
            computing = dfn.DPSGD(clip_norm=self.clip, noise_multiplier=self.z)
        elif self.fedavg_steps > 1:
            computing = dfn.FedAvg(local_steps=self.fedavg_steps)
        return dfn.compose(
            computing,
            dfn.GaussianNoise(self.sigma) if self.sigma != 0 else None,
            dfn.Prune(self.prune) if self.prune != 0 else None,
            dfn.Quantize(self.precision) if self.precision != "fp32" else None,
            dfn.SecureAggregation(clients=self.clients) if self.clients > 1 else None,
        )

    @property
    def active(self) -> bool:
        """Whether any control is on."""
        return self != DefenseSettings(clip=self.clip, z=self.z)


# -- images -------------------------------------------------------------------------


def sketch_array(sketch: object) -> np.ndarray | None:
    """The composite of a Sketchpad value (None when nothing was drawn)."""
    if sketch is None:
        return None
    comp = sketch.get("composite") if isinstance(sketch, dict) else sketch
    if comp is None:
        return None
    arr = np.asarray(comp)
    if arr.ndim == 3 and arr.shape[2] == 4:  # flatten transparency onto white
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3].astype(np.float32) * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    if arr.size == 0 or (arr.min() == arr.max()):
        return None  # an empty canvas
    return arr


def file_paths(files: object) -> list[str]:
    """File paths from a file component value (paths, file objects or dicts)."""
    if files is None:
        return []
    items = files if isinstance(files, (list, tuple)) else [files]
    paths = []
    for item in items:
        path = item.get("path") if isinstance(item, dict) else getattr(item, "name", item)
        if path:
            paths.append(str(path))
    return paths


IMAGE_SOURCES = ("upload", "sketch", "batch")


def load_client_image(source: str, upload: object, sketch: object, batch_files: object = None) -> torch.Tensor:
    """The client's private images as ``(B, 3, 32, 32)`` in [0, 1]: one from the upload or
    sketchpad, or 1 to 8 from the batch files.

    Raises:
        FormInputError: nothing given, or an absurd size.
        UnknownChoiceError: an image source the app does not offer.
        ImageInputError: an unreadable file (from :mod:`dlg.images`, naming the file).
    """
    from dlg.images import load_images

    if source == "batch":
        paths = file_paths(batch_files)
        if not paths:
            raise FormInputError("The batch is empty: add 1 to 8 image files, or press 'Use the sample images'.")
        return load_images(paths)
    elif source == "sketch":
        value = sketch_array(sketch)
        if value is None:
            raise FormInputError("The sketchpad is empty: draw something, or switch the source to 'upload'.")
        return load_images([value])
    elif source == "upload":
        value = upload
        if value is None:
            raise FormInputError("No image yet: upload one, pick a sample below, or switch the source to 'sketch'.")
        if isinstance(value, np.ndarray) and max(value.shape[:2]) > MAX_IMAGE_SIDE:
            raise FormInputError(f"The image is {value.shape[1]}x{value.shape[0]} pixels; use one under "
                                 f"{MAX_IMAGE_SIDE} pixels a side.")
        paths = file_paths(value) if isinstance(value, (str, dict)) or hasattr(value, "name") else []
        return load_images(paths if paths else [value])  # the library names what is wrong with a file
    else:
        raise UnknownChoiceError(f"Unknown image source {source!r}; choose one of {', '.join(IMAGE_SOURCES)}.")


def input_note(source: str, upload: object, batch_files: object) -> str | None:
    """A sentence about how the images were read, e.g. that an animated GIF's first frame
    was used (None when there is nothing to say)."""
    from PIL import Image

    if source == "batch":
        paths = file_paths(batch_files)
    elif source == "upload":
        paths = file_paths(upload) if isinstance(upload, (str, dict)) else []
    elif source == "sketch":
        paths = []  # drawn here: no file to say anything about
    else:
        raise UnknownChoiceError(f"Unknown image source {source!r}; choose one of {', '.join(IMAGE_SOURCES)}.")
    animated = []
    for i, path in enumerate(paths, 1):
        try:
            with Image.open(path) as img:
                if getattr(img, "n_frames", 1) > 1:
                    animated.append(i)
        except (OSError, ValueError):
            continue  # unreadable files were already refused by load_client_image
    if not animated:
        return None
    which = "The image" if len(paths) == 1 else "Image " + ", ".join(str(i) for i in animated)
    return f"ℹ️ {which} is animated: the attack used its first frame."


# -- assets -------------------------------------------------------------------------


def sentence_sets() -> dict[str, str]:
    """Sample sentence sets: ``assets/sentences/*.txt`` (name -> text), or a fallback."""
    folder = ASSETS / "sentences"
    sets: dict[str, str] = {}
    if folder.is_dir():
        for path in sorted(folder.glob("*.txt")):
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()
                     if ln.strip() and not ln.lstrip().startswith("#")]
            if lines and all(len(ln) <= MAX_SENTENCE_CHARS for ln in lines[:8]):  # documents are CLI-sized
                sets[path.stem.replace("_", " ")] = "\n".join(lines[:8])
    return sets or dict(FALLBACK_SENTENCES)


def sample_images() -> list[str]:
    """The sample images' paths (``assets/images``)."""
    folder = ASSETS / "images"
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")]


def vision_models() -> list[str]:
    """The image models :mod:`dlg.models` builds."""
    from dlg.models import MODELS

    return list(MODELS)


def how_it_works() -> str:
    """The "How it works" tab's Markdown (``assets/how_it_works.md``)."""
    return (ASSETS / "how_it_works.md").read_text(encoding="utf-8")


__all__ = [
    "DefenseSettings",
    "FormInputError",
    "HubIdError",
    "UnknownChoiceError",
    "class_label",
    "client_labels",
    "iterations",
    "load_client_image",
    "parse_hub_id",
    "parse_sentences",
]


# -- the client's training setup (issue 11) ---------------------------------------------

CLIENT_SETUPS: dict[str, str] = {
    "plain: full gradient, fp32, no dropout": "",
    "LoRA r=256 (adapters only)": "lora:r=256",
    "LoRA r=16 (adapters only)": "lora:r=16",
    "bf16 client": "bf16",
    "dropout p=0.1 (train mode)": "dropout:p=0.1",
}
"""The text tab's "Client training" choices -> the CLI's ``--client`` spec (one vocabulary)."""

DEFAULT_CLIENT_SETUP = next(iter(CLIENT_SETUPS))


def client_training(choice: str | None):  # noqa: ANN201 (fedclient.training.ClientTraining)
    """The setup a "Client training" choice names (the CLI's ``parse_client`` builds it).

    Raises:
        FormInputError: the choice is not one the app offers.
    """
    from fedclient.training import parse_client

    if choice is None or choice == "":
        choice = DEFAULT_CLIENT_SETUP
    if choice in CLIENT_SETUPS:
        spec = CLIENT_SETUPS[choice]
        return parse_client([spec] if spec else [])
    else:
        raise UnknownChoiceError(f"Unknown client training {choice!r}: choose one of {', '.join(CLIENT_SETUPS)}.")
