"""Composition: a computing defense, then transforms, then secure aggregation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fedclient.batch import Batch
from fedclient.client import Defense
from fedclient.defenses.aggregation import SecureAggregation
from fedclient.defenses.base import UpdateTransform, _check, describe, fedsgd_update
from fedclient.errors import InvalidConfigError
from fedclient.update import SharedUpdate


def _role(defense: object) -> str:
    if isinstance(defense, SecureAggregation):
        return "aggregate"
    if isinstance(defense, UpdateTransform):
        return "transform"
    if callable(defense):
        return "compute"
    raise InvalidConfigError(f"{defense!r} is not a defense: give instances such as GaussianNoise(1e-3).")


@dataclass(frozen=True)
class Compose:
    """Several defenses in one: a computing defense, then transforms, then aggregation.

    ``Compose([DPSGD(...), Quantize("fp16")])``: DP-SGD computes the update, then it is
    rounded to fp16. ``Compose([GaussianNoise(1e-3), SecureAggregation(clients=4)])``:
    every client adds noise, the server sees the sum. Without a computing defense the
    transforms apply to the FedSGD gradient. Nested Composes are flattened.

    Raises:
        InvalidConfigError: when the order is impossible (two computing defenses, a
            computing defense after a transform, secure aggregation not last).
    """

    defenses: tuple[Defense, ...]

    def __post_init__(self) -> None:
        flat: list[Defense] = []
        for d in self.defenses:
            flat.extend(d.defenses if isinstance(d, Compose) else (d,))
        object.__setattr__(self, "defenses", tuple(flat))
        _check(len(flat) > 0, "Compose needs at least one defense.")
        roles = [_role(d) for d in flat]
        _check(
            roles.count("compute") <= 1,
            "Only one of DP-SGD and FedAvg can compute the update: keep one of them.",
        )
        _check(
            "compute" not in roles or roles.index("compute") == 0,
            "DP-SGD / FedAvg compute the update, so they must come first, before noise, pruning, "
            "masking or quantisation.",
        )
        _check(
            roles.count("aggregate") <= 1 and ("aggregate" not in roles or roles[-1] == "aggregate"),
            "Secure aggregation must be given once, last (it sums every client's defended update).",
        )
        _check(
            not isinstance(flat[-1], SecureAggregation) or len(flat) == 1 or flat[-1].client_defense is None,
            "Give the client defenses either in the Compose or as client_defense, not both.",
        )

    @property
    def name(self) -> str:
        return " + ".join(d.name for d in self.defenses)

    def describe(self) -> str:
        """Each part's line, in order."""
        return " Then: ".join(describe(d) for d in self.defenses)

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, parameters: list[str], generator: torch.Generator
    ) -> SharedUpdate:
        *head, last = self.defenses
        if isinstance(last, SecureAggregation):
            inner = None if not head else head[0] if len(head) == 1 else Compose(tuple(head))
            agg = dataclasses.replace(last, client_defense=inner) if inner is not None else last
            return agg(model, batch, parameters=parameters, generator=generator)
        first, *rest = self.defenses
        if _role(first) == "compute":
            update = first(model, batch, parameters=parameters, generator=generator)
        else:
            update = fedsgd_update(model, batch, parameters=parameters)
            rest = list(self.defenses)
        for d in rest:
            update = d.transform(update, generator=generator)  # type: ignore[attr-defined]
        return update


def compose(*defenses: Defense | None) -> Defense | None:
    """Compose defenses given as arguments (``None`` entries skipped; one stays itself)."""
    kept = [d for d in defenses if d is not None]
    if not kept:
        return None
    if len(kept) == 1:
        return kept[0]
    return Compose(tuple(kept))
