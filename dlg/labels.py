"""Labels from the shared gradient: the analytic step of iDLG, and its batch extension."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from fedclient.errors import LabInputError

SOFTMAX_PROBES = 16
"""Random images whose mean softmax estimates the model's expected output (batches)."""


class UnattackableUpdateError(LabInputError):
    """The shared update lacks what the attack needs (e.g. the classification head)."""


def head_parameter_names(model: nn.Module) -> tuple[str, str | None]:
    """Names of the weight and bias of the model's last linear layer (the classifier).

    Raises:
        UnattackableUpdateError: when the model has no linear layer.
    """
    last: tuple[str, str | None] | None = None
    for mname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            prefix = f"{mname}." if mname else ""
            last = (f"{prefix}weight", f"{prefix}bias" if module.bias is not None else None)
    if last is None:
        raise UnattackableUpdateError(
            "The model has no linear classification layer, so labels cannot be read from its "
            "gradient; use the 'dlg' method instead."
        )
    return last


def infer_labels(
    model: nn.Module,
    update: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    image_shape: tuple[int, int, int] = (3, 32, 32),
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the batch's labels from the gradient of the last linear layer (iDLG).

    With softmax cross-entropy averaged over the batch, the gradient of the head's bias
    is ``g = (1/B) sum_b (p_b - y_b)`` where ``p_b`` is example b's softmax output and
    ``y_b`` its one-hot label. Hence:

    * **B = 1** (Zhao et al. 2020): ``g_c = p_c - 1 < 0`` only for the true class; every
      other entry is ``p_c > 0``. The label is the one negative entry (exact). Without a
      bias the same holds for the row sums of the weight gradient when the head's
      inputs are non-negative (sigmoid features), as in the paper.
    * **Batches** (label counts, in the spirit of Wainakh et al.'s LLG, 2022):
      ``n_c = sum_b y_bc = sum_b p_bc - B g_c``. Classes with ``g_c < 0`` are present.
      The unknown ``sum_b p_bc`` is estimated as ``B`` times the model's mean softmax on
      a few random images (the attacker knows the model; an untrained network's output
      depends weakly on its input). Every present class gets one example, the rest of
      the batch goes to the largest remaining estimates ``B (pbar_c - g_c)``.

    Args:
        model: the shared model.
        update: the shared gradient (must hold the head's parameters).
        batch_size: B, which the server knows.
        image_shape: the model's input shape, for the softmax estimate.
        seed: seeds the random images of the estimate.

    Returns:
        ``(labels, counts)``: ``(B,)`` class ids sorted ascending (the order of a batch is
        not recoverable from the head) and ``(num_classes,)`` counts summing to B.

    Raises:
        UnattackableUpdateError: when the update lacks the head's gradient.
    """
    weight_name, bias_name = head_parameter_names(model)
    if bias_name is not None and bias_name in update:
        g = update[bias_name].detach().double().cpu()  # (K,)
    elif weight_name in update:
        g = update[weight_name].detach().double().cpu().sum(dim=1)  # (K, D) -> (K,)
    else:
        raise UnattackableUpdateError(
            f"The shared update has no gradient for the classification head ({weight_name}); "
            "labels cannot be inferred: share the head or use the 'dlg' method."
        )
    num_classes = g.shape[0]
    counts = torch.zeros(num_classes, dtype=torch.long)
    if batch_size == 1:
        counts[int(torch.argmin(g))] = 1
        return torch.nonzero(counts).flatten(), counts
    # Mean softmax of the model on a few random inputs: an estimate of E[p].
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    probe = torch.rand((SOFTMAX_PROBES, *image_shape), generator=gen).to(device=device, dtype=dtype)  # (P, C, H, W)
    with torch.no_grad():
        pbar = torch.softmax(model(probe).double(), dim=-1).mean(dim=0).cpu()  # (K,)
    estimate = batch_size * (pbar - g)  # (K,) estimated n_c
    present = torch.nonzero(g < 0).flatten()
    order = present[torch.argsort(g[present])]  # most negative first
    for c in order[:batch_size]:
        counts[c] = 1
    remaining = batch_size - int(counts.sum())
    while remaining > 0:
        residual = estimate - counts.double()
        if len(present) > 0:  # extra copies only of classes seen to be present
            residual[counts == 0] = -math.inf
        c = int(torch.argmax(residual))
        counts[c] += 1
        remaining -= 1
    labels = torch.repeat_interleave(torch.arange(num_classes), counts)
    return labels, counts
