"""The objective of gradient inversion: gradient distances, image priors, the dummy gradient.

Pure maths with shape comments; no optimisation and no events here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedclient.batch import ImageBatch
from fedclient.client import batch_loss

DISTANCES = ("l2", "cosine", "l2_layer", "cosine_layer")
"""Gradient distances: DLG's squared L2, Geiping et al.'s cosine, and their per-layer variants."""

TINY_NORM = 1e-20
"""Floor of a norm product in the cosine distances (a zero gradient gives distance 1)."""

TINY_SQUARED_NORM = 1e-30
"""Floor of a layer's squared norm in the per-layer L2 distance."""

TV_SMOOTHING = 1e-4
"""``eps`` of the smooth total variation ``sqrt(d^2 + eps)``."""


def gradient_distance(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], kind: str = "l2"
) -> torch.Tensor:
    """Distance between two gradients given as ``name -> tensor`` mappings.

    ``"l2_layer"`` and ``"cosine_layer"`` are the per-layer variants (each parameter
    tensor weighted equally). ``"l2"`` is DLG's objective (Zhu et al. 2019, eq. 4): the squared Euclidean
    distance summed over all parameters. ``"cosine"`` is Geiping et al.'s (2020, eq. 4):
    one minus the cosine similarity of the two gradients flattened into one vector, which
    ignores the gradient's magnitude and so is robust to the learning-rate-like scale of
    an update. Both are zero when ``a`` equals ``b``.

    Args:
        a: the dummy gradient; must hold every name in ``b``.
        b: the target (shared) gradient.
        kind: ``"l2"`` or ``"cosine"``.

    Returns:
        A scalar tensor (differentiable in ``a``).

    Raises:
        ValueError: for an unknown ``kind`` or mismatched shapes.
    """
    names = list(b)
    for n in names:
        if a[n].shape != b[n].shape:
            raise ValueError(f"gradient {n!r} has shape {tuple(a[n].shape)} vs {tuple(b[n].shape)}")
    if kind == "l2":
        # sum_l ||a_l - b_l||^2 over every parameter tensor l
        return sum(((a[n] - b[n]) ** 2).sum() for n in names)  # type: ignore[return-value]
    if kind == "l2_layer":
        # sum_l ||a_l - b_l||^2 / ||b_l||^2: every parameter tensor counts equally
        return sum(  # type: ignore[return-value]
            ((a[n] - b[n]) ** 2).sum() / (b[n] ** 2).sum().clamp_min(TINY_SQUARED_NORM) for n in names
        )
    if kind == "cosine_layer":
        # mean over parameter tensors of 1 - cos(a_l, b_l): every layer counts equally
        terms = [
            1.0 - (a[n] * b[n]).sum() / (a[n].norm() * b[n].norm()).clamp_min(TINY_NORM)
            for n in names
        ]
        return sum(terms) / len(terms)  # type: ignore[return-value]
    if kind == "cosine":
        dot = sum((a[n] * b[n]).sum() for n in names)  # <a, b> over all parameters
        norm_a = sum((a[n] ** 2).sum() for n in names).sqrt()  # ||a||
        norm_b = sum((b[n] ** 2).sum() for n in names).sqrt()  # ||b||
        return 1.0 - dot / (norm_a * norm_b).clamp_min(TINY_NORM)  # type: ignore[union-attr]
    raise ValueError(
        f"unknown gradient distance {kind!r}; use 'l2', 'cosine', 'l2_layer' or 'cosine_layer'"
    )


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation (mean absolute neighbour difference) of ``(B, C, H, W)``."""
    dx = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean()  # horizontal neighbours
    dy = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().mean()  # vertical neighbours
    return dx + dy


def smooth_total_variation(x: torch.Tensor, eps: float = TV_SMOOTHING) -> torch.Tensor:
    """Differentiable total variation: mean of ``sqrt(d^2 + eps)`` over neighbour differences.

    Smooth (unlike :func:`total_variation`), so L-BFGS's line search handles it.
    """
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    return (dx * dx + eps).sqrt().mean() + (dy * dy + eps).sqrt().mean()


def dummy_gradient(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The gradient the dummy batch produces under the client's loss, with a graph."""
    loss = batch_loss(model, ImageBatch(images=images, labels=labels))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    return dict(zip(params, grads))

