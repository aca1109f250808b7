"""Export the reconstruction over iterations as an animated GIF."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dlg.images import tile_images

log = logging.getLogger(__name__)


def frame_to_array(images: torch.Tensor, *, scale: int = 4, pad: int = 2) -> np.ndarray:
    """Tile a ``(B, C, H, W)`` batch in ``[0, 1]`` side by side, upscaled (nearest).

    Returns:
        ``(scale*H + 2 pad, B (scale*W + pad) + pad, 3)`` uint8 pixels on white.
    """
    return tile_images(images, scale=scale, pad=pad, margin=pad)


def save_gif(
    frames: Sequence[tuple[int, torch.Tensor]],
    path: str | os.PathLike,
    *,
    scale: int = 4,
    duration_ms: int = 100,
    hold_last_ms: int = 1500,
) -> None:
    """Write frames ``(iteration, (B, C, H, W) images)`` as a looping animated GIF.

    Args:
        frames: the frames, in order (e.g. :attr:`dlg.events.DlgResult.frames`).
        path: the output file.
        scale: nearest-neighbour upscaling factor (32x32 becomes 128x128 at 4).
        duration_ms: display time of each frame.
        hold_last_ms: display time of the last frame, so the result can be seen.

    Raises:
        ValueError: when there are no frames.
    """
    if not frames:
        raise ValueError("no frames to write")
    pictures = [Image.fromarray(frame_to_array(img, scale=scale)) for _, img in frames]
    durations = [duration_ms] * len(pictures)
    durations[-1] = max(duration_ms, hold_last_ms)
    pictures[0].save(
        path,
        save_all=True,
        append_images=pictures[1:],
        duration=durations,
        loop=0,
        optimize=False,
    )
    log.debug("wrote %d frames to %s", len(pictures), path)
