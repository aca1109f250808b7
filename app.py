"""Gradient Leakage Lab: the Gradio face (placeholder until the app lands)."""

from __future__ import annotations

import gradio as gr


def build_app() -> gr.Blocks:
    with gr.Blocks(title="Gradient Leakage Lab", analytics_enabled=False) as demo:
        gr.Markdown("# Gradient Leakage Lab\nThe interactive attacks are being built.")
    return demo


if __name__ == "__main__":
    build_app().launch()
