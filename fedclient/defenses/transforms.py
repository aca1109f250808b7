"""Defenses that transform a finished update: noise, pruning, random masking, precision.

Called alone they transform the FedSGD gradient; in a :class:`~fedclient.defenses.compose.Compose`
they apply, in the order given, to whatever the computing defense produced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedclient.batch import Batch
from fedclient.defenses.base import MAX_SCALE, _check, _finite, _fmt, _randn_like, _with, fedsgd_update
from fedclient.update import SharedUpdate

PRECISIONS = ("fp16", "int8")
"""Lower-precision formats of :class:`Quantize`."""

PRUNE_SCOPES = ("tensor", "global")
"""Where :class:`Prune` ranks magnitudes: within each tensor, or across all shared tensors."""


def _check_fraction(fraction: float, what: str, which: str) -> None:
    _check(
        _finite(fraction) and 0 <= fraction < 1,
        f"The {what} fraction must be in [0, 1) (0.3 zeroes {which} 30%), got {fraction!r}.",
    )


class _Transforming:
    """Mixin: called as a defense, a transform applies to the FedSGD gradient."""

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, parameters: list[str], generator: torch.Generator
    ) -> SharedUpdate:
        update = fedsgd_update(model, batch, parameters=parameters)
        return self.transform(update, generator=generator)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class GaussianNoise(_Transforming):
    """Add ``N(0, sigma^2)`` noise to every entry of every shared tensor.

    Note that DLG (Zhu et al., 2019, Sec. 6 / Fig. 4) labels its noise levels by the
    *variance* (1e-4 ... 1e-1); use :meth:`from_variance` (spec ``noise:var=1e-4``) to
    reproduce those levels. ``sigma`` here is the standard deviation.
    """

    sigma: float  # standard deviation of the added noise

    def __post_init__(self) -> None:
        _check(
            _finite(self.sigma) and 0 <= self.sigma <= MAX_SCALE,
            f"Noise sigma must be a number from 0 to {MAX_SCALE:g} (the noise standard deviation), got {self.sigma!r}.",
        )

    @classmethod
    def from_variance(cls, variance: float) -> GaussianNoise:
        """Noise of the given variance (DLG's convention)."""
        _check(
            _finite(variance) and 0 <= variance <= MAX_SCALE**2,
            f"Noise variance must be a number from 0 to {MAX_SCALE**2:g}, got {variance!r}.",
        )
        return cls(sigma=math.sqrt(variance))

    @property
    def name(self) -> str:
        return f"noise:sigma={_fmt(self.sigma)}"

    def describe(self) -> str:
        """One line for people."""
        return f"Gaussian noise with standard deviation {self.sigma:g} added to every shared entry."

    def transform(self, update: SharedUpdate, *, generator: torch.Generator) -> SharedUpdate:
        noisy = {n: g + self.sigma * _randn_like(g, generator) for n, g in update.items()}
        return _with(update, noisy, self.name, noise_sigma=self.sigma)


def _round_count(fraction: float, n: int) -> int:
    """``round(fraction * n)``, halves rounded up: the number of entries to zero."""
    return min(n, int(math.floor(fraction * n + 0.5)))


@dataclass(frozen=True)
class Prune(_Transforming):
    """Zero the smallest-magnitude fraction ``p`` of the update's entries.

    Gradient pruning as in DLG (Zhu et al., 2019, Sec. 6: above about 20% the attack
    fails), after Deep Gradient Compression (Lin et al., 2018), which ranks each layer's
    gradient separately. ``scope="tensor"`` (default) zeroes exactly
    ``round(p * numel)`` entries of each tensor; ``scope="global"`` ranks all shared
    entries together and zeroes exactly ``round(p * total)`` of them. Ties are broken by
    position, so the count is exact.
    """

    fraction: float  # fraction of entries set to zero, in [0, 1)
    scope: str = "tensor"  # "tensor" or "global"

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, "pruning", "the smallest")
        _check(
            self.scope in PRUNE_SCOPES,
            f"Unknown pruning scope {self.scope!r}: use one of {', '.join(PRUNE_SCOPES)}.",
        )

    @property
    def name(self) -> str:
        scope = "" if self.scope == "tensor" else f",scope={self.scope}"
        return f"prune:{_fmt(self.fraction)}{scope}"

    def describe(self) -> str:
        """One line for people."""
        where = "of each tensor" if self.scope == "tensor" else "across all shared tensors"
        return f"Pruning: the {self.fraction:.0%} smallest-magnitude entries {where} are set to zero."

    def transform(self, update: SharedUpdate, *, generator: torch.Generator) -> SharedUpdate:
        if self.scope == "tensor":
            pruned = {n: _zero_smallest(g, _round_count(self.fraction, g.numel())) for n, g in update.items()}
        elif self.scope == "global":
            pruned = _prune_global(update, self.fraction)
        else:
            raise ValueError(f"unknown scope {self.scope!r}")
        return _with(update, pruned, self.name, prune_fraction=self.fraction)


