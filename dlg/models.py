"""Small, twice-differentiable vision models that DLG attacks.

Gradient matching differentiates the gradient itself, so every model here uses smooth
activations (sigmoid, SiLU) and no BatchNorm: BatchNorm's batch statistics and running
buffers would make the client's gradient depend on state the attacker does not see.

Models are built from a registry (:data:`MODELS`), with a fixed-seed initialisation that
never touches the global random state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedclient.errors import UnknownModelError

log = logging.getLogger(__name__)

IMAGE_SHAPE = (3, 32, 32)
"""The input every model here takes: 32x32 RGB (CIFAR-sized)."""

NUM_CLASSES = 100
"""Classes of the linear head (CIFAR-100-sized, as in the DLG paper)."""


class UnknownVisionModelError(UnknownModelError):
    """The vision model name is not in the registry."""


class LeNet(nn.Module):
    """LeNet as used by Zhu et al., "Deep Leakage from Gradients" (NeurIPS 2019).

    Three 5x5 convolutions (12 channels, strides 2, 2, 1, "same" padding), sigmoid
    activations, and a linear head on the flattened 12x8x8 map. The paper initialises
    every weight and bias from uniform(-0.5, 0.5), which keeps the gradients large and
    the inversion well conditioned.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, kernel_size=5, padding=2, stride=2),  # (B, 12, 16, 16)
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),  # (B, 12, 8, 8)
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),  # (B, 12, 8, 8)
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * 8 * 8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)  # (B, 12, 8, 8)
        return self.fc(h.flatten(1))  # (B, num_classes)


def _uniform_init(module: nn.Module) -> None:
    """The DLG paper's init: every weight and bias uniform in (-0.5, 0.5)."""
    for p in module.parameters():
        nn.init.uniform_(p, -0.5, 0.5)


class _Block(nn.Module):
    """A pre-activation residual block with SiLU and GroupNorm (no running statistics)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(4, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1)
        self.act = nn.SiLU()
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))  # (B, c_out, H/s, W/s)
        h = self.conv2(self.act(self.norm2(h)))  # (B, c_out, H/s, W/s)
        return self.skip(x) + h


class SmallResNet(nn.Module):
    """A small ResNet (about 0.2M parameters) with smooth activations.

    A 3x3 stem, three stages of one residual block each (16, 32, 64 channels, the last
    two downsampling), global average pooling and a linear head. SiLU is smooth, so the
    double backward of gradient matching is well defined; GroupNorm normalises per
    example and keeps no running statistics, so the client's gradient depends only on
    the weights the server sent.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)  # (B, w, 32, 32)
        self.blocks = nn.Sequential(
            _Block(width, width, 1),  # (B, w, 32, 32)
            _Block(width, 2 * width, 2),  # (B, 2w, 16, 16)
            _Block(2 * width, 4 * width, 2),  # (B, 4w, 8, 8)
        )
        self.act = nn.SiLU()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.blocks(self.stem(x)))  # (B, 4w, 8, 8)
        return self.fc(h.mean(dim=(2, 3)))  # (B, num_classes)


@dataclass(frozen=True)
class VisionModelSpec:
    """A registered model: how to build it and one honest sentence about it."""

    name: str
    description: str
    build: Callable[[int], nn.Module]


MODELS: dict[str, VisionModelSpec] = {}
"""Registered vision models, by name."""


def register_model(name: str, description: str):
    """Decorator: register a constructor ``fn(num_classes) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        MODELS[name] = VisionModelSpec(name, description, fn)
        return fn

    return deco


@register_model("lenet", "LeNet from the DLG paper: 3 conv layers, sigmoid, uniform(-0.5, 0.5) init.")
def _lenet(num_classes: int) -> nn.Module:
    model = LeNet(num_classes)
    _uniform_init(model)
    return model


@register_model("resnet", "A small ResNet (3 residual blocks, SiLU, GroupNorm), default init.")
def _resnet(num_classes: int) -> nn.Module:
    return SmallResNet(num_classes)


def build_model(name: str = "lenet", *, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    """Build a registered vision model with a fixed-seed initialisation, in eval mode.

    Args:
        name: a key of :data:`MODELS` (``"lenet"`` or ``"resnet"``).
        num_classes: width of the classification head.
        seed: seeds the initialisation; the global random state is left untouched.

    Returns:
        The model, on the CPU, in eval mode.

    Raises:
        UnknownVisionModelError: for a name that is not registered.
    """
    key = name.strip().lower()
    if key not in MODELS:
        raise UnknownVisionModelError(
            f"Unknown image model {name!r}; choose one of: {', '.join(MODELS)}."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[key].build(num_classes)
    model.registry_name = key  # what the attack's events call it (dlg.attack.model_label)
    log.debug("built %s (%d parameters)", key, sum(p.numel() for p in model.parameters()))
    return model.eval()
