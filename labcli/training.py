"""The client-training options every command line shares (issue 11).

``--client SPEC`` (repeatable: ``lora:r=16``, ``lora:r=8,alpha=16,targets=q_proj|v_proj``,
``bf16``, ``dropout``), ``--precision fp32|bf16|fp16`` and ``--dropout`` build one
:class:`fedclient.training.ClientTraining`, checked before torch loads where it can be
(:func:`client_training`) and against the model once it is loaded
(:func:`prepare_client`), so a bad value stops the run before any batch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedclient.training import PRECISIONS, ClientTraining, parse_client
from labcli.common import CliUsageError

if TYPE_CHECKING:  # pragma: no cover
    from fedclient.client import Defense

CLIENT_HELP = (
    "how the client trains, repeatable key=value specs: lora:r=16[,alpha=32][,targets=c_attn] "
    "(LoRA adapters via peft; the update holds their gradients), bf16, fp16, dropout[:p=0.1]"
)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """``--client SPEC`` (repeatable), ``--precision`` and ``--dropout``."""
    parser.add_argument("--client", action="append", default=[], metavar="SPEC", help=CLIENT_HELP)
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="dtype the client's model trains in; the shared update is in it (default fp32)",
    )
    parser.add_argument(
        "--dropout", action="store_true", help="the client trains in train mode with the model's dropout (seeded)"
    )


def client_training(args: argparse.Namespace) -> ClientTraining:
    """The setup of ``--client``/``--precision``/``--dropout`` (torch-free).

    Raises:
        fedclient.errors.InvalidConfigError: a spec cannot be parsed.
    """
    return parse_client(
        list(getattr(args, "client", []) or []),
        precision=getattr(args, "precision", None),
        dropout=bool(getattr(args, "dropout", False)),
    )


def client_keys(training: ClientTraining) -> dict[str, object]:
    """The JSON keys of a setup: ``client`` (the record), ``lora``, ``precision``,
    ``dropout`` and ``client_description``."""
    record = training.record()
    return {
        "client": training.name,
        "lora": record["lora"],
        "precision": record["precision"],
        "dropout": record["dropout"],
        "dropout_rate": record["dropout_rate"],
        "client_description": training.describe(),
    }


def _minibatch(defense: object | None) -> int | None:
    """The FedAvg minibatch size inside a defense (or a Compose), if any."""
    if defense is None:
        return None
    inner = getattr(defense, "defenses", None)
    if inner is not None:
        found = [_minibatch(d) for d in inner]
        return next((m for m in found if m is not None), None)
    return getattr(defense, "minibatch_size", None) if type(defense).__name__ == "FedAvg" else None


def check_minibatch(defense: Defense | None, batch_sizes: Sequence[int]) -> None:
    """Refuse a FedAvg minibatch larger than a batch, before any batch runs.

    Raises:
        CliUsageError: the minibatch exceeds the smallest batch.
    """
    mb = _minibatch(defense)
    if mb is not None and batch_sizes and mb > min(batch_sizes):
        smallest = min(batch_sizes)
        raise CliUsageError(
            f"The FedAvg minibatch of {mb} is larger than a client batch of {smallest} sentence(s): "
            f"use minibatch={smallest} or less (or a larger --batch-size)."
        )


def prepare_client(training: ClientTraining, model: object, *, device: str) -> object | None:
    """Check the setup against the loaded model; the server's model for a LoRA client.

    Returns:
        ``None`` when the server holds the model as loaded; for LoRA, the base model
        with the adapters merged (:func:`fedclient.lora.server_model`): what the server
        sent, which the attack reads.

    Raises:
        fedclient.errors.InvalidConfigError: r too large, an unknown target module, or
            a precision this device cannot run.
    """
    from fedclient.training import check_training

    check_training(training, model, device=device)
    if training.lora is None:
        return None
    from fedclient.lora import server_model

    return server_model(model, training.lora)  # type: ignore[arg-type]


def dlg_training(args: argparse.Namespace, model: object) -> ClientTraining:
    """The setup of a DLG command line, checked against its model.

    DLG matches the full gradient of its dummy data; a LoRA update (adapters only) is
    DAGER's setting, so it is refused here with one sentence.

    Raises:
        CliUsageError: LoRA was asked for.
        fedclient.errors.InvalidConfigError: a bad spec, or a precision this device cannot run.
    """
    training = client_training(args)
    if training.lora is not None:
        raise CliUsageError("LoRA clients are attacked by DAGER (python -m dager --client lora:...): drop --client lora here.")
    prepare_client(training, model, device=getattr(args, "device", "cpu"))
    return training


__all__ = [
    "dlg_training",
    "CLIENT_HELP",
    "add_client_arguments",
    "check_minibatch",
    "client_keys",
    "client_training",
    "prepare_client",
]
