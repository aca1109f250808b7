"""The app's rendering layer: pure functions from attack events to display values.

``app.py`` builds the Gradio Blocks and wires handlers; this package turns the typed
events of :mod:`dager.events` and :mod:`dlg.events` into plotly figures, HTML and
Markdown. Nothing here runs an attack, and an unknown event type raises, so a new
event cannot be silently dropped (the smolagents pattern).
"""

from labui.image_view import DlgView
from labui.race_view import TextDlgView
from labui.text_view import DagerView

__all__ = ["DagerView", "DlgView", "TextDlgView"]