def _zero_smallest(g: torch.Tensor, k: int) -> torch.Tensor:
    if k == 0:
        return g.clone()
    flat = g.flatten().clone()  # (N,)
    idx = torch.topk(flat.abs(), k, largest=False, sorted=False).indices  # (k,)
    flat[idx] = 0
    return flat.view_as(g)


def _prune_global(update: SharedUpdate, fraction: float) -> dict[str, torch.Tensor]:
    names = list(update)
    flats = [update[n].flatten() for n in names]
    sizes = [f.numel() for f in flats]
    k = _round_count(fraction, sum(sizes))
    if k == 0:
        return {n: update[n].clone() for n in names}
    device = flats[0].device
    magnitudes = torch.cat([f.abs().to(device=device, dtype=torch.float32) for f in flats])  # (N,)
    drop = torch.zeros(magnitudes.numel(), dtype=torch.bool, device=device)
    drop[torch.topk(magnitudes, k, largest=False, sorted=False).indices] = True
    out: dict[str, torch.Tensor] = {}
    for n, part in zip(names, torch.split(drop, sizes)):
        g = update[n]
        out[n] = g.masked_fill(part.to(g.device).view_as(g), 0)
    return out


@dataclass(frozen=True)
class RandomMask(_Transforming):
    """Zero a random fraction ``p`` of each shared tensor's entries (exactly ``round(p * numel)``)."""

    fraction: float  # fraction of entries set to zero, in [0, 1)

    def __post_init__(self) -> None:
        _check_fraction(self.fraction, "masking", "a random")

    @property
    def name(self) -> str:
        return f"mask:{_fmt(self.fraction)}"

    def describe(self) -> str:
        """One line for people."""
        return f"Random masking: a random {self.fraction:.0%} of each tensor's entries are set to zero."

    def transform(self, update: SharedUpdate, *, generator: torch.Generator) -> SharedUpdate:
        masked: dict[str, torch.Tensor] = {}
        for n, g in update.items():
            k = _round_count(self.fraction, g.numel())
            flat = g.flatten().clone()
            if k:
                idx = torch.randperm(g.numel(), generator=generator)[:k].to(g.device)  # (k,)
                flat[idx] = 0
            masked[n] = flat.view_as(g)
        return _with(update, masked, self.name, mask_fraction=self.fraction)


@dataclass(frozen=True)
class Quantize(_Transforming):
    """Share the update in lower precision (quantise, then dequantise for the server).

    * ``fp16``: round each entry to IEEE half precision (values beyond +-65504 overflow
      to inf, values below about 6e-8 flush to zero, as a real fp16 upload would).
    * ``int8``: symmetric per-tensor quantisation, ``scale = max|g| / 127``,
      ``q = round(g / scale)`` in [-127, 127], shared as ``q * scale``; the error of each
      entry is at most ``scale / 2``.
    """

    precision: str  # "fp16" or "int8"

    def __post_init__(self) -> None:
        _check(
            self.precision in PRECISIONS,
            f"Unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}.",
        )

    @property
    def name(self) -> str:
        return self.precision

    def describe(self) -> str:
        """One line for people."""
        if self.precision == "fp16":
            return "Half precision: the update is rounded to fp16."
        if self.precision == "int8":
            return "int8: each tensor is quantised to 8-bit integers with one scale (max |g| / 127)."
        raise ValueError(f"unknown precision {self.precision!r}")

    def transform(self, update: SharedUpdate, *, generator: torch.Generator) -> SharedUpdate:
        if self.precision == "fp16":
            out = {n: g.to(torch.float16).to(g.dtype) for n, g in update.items()}
        elif self.precision == "int8":
            out = {n: int8_round_trip(g)[0] for n, g in update.items()}
        else:
            raise ValueError(f"unknown precision {self.precision!r}")
        return _with(update, out, self.name, precision=self.precision)


def int8_round_trip(g: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Symmetric per-tensor int8 quantisation and dequantisation.

    Returns:
        ``(dequantised, scale)``; ``|dequantised - g| <= scale / 2`` entrywise.
    """
    peak = float(g.abs().max()) if g.numel() else 0.0
    if peak == 0.0:
        return g.clone(), 0.0
    scale = peak / 127.0
    q = torch.round(g / scale).clamp(-127, 127).to(torch.int8)  # what would travel
    return q.to(g.dtype) * scale, scale
