"""The family-hooks base class and its registry (see :mod:`dager.layers`).

A family module subclasses :class:`FamilyHooks` and registers it with
:func:`register_hooks`; :func:`dager.layers.hooks_for` picks the class by
``config.model_type``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from dager.filters import AdditiveLayerNormFilter, ScaleFreeFilter
from dager.span import Span

HOOKS: dict[str, type[FamilyHooks]] = {}


def register_hooks(model_type: str) -> Callable[[type[FamilyHooks]], type[FamilyHooks]]:
    """Class decorator: serve ``model_type`` with these hooks (later registrations win)."""

    def deco(cls: type[FamilyHooks]) -> type[FamilyHooks]:
        HOOKS[model_type] = cls
        return cls

    return deco


class FamilyHooks:
    """Base class: parameter naming and helpers shared by every family."""

    is_decoder: bool = True
    positional: bool = True
    """True when the layer-1 input depends on the position (learned absolute positions)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self._names = {id(p): n for n, p in model.named_parameters()}

    # -- naming -----------------------------------------------------------------
    def name_of(self, param: torch.Tensor) -> str:
        return self._names[id(param)]

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.token_embedding_matrix().shape[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def attention_parameters(self, layer: int) -> list[str]:
        """Names of the weights whose gradients span block ``layer``'s attention input."""
        raise NotImplementedError

    def mlp_parameters(self, layer: int) -> list[str]:
        """Names of the weights whose gradients span block ``layer``'s MLP input."""
        raise NotImplementedError

    def required_parameters(self) -> list[str]:
        """Every weight whose update DAGER reads (:meth:`optional_parameters` included)."""
        names = self.attention_parameters(0) + self.attention_parameters(1)
        if self.is_decoder:
            names += self.mlp_parameters(0)
        return names + self.optional_parameters()

    def optional_parameters(self) -> list[str]:
        """Weights read only in some settings (an update without them is not refused)."""
        return []

    def input_matrix(self, update: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
        """``(d, k)``: columns spanning the input space of the named weights' layer."""
        parts = []
        for name in names:
            grad = update[name].detach()
            parts.append(self._input_columns(name, grad))
        return torch.cat(parts, dim=1)

    def _input_columns(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        # nn.Linear stores (out, in): the input space is the row space.
        return grad.T

    # -- layer 1 ------------------------------------------------------------------
    def token_embedding_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def layer1_filter(self, span: Span, *, lower_bounds: bool = False) -> AdditiveLayerNormFilter | ScaleFreeFilter:
        """An object whose ``distances(positions)`` gives ``(P, V)`` float64 relative
        distances of every token's layer-1 input to ``span`` (``(1, V)`` when the
        inputs do not depend on the position). With ``lower_bounds``, distances above
        :data:`SCREEN` may be lower bounds (cheaper; exact below the cut)."""
        raise NotImplementedError

    def num_positions(self) -> int:
        raise NotImplementedError
