"""LoRA clients through peft: the adapted model, its shared names and the server's view.

With ``W' = W + s B A`` (``s = alpha / r``) and layer inputs ``x_i``, the adapters'
gradients are ``grad_A = s B^T (sum_i delta_i x_i^T)`` ``(r, in)`` and
``grad_B = s (sum_i delta_i x_i^T) A^T`` ``(out, r)``. Both are what a LoRA client
shares; DAGER reads ``grad_A``, whose rows lie in the span of the inputs ``x_i`` with
rank at most ``min(r, distinct inputs)`` (see :mod:`dager.lora`).

peft is imported lazily: only a client that asks for LoRA needs it.

Naming: the update is keyed the way peft saves an adapter
(``get_peft_model_state_dict``): ``base_model.model.<module>.lora_A.weight`` and
``...lora_B.weight``, where ``<module>`` is the adapted module's name in the base model
(e.g. ``transformer.h.0.attn.c_attn``). :func:`adapter_key` builds them from a base
weight's name, so an attacker can find them without importing peft.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable

import torch

from fedclient.errors import InvalidConfigError
from fedclient.training import LoraSpec

log = logging.getLogger(__name__)

DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),  # fused query/key/value (a Conv1D: peft needs fan_in_fan_out)
    "llama": ("q_proj", "k_proj", "v_proj"),
    "bert": ("query", "key", "value"),
}
"""The attention input projections of each family (``config.model_type``)."""

FAN_IN_FAN_OUT = ("gpt2",)
"""Families whose adapted layers store weights as ``(in, out)`` (transformers' Conv1D)."""

PEFT_PREFIX = "base_model.model."
"""Prefix peft puts before the base model's module names."""


def adapter_key(base_weight: str, which: str) -> str:
    """The shared update's key of the ``which`` (``"A"`` or ``"B"``) adapter of a weight.

    ``adapter_key("transformer.h.0.attn.c_attn.weight", "A")`` is
    ``"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"``.
    """
    if which not in ("A", "B"):
        raise ValueError(f"unknown adapter {which!r}")
    module = base_weight[: -len(".weight")] if base_weight.endswith(".weight") else base_weight
    return f"{PEFT_PREFIX}{module}.lora_{which}.weight"


def shared_key(peft_name: str) -> str:
    """A peft parameter name as the update keys it (the adapter name dropped)."""
    return peft_name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def targets_of(spec: LoraSpec, model: torch.nn.Module) -> tuple[str, ...]:
    """The module names a spec adapts on this model (its own, or the family default).

    Raises:
        InvalidConfigError: no targets were given and the family has no default.
    """
    if spec.targets:
        return spec.targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise InvalidConfigError(
            f"LoRA has no default target modules for models of type {model_type!r}: name them, "
            "e.g. --client lora:r=16,targets=fc1|fc2."
        )
    return DEFAULT_TARGETS[str(model_type)]


def _adaptable(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _width(module: torch.nn.Module) -> int:
    """``min(in, out)`` of a Linear or Conv1D (its weight's smaller side)."""
    return int(min(module.weight.shape))


def check_lora(spec: LoraSpec, model: torch.nn.Module) -> None:
    """Refuse a LoRA setup this model cannot take, with one sentence.

    Raises:
        InvalidConfigError: a target names no linear module, or r exceeds the width of
            an adapted layer.
    """
    targets = targets_of(spec, model)
    modules = dict(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _adaptable(m)})
    widths: list[int] = []
    for target in targets:
        found = [m for n, m in modules.items() if _matches(n, target) and _adaptable(m)]
        if not found:
            raise InvalidConfigError(
                f"LoRA target {target!r} names no linear module of this model: use one of {', '.join(linear)}."
            )
        widths.extend(_width(m) for m in found)
    d = min(widths)
    if spec.r > d:
        raise InvalidConfigError(
            f"The LoRA rank r={spec.r} is larger than the adapted layers' width d={d}: use r from 1 to {d}."
        )


def _lora_config(spec: LoraSpec, model: torch.nn.Module) -> object:
    from peft import LoraConfig

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LoraConfig(
        r=spec.r,
        lora_alpha=float(spec.r if spec.alpha is None else spec.alpha),
        target_modules=list(targets_of(spec, model)),
        lora_dropout=0.0,  # the model's own dropout is the --dropout setting
        bias="none",
        fan_in_fan_out=model_type in FAN_IN_FAN_OUT,
    )


def _seed_adapters(peft_model: torch.nn.Module, spec: LoraSpec) -> None:
    """Seeded adapter values "after warm-up" (B nonzero), in a fixed order of names."""
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if ".lora_A." in name:  # (r, in): peft's kaiming-uniform bound 1/sqrt(in)
                bound = 1.0 / math.sqrt(p.shape[1])
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            elif ".lora_B." in name:  # (out, r)
                p.copy_(torch.randn(p.shape, generator=gen) * spec.init_std)


def lora_model(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """A copy of ``model`` with seeded LoRA adapters (peft); the base weights frozen.

    The caller's model is never modified (peft adapts in place, so a deep copy is
    adapted). The copy is in fp32 and in the caller's mode.
    """
    from peft import get_peft_model

    check_lora(spec, model)
    copied = copy.deepcopy(model)
    peft_model = get_peft_model(copied, _lora_config(spec, model))  # type: ignore[arg-type]
    _seed_adapters(peft_model, spec)
    return peft_model


def server_model(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """What the server holds for a LoRA client: the base weights with the adapters merged.

    ``W + (alpha / r) B A`` in every adapted layer (peft's ``merge_and_unload``), as a
    plain model of the base model's class, so an attack reads it like any other.
    """
    merged = lora_model(model, spec).merge_and_unload()  # type: ignore[operator]
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def shared_parameters(peft_model: torch.nn.Module, base_names: Iterable[str] | None) -> list[str]:
    """The peft parameter names a LoRA client shares.

    Args:
        peft_model: the adapted model.
        base_names: weights of the base model the caller asked for (``None``: all);
            a requested weight that carries adapters shares its A and B, a frozen one
            shares nothing (it does not change).
    """
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if base_names is None:
        return trainable
    wanted = {adapter_key(n, w) for n in base_names for w in ("A", "B")}
    return [n for n in trainable if shared_key(n) in wanted]


__all__ = [
    "DEFAULT_TARGETS",
    "adapter_key",
    "check_lora",
    "lora_model",
    "server_model",
    "shared_key",
    "shared_parameters",
    "targets_of",
]
