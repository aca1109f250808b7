"""Gradio components the app adjusts (the face's package may import gradio)."""

from __future__ import annotations

import gradio as gr

from gradio.events import Dependency

class UndecodedImage(gr.Image):
    """An image input that hands the handler the uploaded file's path, undecoded.

    ``gr.Image`` opens every upload with PIL before the handler runs, so a text file
    renamed ``.png`` failed inside Gradio with a bare "Error". Passing the path on lets
    :func:`dlg.images.load_images` read it and say what is wrong (not an image,
    truncated, too large), exactly as the batch uploader does. Pasted images (data
    URLs) and numpy values keep Gradio's own handling.
    """

    is_template = True  # rendered by the frontend's own Image component (see Block.get_block_name)

    def preprocess(self, payload):  # noqa: ANN001, ANN201 - Gradio's signature
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        path = getattr(payload, "path", None)
        if path and not url.startswith("data:"):
            return str(path)
        return super().preprocess(payload)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component