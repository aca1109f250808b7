"""Load the client's private images: any common format, mode and size -> (B, 3, 32, 32).

Files are checked before they are decoded: the pixel count is read from the header, so a
10000x10000 image is refused without allocating its pixels (a decompression bomb).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from fedclient.errors import EmptyBatchError, LabInputError

log = logging.getLogger(__name__)

MAX_IMAGES = 8
"""Largest batch of images the lab attacks."""

MAX_PIXELS = 40_000_000
"""Largest image (width x height) accepted: about 40 megapixels."""

# PIL's own guard (Image.MAX_IMAGE_PIXELS) is process-wide state: this module leaves it as
# the process has it and checks every image's size itself, per call (_open, _from_array),
# refusing anything over MAX_PIXELS with a clear message.

ImageSource = str | os.PathLike | bytes | Image.Image | np.ndarray | torch.Tensor
"""What :func:`load_images` accepts per image: a path, encoded bytes, a PIL image, an
``(H, W)``/``(H, W, C)`` array (uint8 0..255 or float 0..1) or a ``(C, H, W)`` tensor."""


class ImageInputError(LabInputError):
    """Base class of image input problems."""


class NotAnImageError(ImageInputError):
    """The file is not an image PIL can read."""


class TruncatedImageError(ImageInputError):
    """The image file is cut short or corrupt."""


class ImageTooLargeError(ImageInputError):
    """The image has more pixels than :data:`MAX_PIXELS`."""


class TooManyImagesError(ImageInputError):
    """More than :data:`MAX_IMAGES` images were given."""


class NoImagesError(ImageInputError, EmptyBatchError):
    """No image was given."""


def _label(source: object, index: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"Image {index + 1} ({Path(source).name})"
    return f"Image {index + 1}"


def _open(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    """Open, check the header size, then fully decode one encoded image."""
    if isinstance(source, (bytes, bytearray)):
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise NotAnImageError(f"{name} does not exist or is not a file: check the path.")
        stream = path
    try:
        with warnings.catch_warnings():  # we refuse large images ourselves, just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)  # reads the header only
    except UnidentifiedImageError:
        raise NotAnImageError(
            f"{name} is not an image PIL can read: use a PNG, JPEG, GIF, BMP or WebP file."
        ) from None
    except Image.DecompressionBombError:
        raise ImageTooLargeError(
            f"{name} is far too large to decode safely: use an image under "
            f"{MAX_PIXELS // 1_000_000} megapixels."
        ) from None
    except OSError as exc:
        raise NotAnImageError(f"{name} could not be read ({exc.__class__.__name__}): use another file.") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} pixels ({width * height / 1e6:.0f} megapixels); images "
            f"over {MAX_PIXELS // 1_000_000} megapixels are refused: downscale it first."
        )
    if width == 0 or height == 0:
        raise NotAnImageError(f"{name} has no pixels: use another file.")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError):
        raise TruncatedImageError(
            f"{name} is truncated or corrupt (the file ends before the image data does): "
            "re-export or re-download it."
        ) from None
    return img


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ImageInputError(
            f"{name} has array shape {a.shape}; give (H, W), (H, W, 3) or (H, W, 4) pixels."
        )
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise ImageTooLargeError(
            f"{name} has {a.shape[0] * a.shape[1] / 1e6:.0f} megapixels; images over "
            f"{MAX_PIXELS // 1_000_000} megapixels are refused: downscale it first."
        )
    if a.size == 0:
        raise ImageInputError(f"{name} has no pixels.")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ImageInputError(f"{name} contains NaN or infinite pixels.")
        a = np.clip(a, 0.0, 1.0) * 255.0 if a.max() <= 1.0 else np.clip(a, 0.0, 255.0)
    return Image.fromarray(np.ascontiguousarray(a).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto white.

    Grayscale, palette, CMYK, 16-bit and alpha images all come out as 8-bit RGB. EXIF
    orientation is applied, so photos appear the right way up.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        span = a.max() - a.min()
        a = (a - a.min()) / span * 255.0 if span > 0 else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def prepare(img: Image.Image, size: int = 32) -> torch.Tensor:
    """Centre-crop to a square, resize to ``size`` and convert to a ``(3, size, size)`` tensor."""
    rgb = to_rgb(img)
    square = ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    a = np.asarray(square, dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()  # (3, H, W)


def load_image(source: ImageSource, *, size: int = 32, index: int = 0) -> torch.Tensor:
    """Load one image as a ``(3, size, size)`` float tensor in ``[0, 1]``.

    Raises:
        NotAnImageError, TruncatedImageError, ImageTooLargeError, ImageInputError.
    """
    name = _label(source, index)
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > MAX_PIXELS:
            raise ImageTooLargeError(
                f"{name} is {w}x{h} pixels; images over {MAX_PIXELS // 1_000_000} megapixels "
                "are refused: downscale it first."
            )
        img = source
    elif isinstance(source, torch.Tensor):
        img = _from_array(source.detach().cpu().numpy(), name)
    elif isinstance(source, np.ndarray):
        img = _from_array(source, name)
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        img = _open(source, name)
    else:
        raise ImageInputError(f"{name} is a {type(source).__name__}; give a file path, bytes or a PIL image.")
    return prepare(img, size)


def load_images(sources: Sequence[ImageSource], *, size: int = 32) -> torch.Tensor:
    """Load a batch of 1 to :data:`MAX_IMAGES` images as ``(B, 3, size, size)`` in ``[0, 1]``.

    Args:
        sources: paths, encoded bytes, PIL images or arrays (see :data:`ImageSource`).
        size: the model's input side (32 for the lab's models).

    Returns:
        The batch, float32.

    Raises:
        NoImagesError: no image was given.
        TooManyImagesError: more than :data:`MAX_IMAGES`.
        NotAnImageError, TruncatedImageError, ImageTooLargeError: a bad image, named
            by its position (and file name).
    """
    if isinstance(sources, (str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor)):
        sources = [sources]  # one image given on its own
    items = list(sources)
    if not items:
        raise NoImagesError("No image was given: add at least one image (up to 8).")
    if len(items) > MAX_IMAGES:
        raise TooManyImagesError(
            f"{len(items)} images were given; the attack handles at most {MAX_IMAGES}: remove "
            f"{len(items) - MAX_IMAGES}."
        )
    return torch.stack([load_image(s, size=size, index=i) for i, s in enumerate(items)])


def tile_images(images: torch.Tensor, *, scale: int = 4, pad: int = 2, margin: int = 0) -> np.ndarray:
    """Tile a ``(B, C, H, W)`` batch in ``[0, 1]`` side by side on white, upscaled (nearest).

    The one tiling of the lab: the app's previews (:func:`to_grid`) and the GIF frames
    (:func:`dlg.gif.frame_to_array`, with a margin) both use it.

    Args:
        images: the batch; one channel is shown as grey.
        scale: nearest-neighbour upscaling factor.
        pad: white columns between images.
        margin: white border around the row.

    Returns:
        ``(scale*H + 2 margin, B scale*W + (B-1) pad + 2 margin, 3)`` uint8 pixels.
    """
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # (B, 3, sH, sW)
    b, _, h, w = x.shape
    canvas = torch.ones(3, h + 2 * margin, b * w + (b - 1) * pad + 2 * margin)
    for i in range(b):
        left = margin + i * (w + pad)
        canvas[:, margin : margin + h, left : left + w] = x[i]
    return (canvas.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def to_grid(images: torch.Tensor, *, scale: int = 4, pad: int = 2) -> np.ndarray:
    """``(B, C, H, W)`` in [0, 1] -> one ``(H', W', 3)`` uint8 row, upscaled (nearest), no border."""
    return tile_images(images, scale=scale, pad=pad)

