"""Secure aggregation: the server sees only the sum of several clients' updates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedclient.batch import Batch, ImageBatch, TextBatch
from fedclient.client import Defense
from fedclient.defenses.base import MAX_CLIENTS, _check, _with, describe, fedsgd_update
from fedclient.update import SharedUpdate

OTHER_CLIENTS = ("random", "copies")
"""How :class:`SecureAggregation` simulates the other clients when no batch maker is given."""


@dataclass(frozen=True)
class SecureAggregation:
    """Secure aggregation: the server sees only the sum of ``clients`` clients' updates.

    The attacked client is client 0 (its batch is the one given). The other
    ``clients - 1`` clients are simulated:

    * ``make_other_batch(k)`` (for ``k = 1 .. clients-1``) when given, e.g. a sampler
      over a pool of sentences or images (recommended: the most realistic);
    * otherwise ``others="random"`` (default): each other client holds a batch of the
      same shape with random content drawn from the generator (uniform random token
      ids at the real-token positions and random labels for text; uniform random pixels
      and random labels for images);
    * or ``others="copies"``: every other client holds the same batch. This is the
      worst case for the defense (the sum is ``clients`` times one update, which the
      server can divide out) and is what the test "K identical clients aggregate to K
      times one" checks.

    Each client applies ``client_defense`` (e.g. DP noise) before aggregation; in a
    :class:`Compose`, everything listed before the secure aggregation is the client
    defense. The aggregate's ``batch_size`` is the total number of examples.
    """

    clients: int = 2  # K: number of clients whose updates are summed
    others: str = "random"  # "random" or "copies" (used when make_other_batch is None)
    make_other_batch: Callable[[int], Batch] | None = field(default=None, compare=False)
    client_defense: Defense | None = None  # what every client applies before the sum

    def __post_init__(self) -> None:
        _check(
            isinstance(self.clients, int) and not isinstance(self.clients, bool) and 1 <= self.clients <= MAX_CLIENTS,
            f"Secure aggregation needs a whole number of clients from 1 to {MAX_CLIENTS:,} (e.g. 4), "
            f"got {self.clients!r}.",
        )
        _check(
            self.others in OTHER_CLIENTS,
            f"Unknown way to simulate other clients {self.others!r}: use one of {', '.join(OTHER_CLIENTS)}.",
        )
        _check(
            not isinstance(self.client_defense, SecureAggregation),
            "Secure aggregation cannot be nested: give it once, last.",
        )

    @property
    def name(self) -> str:
        others = "custom" if self.make_other_batch is not None else self.others
        return f"secagg:clients={self.clients},others={others}"

    def describe(self) -> str:
        """One line for people, with what every client applies first."""
        if self.make_other_batch is not None:
            who = "other clients"
        elif self.others == "random":
            who = "clients holding random data"
        elif self.others == "copies":
            who = "clients holding copies of the same batch"
        else:
            raise ValueError(f"unknown others {self.others!r}")
        inner = "" if self.client_defense is None else f" Each client first applies: {describe(self.client_defense)}"
        return (
            f"Secure aggregation: the server sees only the sum over {self.clients} clients "
            f"(the attacked one and {self.clients - 1} {who}).{inner}"
        )

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, parameters: list[str], generator: torch.Generator
    ) -> SharedUpdate:
        def client(b: Batch) -> SharedUpdate:
            if self.client_defense is None:
                return fedsgd_update(model, b, parameters=parameters)
            return self.client_defense(model, b, parameters=parameters, generator=generator)

        own = client(batch)
        total = {n: g.clone() for n, g in own.items()}
        examples = own.batch_size
        for k in range(1, self.clients):
            if self.make_other_batch is not None:
                other = self.make_other_batch(k)
            elif self.others == "copies":
                other = batch
            elif self.others == "random":
                other = random_batch_like(model, batch, generator)
            else:
                raise ValueError(f"unknown others {self.others!r}")
            upd = client(other)
            for n in total:
                total[n] += upd[n]
            examples += upd.batch_size
        agg = own.replace(batch_size=examples)
        return _with(agg, total, self.name, clients=self.clients)


def random_batch_like(model: torch.nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
    """A batch shaped like ``batch`` with random content (another client's data, simulated)."""
    if isinstance(batch, TextBatch):
        get_embeddings = getattr(model, "get_input_embeddings", None)  # transformers models have it
        emb = get_embeddings() if callable(get_embeddings) else None
        vocab = int(emb.num_embeddings) if emb is not None else int(batch.input_ids.max()) + 1
        ids = torch.randint(0, vocab, batch.input_ids.shape, generator=generator).to(batch.input_ids.device)
        real = batch.attention_mask.bool()
        ids = torch.where(real, ids, batch.input_ids)  # padding stays padding
        if batch.task == "classification":
            classes = int(getattr(getattr(model, "config", None), "num_labels", 0) or int(batch.labels.max()) + 1)
            labels = torch.randint(0, classes, batch.labels.shape, generator=generator).to(batch.labels.device)
        else:  # next-token: targets are the tokens themselves, -100 on padding
            labels = torch.where(real, ids, torch.full_like(ids, -100))
        return TextBatch(ids, batch.attention_mask, labels, batch.task, batch.padding_side)
    if isinstance(batch, ImageBatch):
        images = torch.rand(batch.images.shape, generator=generator).to(batch.images)
        if batch.labels.ndim == 1:
            with torch.no_grad():
                classes = int(model(batch.images[:1]).shape[-1])
            labels = torch.randint(0, classes, batch.labels.shape, generator=generator).to(batch.labels.device)
        else:
            logits = torch.randn(batch.labels.shape, generator=generator)
            labels = logits.softmax(dim=-1).to(batch.labels)
        return ImageBatch(images=images, labels=labels, task=batch.task)
    raise ValueError(f"unknown batch type {type(batch).__name__}")
