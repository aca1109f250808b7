"""DAGER on a LoRA client's update: the span lives in the A matrices' gradients.

With ``W' = W + s B A`` (``s = alpha / r``), the client shares ``grad_A`` ``(r, in)``
and ``grad_B`` ``(out, r)`` instead of ``grad_W``. Since
``grad_A = s B^T grad_W'`` and ``grad_W' = sum_i delta_i x_i^T``, the rows of
``grad_A`` lie in the span of the layer inputs ``x_i``: the same span DAGER reads from a
full gradient (Petrov et al. 2024, Lemma 3.1), but of rank at most
``min(r, distinct inputs)``. So:

* with at most r distinct inputs (per A matrix read together, see below) the row space
  of ``grad_A`` *is* their span and the attack runs unchanged;
* past r it is an r-dimensional subspace of that span, in which a true input generally
  does not lie: exact recovery stops. That is the break point the capacity verdict
  reports (:func:`capacity`).

``grad_B = s grad_W' A^T`` has its row space in ``span{A x_i}`` inside ``R^r``: with
more than r inputs that is all of ``R^r`` and tests nothing, so DAGER reads A.

Several adapted projections of one layer input (Llama's q/k/v each have their own A)
give ``grad_A`` with different ``B^T delta`` mixes of the same inputs; read together
their rank is up to ``min(k r, distinct inputs)`` for k projections, which moves the
break point to ``k r`` (GPT-2's fused ``c_attn`` has one A: k = 1).

The adapters' values are part of the model the server sent: the attacker's model is
the base model with the adapters merged (:func:`fedclient.lora.server_model`), so block 0
runs exactly as the client's did. Frozen weights share no gradient: a layer DAGER
would read that carries no adapter (block 0's MLP input weight, unless targeted) gives
no constraint, which the search treats as a full span (every extension passes that
check; the block-1 attention check still decides).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedclient.lora import adapter_key
from fedclient.update import SharedUpdate


def is_lora_update(update: Mapping[str, torch.Tensor]) -> bool:
    """True when the update holds LoRA adapters (keys ending in ``lora_A.weight``)."""
    return any(k.endswith(".lora_A.weight") for k in update)


def base_layout(grad_a: torch.Tensor, base_shape: torch.Size | tuple[int, ...], hidden_size: int) -> torch.Tensor:
    """``grad_A`` ``(r, in)`` laid out like the base weight, so the hooks read its inputs.

    A Linear stores ``(out, in)`` and its input space is the row space: ``grad_A`` as is.
    A Conv1D (GPT-2) stores ``(in, out)`` and its input space is the column space:
    ``grad_A^T`` ``(in, r)``.
    """
    conv1d = len(base_shape) == 2 and base_shape[0] == hidden_size and base_shape[1] != hidden_size
    return grad_a.T if conv1d else grad_a


def as_base_update(update: SharedUpdate, names: list[str], model: torch.nn.Module, hidden_size: int) -> SharedUpdate:
    """The update with DAGER's base weight names filled from the LoRA A gradients.

    Args:
        update: the shared update (returned unchanged when it holds no adapters).
        names: base weight names DAGER reads.
        model: the attacker's model (for the base weights' layouts).
        hidden_size: d.

    Returns:
        An update holding, for each name, the full gradient when shared, else the A
        gradient in the base layout, else (a frozen weight) the identity: no constraint.
    """
    if not is_lora_update(update):
        return update
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = dict(update.gradients)
    for name in names:
        if name in out:
            continue
        key = adapter_key(name, "A")
        if key in update:
            out[name] = base_layout(update[key], params[name].shape, hidden_size)
        else:
            # A frozen weight: nothing shared, nothing to test: the input side is R^d.
            out[name] = torch.eye(hidden_size, dtype=torch.float32)
    return update.replace(gradients=out)


def capacity(update: SharedUpdate, names: list[str], hidden_size: int) -> int:
    """How many distinct layer-1 inputs the update's span can hold: d, or ``k r`` for LoRA.

    Args:
        update: the shared update (as the client sent it).
        names: the layer-1 base weight names DAGER reads.
        hidden_size: d.
    """
    if not is_lora_update(update):
        return hidden_size
    total = 0
    for name in names:
        if name in update:
            return hidden_size  # a full gradient is shared for this input
        key = adapter_key(name, "A")
        if key in update:
            total += int(update[key].shape[0])
    return max(1, min(hidden_size, total))


__all__ = ["as_base_update", "base_layout", "capacity", "is_lora_update"]
