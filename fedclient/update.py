"""The shared update: what the server (and so the attacker) receives from a client."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SharedUpdate(Mapping[str, torch.Tensor]):
    """A client's update, addressed by parameter name.

    It behaves as a read-only mapping ``name -> tensor``. It holds no inputs, no labels
    and no attention masks: only what a federated server would see.

    Attributes:
        gradients: parameter name -> update tensor (a gradient for FedSGD, a weight
            delta for FedAvg), detached, on the CPU or the model's device.
        batch_size: number of examples the client used (servers weight by it).
        task: the training task, e.g. ``"classification"`` or ``"next-token"``.
        padding_side: how text batches were padded (``"right"`` or ``"left"``).
        kind: ``"fedsgd-gradient"`` or ``"fedavg-delta"``.
        defenses: names of the defenses applied, in order.
        info: defense metadata (e.g. ``{"epsilon": 3.2}``), numbers and strings only.
    """

    gradients: Mapping[str, torch.Tensor]
    batch_size: int
    task: str
    padding_side: str = "right"
    kind: str = "fedsgd-gradient"
    defenses: tuple[str, ...] = ()
    info: Mapping[str, float | int | str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.gradients[name]
        except KeyError:
            raise KeyError(
                f"the shared update has no parameter {name!r}; it holds {len(self.gradients)} "
                "parameters (restricted updates only hold the requested names)"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.gradients)

    def __len__(self) -> int:
        return len(self.gradients)

    def replace(self, **changes: object) -> SharedUpdate:
        """A copy with some fields changed (the update itself is immutable)."""
        values = {
            "gradients": self.gradients,
            "batch_size": self.batch_size,
            "task": self.task,
            "padding_side": self.padding_side,
            "kind": self.kind,
            "defenses": self.defenses,
            "info": self.info,
        }
        values.update(changes)
        return SharedUpdate(**values)  # type: ignore[arg-type]
