"""The utility cost of a defense: how far the defended update is from the clean gradient."""

from __future__ import annotations

import math

import torch

from fedclient.batch import Batch
from fedclient.client import fedsgd_gradient
from fedclient.update import SharedUpdate


def utility_cost(model: torch.nn.Module, batch: Batch, update: SharedUpdate) -> dict[str, float]:
    """How far the defended update is from the clean gradient (a cheap utility proxy).

    Compares the update with the client's clean FedSGD gradient on the same parameters:

    * ``utility_cosine``: cosine similarity of the flattened tensors (1: same direction,
      as a learning step would use it; 0: unrelated). Scale-free, so it also applies to
      a FedAvg delta (which is about ``lr * steps`` times a gradient).
    * ``utility_norm_ratio``: ``||update|| / ||clean gradient||``.

    This is a proxy for the accuracy cost, not a measured accuracy. For secure
    aggregation the sum over clients is exactly what the server needs, so a low cosine
    there measures how well this client's gradient is hidden in the sum, not a cost.
    """
    parameters = list(update)
    clean = fedsgd_gradient(model, batch, parameters=parameters)
    dot = 0.0
    uu = 0.0
    gg = 0.0
    for n in parameters:
        u = update[n].detach().double().flatten()
        g = clean[n].detach().double().flatten().to(u.device)
        dot += float(u @ g)
        uu += float(u @ u)
        gg += float(g @ g)
    cosine = dot / math.sqrt(uu * gg) if uu > 0 and gg > 0 else 0.0
    ratio = math.sqrt(uu / gg) if gg > 0 else math.inf
    return {"utility_cosine": cosine, "utility_norm_ratio": ratio}
