"""Files made from a visitor's data: where they go and when they are deleted.

Only Gradio's cache folder is written (the GIF, sweep thumbnails); :func:`purge_user_files`
and Gradio's ``delete_cache`` clean it on a schedule and at shutdown.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from labui.image_view import DlgView, to_grid

GIF_MAX_FRAMES = 60


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


def thumbnail(images: torch.Tensor) -> str:
    from PIL import Image

    fd, path = tempfile.mkstemp(prefix="gll-sweep-", suffix=".png", dir=user_files_dir())
    os.close(fd)
    Image.fromarray(to_grid(images, scale=1, pad=1)).save(path)
    return path


def shown_cell(shown: object) -> str:
    """A table cell: an inline thumbnail for an image path (the file is then deleted:
    the page holds the only copy), else the recovered text."""
    if isinstance(shown, str) and shown.endswith(".png") and os.path.isfile(shown):
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

