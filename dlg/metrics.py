"""Evaluation of image reconstructions (it sees the ground truth; the attacker never does).

MSE and PSNR on pixels in ``[0, 1]``, SSIM from scikit-image, and label accuracy. The
attacker cannot know which reconstruction belongs to which client image (a batch's order
is not in its gradient), so reconstructions are paired with references by a best-match
assignment (the Hungarian algorithm on MSE) before scoring, as is standard in the
gradient-inversion literature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity

MAX_PSNR = 100.0
"""PSNR reported for a perfect reconstruction (MSE 0), instead of infinity."""


@dataclass(frozen=True)
class ImageScore:
    """Scores of one reference image and the reconstruction matched to it.

    Attributes:
        index: the reference image's position in the client's batch.
        matched: the position of the matched reconstruction.
        mse: mean squared error on ``[0, 1]`` pixels.
        psnr: peak signal-to-noise ratio in dB (peak 1.0).
        ssim: structural similarity in ``[-1, 1]`` (1 = identical).
        label_correct: whether the matched reconstruction's label equals the reference's.
    """

    index: int
    matched: int
    mse: float
    psnr: float
    ssim: float
    label_correct: bool


@dataclass(frozen=True)
class ImageScores:
    """Batch scores: means over images, and one :class:`ImageScore` per image.

    ``label_accuracy`` counts labels as a multiset (the fraction of reference labels the
    attack recovered, order-free), since label inference recovers counts, not positions.
    """

    mse: float
    psnr: float
    ssim: float
    label_accuracy: float
    per_image: tuple[ImageScore, ...]


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error of two equally shaped images."""
    return float(((a.double() - b.double()) ** 2).mean())


def psnr_from_mse(value: float, peak: float = 1.0) -> float:
    """PSNR in dB: ``10 log10(peak^2 / mse)``, capped at :data:`MAX_PSNR` for mse 0."""
    if value <= 0:
        return MAX_PSNR
    return min(MAX_PSNR, 10.0 * math.log10(peak * peak / value))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two ``(C, H, W)`` images in ``[0, 1]`` (scikit-image, channel-wise, 7x7 window)."""
    x = a.detach().double().cpu().permute(1, 2, 0).numpy()  # (H, W, C)
    y = b.detach().double().cpu().permute(1, 2, 0).numpy()
    win = min(7, x.shape[0], x.shape[1])
    win = win if win % 2 == 1 else win - 1
    return float(structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=win))


def match_images(reference: torch.Tensor, reconstruction: torch.Tensor) -> list[int]:
    """Best-match assignment: ``matched[i]`` is the reconstruction paired with reference i.

    Minimises the total MSE with the Hungarian algorithm (scipy's linear_sum_assignment).
    """
    ref = reference.detach().double().cpu().flatten(1)  # (B, D)
    rec = reconstruction.detach().double().cpu().flatten(1)  # (B', D)
    cost = torch.cdist(ref, rec).pow(2) / ref.shape[1]  # (B, B') pairwise MSE
    rows, cols = linear_sum_assignment(cost.numpy())
    matched = [-1] * ref.shape[0]
    for r, c in zip(rows, cols):
        matched[int(r)] = int(c)
    return matched


def matched_psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean PSNR (dB, peak 1) under the best one-to-one matching (:func:`match_images`).

    The order of a reconstructed batch is arbitrary, so each reconstruction is paired
    with the original it is closest to; reconstructions are clamped to ``[0, 1]``. The
    same number as :func:`evaluate_images`' ``psnr``, without SSIM or labels, for views
    that refresh it at every step.
    """
    rec = reconstruction.detach().clamp(0, 1)
    matched = match_images(reference, rec)
    return float(np.mean([psnr_from_mse(mse(reference[i], rec[j])) for i, j in enumerate(matched)]))


def label_accuracy(ref_labels: torch.Tensor, rec_labels: torch.Tensor) -> float:
    """Fraction of reference labels recovered, as multisets (order-free)."""
    ref = [int(v) for v in ref_labels.flatten()]
    if not ref:
        return 0.0
    pool = [int(v) for v in rec_labels.flatten()]
    hits = 0
    for v in ref:
        if v in pool:
            pool.remove(v)
            hits += 1
    return hits / len(ref)


def evaluate_images(
    reference: torch.Tensor,
    reconstruction: torch.Tensor,
    ref_labels: torch.Tensor,
    rec_labels: torch.Tensor,
) -> ImageScores:
    """Score a reconstructed batch against the client's images.

    Args:
        reference: ``(B, C, H, W)`` the client's images in ``[0, 1]``.
        reconstruction: ``(B, C, H, W)`` the attack's images (clamped to ``[0, 1]`` here).
        ref_labels: ``(B,)`` the client's labels.
        rec_labels: ``(B,)`` the attack's labels, in the order of ``reconstruction``.

    Returns:
        Mean and per-image scores after best-match assignment.

    Raises:
        ValueError: when the shapes differ.
    """
    if reference.shape != reconstruction.shape:
        raise ValueError(
            f"reference {tuple(reference.shape)} and reconstruction {tuple(reconstruction.shape)} differ"
        )
    rec = reconstruction.detach().clamp(0, 1)
    matched = match_images(reference, rec)  # the one pairing, shared with matched_psnr
    scores = []
    for i, j in enumerate(matched):
        m = mse(reference[i], rec[j])
        scores.append(
            ImageScore(
                index=i,
                matched=j,
                mse=m,
                psnr=psnr_from_mse(m),
                ssim=ssim(reference[i], rec[j]),
                label_correct=bool(int(ref_labels[i]) == int(rec_labels[j])),
            )
        )
    return ImageScores(
        mse=float(np.mean([s.mse for s in scores])),
        psnr=float(np.mean([s.psnr for s in scores])),
        ssim=float(np.mean([s.ssim for s in scores])),
        label_accuracy=label_accuracy(ref_labels, rec_labels),
        per_image=tuple(scores),
    )
