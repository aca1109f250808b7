"""Client-side defenses against gradient leakage, written once for every attack.

Each defense is a frozen dataclass validated in ``__post_init__`` (bad values raise
:class:`~fedclient.errors.InvalidConfigError` with a sentence saying what to change) and
a callable that fits :class:`fedclient.client.Defense`::

    defense(model, batch, parameters=names, generator=g) -> SharedUpdate

so it plugs into ``compute_update(model, batch, defense=..., seed=...)``. All randomness
comes from ``generator`` (seeded by ``compute_update``'s ``seed``).

Three roles, which :class:`Compose` orders:

* **computing** defenses change how the update is computed: :class:`DPSGD`,
  :class:`FedAvg` (at most one, first; without one the update is the FedSGD gradient);
* **transforming** defenses change a finished update (:meth:`transform`):
  :class:`GaussianNoise`, :class:`Prune`, :class:`RandomMask`, :class:`Quantize`,
  applied in the order given; called alone they transform the FedSGD gradient;
* **aggregating**: :class:`SecureAggregation` (at most one, last): every simulated
  client runs everything before it, and the server sees only the sum.

Every defense's ``name`` is its canonical spec string, and
``parse_defense(d.name) == d``; :func:`describe` gives a one-line explanation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from fedclient.batch import Batch, ImageBatch, TextBatch
from fedclient.client import Defense, batch_loss, fedsgd_gradient, record_diagnostics
from fedclient.dp import (
    ACCOUNTANTS,
    PER_EXAMPLE_METHODS,
    FunctionalModel,
    check_accountant_cost,
    clip_factors,
    dp_epsilon,
    iter_per_example_gradients,
    per_example_norms,
    select_examples,
    trainable_names,
)
from fedclient.errors import InvalidConfigError
from fedclient.update import SharedUpdate

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "int8")
"""Lower-precision formats of :class:`Quantize`."""

PRUNE_SCOPES = ("tensor", "global")
"""Where :class:`Prune` ranks magnitudes: within each tensor, or across all shared tensors."""

CLIP_SCOPES = ("all", "shared")
"""What DP-SGD's per-example norm is measured over (see :class:`DPSGD`)."""

OTHER_CLIENTS = ("random", "copies")
"""How :class:`SecureAggregation` simulates the other clients when no batch maker is given."""

# Sane ranges of the numbers in defense specs (issue 14): beyond them a value is a typo
# or would only exhaust the machine (a million PRV-accounted DP steps asked Opacus for
# 2.59 TiB). Each bound is far past what the lab's demonstrations or the papers use.
MAX_SCALE = 1e6
"""Largest noise sigma, DP clipping norm and DP noise multiplier."""
MAX_DP_STEPS = 100_000
"""Most DP-SGD steps accounted for (a long real training run; RDP accounts it at once)."""
MAX_LOCAL_STEPS = 10_000
"""Most FedAvg local steps (each is a forward and backward pass of the model)."""
MAX_CLIENTS = 1_000
"""Most clients in a secure aggregation (each simulated client computes an update)."""
MAX_MINIBATCH = 100_000
"""Largest FedAvg minibatch size."""


# ------------------------------------------------------------------------- helpers


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidConfigError(message)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: float) -> str:
    """A float that reads back exactly (``repr``), without a needless ``.0``."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def fedsgd_update(model: torch.nn.Module, batch: Batch, *, parameters: list[str]) -> SharedUpdate:
    """The undefended FedSGD update (what ``compute_update`` shares without a defense)."""
    return SharedUpdate(
        gradients=fedsgd_gradient(model, batch, parameters=parameters),
        batch_size=batch.batch_size,
        task=batch.task,
        padding_side=getattr(batch, "padding_side", "right"),
    )


def _randn_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise shaped like ``t``, drawn on the generator's (CPU) device."""
    noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
    return noise.to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float32)


def _with(update: SharedUpdate, gradients: Mapping[str, torch.Tensor], name: str, **info: float | int | str) -> SharedUpdate:
    return update.replace(
        gradients=dict(gradients), defenses=(*update.defenses, name), info={**update.info, **info}
    )


@runtime_checkable
class UpdateTransform(Protocol):
    """A defense that transforms a finished update (noise, pruning, masking, precision)."""

    name: str

    def transform(self, update: SharedUpdate, *, generator: torch.Generator) -> SharedUpdate: ...


class _Transforming:
    """Mixin: called as a defense, a transform applies to the FedSGD gradient."""

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, parameters: list[str], generator: torch.Generator
    ) -> SharedUpdate:
        update = fedsgd_update(model, batch, parameters=parameters)
        return self.transform(update, generator=generator)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ transforming


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
        _check(
            _finite(self.fraction) and 0 <= self.fraction < 1,
            f"The pruning fraction must be in [0, 1) (0.3 zeroes the smallest 30%), got {self.fraction!r}.",
        )
        _check(
            self.scope in PRUNE_SCOPES,
            f"Unknown pruning scope {self.scope!r}: use one of {', '.join(PRUNE_SCOPES)}.",
        )

    @property
    def name(self) -> str:
        scope = "" if self.scope == "tensor" else f",scope={self.scope}"
        return f"prune:{_fmt(self.fraction)}{scope}"

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
        _check(
            _finite(self.fraction) and 0 <= self.fraction < 1,
            f"The masking fraction must be in [0, 1) (0.3 zeroes a random 30%), got {self.fraction!r}.",
        )

    @property
    def name(self) -> str:
        return f"mask:{_fmt(self.fraction)}"

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


# --------------------------------------------------------------------- computing


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD on the client's batch: per-example clipping plus Gaussian noise.

    Abadi et al., 2016, Alg. 1: each example's gradient ``g_i`` is scaled by
    ``min(1, C / ||g_i||)``, the clipped gradients are summed, ``N(0, (zC)^2)`` noise is
    added to every entry, and the sum is divided by the batch size ``B``.

    Per-example gradients come from ``torch.func`` (``vmap(grad)``), or a loop over
    examples when the model cannot be vmapped (see :mod:`fedclient.dp`).

    Clipping scope: by default (``clip_over="all"``) each example's norm is measured over
    **all trainable parameters**, even when only a subset is shared, so the shared
    tensors are exactly the ones a real DP-SGD client (which clips its whole gradient)
    would send. ``clip_over="shared"`` measures the norm over the shared subset only:
    cheaper for large models, and still a valid DP release of that subset, but the
    clipping then differs from a client that shares everything.

    The privacy budget ``epsilon`` at ``delta`` for ``steps`` steps at sampling rate
    ``sample_rate`` comes from Opacus' accountant and is reported in
    ``update.info["epsilon"]`` (``inf`` when ``noise_multiplier`` is 0). The fraction of
    examples clipped is a statistic of the private batch: it goes to the caller's
    :class:`fedclient.client.ClientReport` (``clipped_fraction``), not into the update. The defaults
    (one step, sampling rate 1) account for this single shared update of the full batch.

    For next-token prediction the per-example loss is each sentence's mean token loss,
    so with no clipping and no noise the update is the sentence-averaged gradient (the
    plain FedSGD gradient averages over tokens instead).
    """

    clip_norm: float = 1.0  # C: bound on each example's gradient norm
    noise_multiplier: float = 1.0  # z: noise std is z * C on the summed gradient
    delta: float = 1e-5  # the delta of (epsilon, delta)-DP
    sample_rate: float = 1.0  # q: probability an example is in a step's batch
    steps: int = 1  # number of DP-SGD steps accounted for
    accountant: str = "rdp"  # Opacus accountant: "rdp" or "prv"
    clip_over: str = "all"  # norm over "all" trainable parameters or the "shared" ones
    method: str = "auto"  # per-example gradients: "auto", "vmap" or "loop"

    def __post_init__(self) -> None:
        _check(
            _finite(self.clip_norm) and 0 < self.clip_norm <= MAX_SCALE,
            f"The DP-SGD clipping norm must be a number > 0 and at most {MAX_SCALE:g} (e.g. 1.0), got {self.clip_norm!r}.",
        )
        _check(
            _finite(self.noise_multiplier) and 0 <= self.noise_multiplier <= MAX_SCALE,
            f"The DP-SGD noise multiplier must be a number from 0 to {MAX_SCALE:g} (e.g. 1.0), "
            f"got {self.noise_multiplier!r}.",
        )
        _check(
            _finite(self.delta) and 0 < self.delta < 1,
            f"delta must be in (0, 1), typically below 1 / dataset size (e.g. 1e-5), got {self.delta!r}.",
        )
        _check(
            _finite(self.sample_rate) and 0 < self.sample_rate <= 1,
            f"The sampling rate must be in (0, 1] (batch size / dataset size), got {self.sample_rate!r}.",
        )
        _check(
            isinstance(self.steps, int) and not isinstance(self.steps, bool) and 1 <= self.steps <= MAX_DP_STEPS,
            f"The number of DP-SGD steps must be a whole number from 1 to {MAX_DP_STEPS:,}, got {self.steps!r}.",
        )
        _check(
            self.accountant in ACCOUNTANTS,
            f"Unknown privacy accountant {self.accountant!r}: use one of {', '.join(ACCOUNTANTS)}.",
        )
        _check(
            self.clip_over in CLIP_SCOPES,
            f"Unknown clipping scope {self.clip_over!r}: use one of {', '.join(CLIP_SCOPES)}.",
        )
        _check(
            self.method in PER_EXAMPLE_METHODS,
            f"Unknown per-example gradient method {self.method!r}: use one of {', '.join(PER_EXAMPLE_METHODS)}.",
        )
        # The accountant's own cost (PRV's grid grows with steps and sampling rate).
        check_accountant_cost(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.delta,
            accountant=self.accountant,
        )

    @property
    def name(self) -> str:
        parts = [
            f"clip={_fmt(self.clip_norm)}",
            f"noise={_fmt(self.noise_multiplier)}",
            f"delta={_fmt(self.delta)}",
        ]
        if self.sample_rate != 1.0:
            parts.append(f"rate={_fmt(self.sample_rate)}")
        if self.steps != 1:
            parts.append(f"steps={self.steps}")
        if self.accountant != "rdp":
            parts.append(f"accountant={self.accountant}")
        if self.clip_over != "all":
            parts.append(f"over={self.clip_over}")
        if self.method != "auto":
            parts.append(f"method={self.method}")
        return "dp:" + ",".join(parts)

    @property
    def epsilon(self) -> float:
        """The privacy budget at ``delta`` (Opacus accountant; ``inf`` without noise)."""
        return dp_epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            delta=self.delta,
            accountant=self.accountant,
        )

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, parameters: list[str], generator: torch.Generator
    ) -> SharedUpdate:
        shared = list(parameters)
        norm_names = trainable_names(model) if self.clip_over == "all" else shared
        grad_names = list(dict.fromkeys([*norm_names, *shared]))
        named = dict(model.named_parameters())
        summed = {n: torch.zeros_like(named[n]).detach() for n in shared}
        clipped = 0
        used = self.method
        for grads, used in iter_per_example_gradients(model, batch, parameters=grad_names, method=self.method):
            norms = per_example_norms(grads, norm_names)  # (b,)
            factors = clip_factors(norms, self.clip_norm)  # (b,)
            clipped += int((norms > self.clip_norm).sum())
            for n in shared:
                g = grads[n]  # (b, *shape)
                summed[n] += torch.tensordot(factors.to(g.dtype), g, dims=1)  # (*shape)
            del grads
        std = self.noise_multiplier * self.clip_norm
        size = batch.batch_size
        record_diagnostics(clipped_fraction=clipped / size)  # private: never in the shared update
        out = {n: (s + std * _randn_like(s, generator)) / size if std > 0 else s / size for n, s in summed.items()}
        update = SharedUpdate(
            gradients=out,
            batch_size=size,
            task=batch.task,
            padding_side=getattr(batch, "padding_side", "right"),
        )
        return _with(
            update,
            out,
            self.name,
            epsilon=self.epsilon,
            delta=self.delta,
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            dp_steps=self.steps,
            per_example_method=used,
        )


@dataclass(frozen=True)
class FedAvg:
    """FedAvg local training: the shared update is a weight delta, not a gradient.

    The client runs ``local_steps`` SGD steps with learning rate ``lr`` on a copy of
    the weights (the caller's model is never modified). Step ``s`` uses minibatch
    ``s mod M`` of the batch split in order into ``M`` minibatches of ``minibatch_size``
    examples (the last may be smaller; ``None`` or a size >= B means the full batch).
    This is DAGER's FedAvg setting (Petrov et al., 2024, Sec. 6).

    Sign convention: the update is ``initial - final`` weights, so one step on the full
    batch shares exactly ``lr * gradient`` (the FedSGD gradient scaled by ``lr``).
    ``update.kind`` is ``"fedavg-delta"``. The local steps run in the model's current
    mode (``compute_update`` puts it in eval mode: no dropout, a deterministic update).
    """

    local_steps: int = 1  # E: number of local SGD steps
    lr: float = 0.01  # eta: local learning rate
    minibatch_size: int | None = None  # examples per local step; None: the full batch

    def __post_init__(self) -> None:
        _check(
            isinstance(self.local_steps, int) and not isinstance(self.local_steps, bool)
            and 1 <= self.local_steps <= MAX_LOCAL_STEPS,
            f"FedAvg needs a whole number of local steps from 1 to {MAX_LOCAL_STEPS:,} (e.g. 4), "
            f"got {self.local_steps!r}.",
        )
        _check(
            _finite(self.lr) and 0 < self.lr <= 1e3,
            f"The FedAvg learning rate must be a number > 0 (e.g. 0.01), got {self.lr!r}.",
        )
        _check(
            self.minibatch_size is None
            or (isinstance(self.minibatch_size, int) and not isinstance(self.minibatch_size, bool)
                and 1 <= self.minibatch_size <= MAX_MINIBATCH),
            f"The FedAvg minibatch size must be a whole number from 1 to {MAX_MINIBATCH:,} "
            f"(or omitted for the full batch), "
            f"got {self.minibatch_size!r}.",
        )

    @property
    def name(self) -> str:
        mb = "" if self.minibatch_size is None else f",minibatch={self.minibatch_size}"
        return f"fedavg:steps={self.local_steps},lr={_fmt(self.lr)}{mb}"

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, parameters: list[str], generator: torch.Generator
    ) -> SharedUpdate:
        size = batch.batch_size
        mb = size if self.minibatch_size is None else min(self.minibatch_size, size)
        minibatches = [select_examples(batch, slice(i, min(size, i + mb))) for i in range(0, size, mb)]
        named = dict(model.named_parameters())
        train = trainable_names(model)
        initial = {n: named[n].detach() for n in train}
        frozen = {n: p.detach() for n, p in named.items() if n not in initial}
        buffers = dict(model.named_buffers())
        weights = {n: t.clone() for n, t in initial.items()}
        with torch.enable_grad():
            for step in range(self.local_steps):
                leaves = {n: w.requires_grad_(True) for n, w in weights.items()}
                fmodel = FunctionalModel(model, {**frozen, **buffers, **leaves})
                loss = batch_loss(fmodel, minibatches[step % len(minibatches)])  # type: ignore[arg-type]
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                weights = {
                    n: (w.detach() - self.lr * g) if g is not None else w.detach()
                    for (n, w), g in zip(leaves.items(), grads)
                }
        # Frozen parameters do not move: their delta is zero.
        delta = {
            n: (initial[n] - weights[n]).detach() if n in initial else torch.zeros_like(named[n]).detach()
            for n in parameters
        }
        update = SharedUpdate(
            gradients=delta,
            batch_size=size,
            task=batch.task,
            padding_side=getattr(batch, "padding_side", "right"),
            kind="fedavg-delta",
        )
        return _with(
            update, delta, self.name, local_steps=self.local_steps, lr=self.lr, minibatch_size=mb,
        )


# -------------------------------------------------------------------- aggregating


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
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
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


# ------------------------------------------------------------------------ compose


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
            "aggregate" not in roles or len(flat) == 1 or flat[-1].client_defense is None,  # type: ignore[union-attr]
            "Give the client defenses either in the Compose or as client_defense, not both.",
        )

    @property
    def name(self) -> str:
        return " + ".join(d.name for d in self.defenses)

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


# -------------------------------------------------------------------- parse / describe

SPEC_FORMS = (
    "noise:SIGMA | noise:sigma=SIGMA | noise:var=VARIANCE",
    "dp:clip=C,noise=Z[,delta=D][,rate=Q][,steps=N][,accountant=rdp|prv][,over=all|shared]",
    "prune:P[,scope=tensor|global]",
    "mask:P",
    "fp16 | int8",
    "fedavg:steps=E,lr=ETA[,minibatch=M]",
    "secagg:clients=K[,others=random|copies]",
)
"""The accepted forms of :func:`parse_defense` (shown in its error messages)."""


def _forms() -> str:
    return "; ".join(SPEC_FORMS)


def _number(key: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidConfigError(f"In defense {spec!r}, {key} must be a number, got {text!r}.") from None
    if not math.isfinite(value):
        raise InvalidConfigError(f"In defense {spec!r}, {key} must be a finite number, got {text!r}.")
    return value


def _integer(key: str, text: str, spec: str) -> int:
    value = _number(key, text, spec)
    if not value.is_integer():
        raise InvalidConfigError(f"In defense {spec!r}, {key} must be a whole number, got {text!r}.")
    return int(value)


# kind -> (aliases of kind, positional key, key aliases -> canonical key)
_KEYS: dict[str, tuple[tuple[str, ...], str | None, dict[str, str]]] = {
    "noise": (("noise", "gaussian", "gauss"), "sigma", {"sigma": "sigma", "std": "sigma", "var": "var", "variance": "var"}),
    "dp": (
        ("dp", "dpsgd", "dp-sgd"),
        None,
        {
            "clip": "clip", "c": "clip", "clip_norm": "clip",
            "noise": "noise", "z": "noise", "noise_multiplier": "noise", "sigma": "noise",
            "delta": "delta", "rate": "rate", "q": "rate", "sample_rate": "rate",
            "steps": "steps", "accountant": "accountant", "over": "over", "clip_over": "over",
            "method": "method",
        },
    ),
    "prune": (("prune", "pruning"), "fraction", {"fraction": "fraction", "p": "fraction", "scope": "scope"}),
    "mask": (("mask", "random-mask", "randommask"), "fraction", {"fraction": "fraction", "p": "fraction"}),
    "quant": (("quant", "quantize", "quantise", "precision"), "precision", {"precision": "precision"}),
    "fedavg": (
        ("fedavg",),
        None,
        {
            "steps": "steps", "e": "steps", "local_steps": "steps", "epochs": "steps",
            "lr": "lr", "eta": "lr", "minibatch": "minibatch", "b": "minibatch", "minibatch_size": "minibatch",
        },
    ),
    "secagg": (
        ("secagg", "secure-aggregation", "secureagg"),
        "clients",
        {"clients": "clients", "k": "clients", "others": "others"},
    ),
}


def parse_defense(spec: str) -> Defense:
    """Build one defense from a short spec, for CLIs and the app.

    Forms (see :data:`SPEC_FORMS`): ``noise:1e-3``, ``noise:sigma=1e-3``,
    ``noise:var=1e-4``, ``dp:clip=1.0,noise=1.0,delta=1e-5``, ``prune:0.3``,
    ``mask:0.3``, ``fp16``, ``int8``, ``fedavg:steps=4,lr=0.01,minibatch=2``,
    ``secagg:clients=4``. Every defense's ``name`` is such a spec and parses back to
    an equal defense.

    Raises:
        InvalidConfigError: for an unknown kind, key or value, with the accepted forms.
    """
    text = (spec or "").strip()
    if not text:
        raise InvalidConfigError(f"The defense spec is empty: use one of these forms: {_forms()}.")
    if " + " in text:
        return parse_defenses([p for p in text.split(" + ")])  # type: ignore[return-value]
    head, _, rest = text.partition(":")
    head = head.strip().lower()
    if head in PRECISIONS and not rest.strip():
        return Quantize(head)
    kind = next((k for k, (aliases, _, _) in _KEYS.items() if head in aliases), None)
    if kind is None:
        raise InvalidConfigError(f"Unknown defense {head!r} in {spec!r}: use one of these forms: {_forms()}.")
    _, positional, aliases = _KEYS[kind]
    values: dict[str, str] = {}
    for item in (p.strip() for p in rest.split(",") if p.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            if positional is None or positional in values or values:
                raise InvalidConfigError(
                    f"In defense {spec!r}, write {item!r} as key=value (keys: {', '.join(sorted(set(aliases)))})."
                )
            key, value = positional, item
        canon = aliases.get(key.strip().lower())
        if canon is None:
            raise InvalidConfigError(
                f"Unknown setting {key.strip()!r} in defense {spec!r}: "
                f"use {', '.join(sorted(set(aliases)))} (forms: {_forms()})."
            )
        if canon in values:
            raise InvalidConfigError(f"In defense {spec!r}, {canon} is given twice: keep one.")
        values[canon] = value.strip()
    return _build(kind, values, spec)


def _build(kind: str, v: dict[str, str], spec: str) -> Defense:
    def need(key: str) -> str:
        if key not in v:
            raise InvalidConfigError(f"Defense {spec!r} needs {key}=...: use one of these forms: {_forms()}.")
        return v[key]

    if kind == "noise":
        if "sigma" in v and "var" in v:
            raise InvalidConfigError(f"In defense {spec!r}, give sigma or var, not both.")
        if "var" in v:
            return GaussianNoise.from_variance(_number("var", v["var"], spec))
        return GaussianNoise(_number("sigma", need("sigma"), spec))
    if kind == "dp":
        kwargs: dict[str, object] = {
            "clip_norm": _number("clip", need("clip"), spec),
            "noise_multiplier": _number("noise", need("noise"), spec),
        }
        if "delta" in v:
            kwargs["delta"] = _number("delta", v["delta"], spec)
        if "rate" in v:
            kwargs["sample_rate"] = _number("rate", v["rate"], spec)
        if "steps" in v:
            kwargs["steps"] = _integer("steps", v["steps"], spec)
        for key, attr in (("accountant", "accountant"), ("over", "clip_over"), ("method", "method")):
            if key in v:
                kwargs[attr] = v[key].lower()
        return DPSGD(**kwargs)  # type: ignore[arg-type]
    if kind == "prune":
        return Prune(_number("fraction", need("fraction"), spec), scope=v.get("scope", "tensor").lower())
    if kind == "mask":
        return RandomMask(_number("fraction", need("fraction"), spec))
    if kind == "quant":
        return Quantize(need("precision").lower())
    if kind == "fedavg":
        minibatch = v.get("minibatch")
        return FedAvg(
            local_steps=_integer("steps", v.get("steps", "1"), spec),
            lr=_number("lr", v.get("lr", "0.01"), spec),
            minibatch_size=None if minibatch in (None, "all", "full") else _integer("minibatch", minibatch, spec),
        )
    if kind == "secagg":
        return SecureAggregation(
            clients=_integer("clients", need("clients"), spec), others=v.get("others", "random").lower()
        )
    raise ValueError(f"unknown kind {kind!r}")


def parse_defenses(
    specs: Sequence[str] | str | None,
    *,
    make_other_batch: Callable[[int], Batch] | None = None,
) -> Defense | None:
    """Parse several specs (e.g. repeated ``--defense`` options) into one defense.

    They are ordered by role (computing, then transforms in the order given, then
    secure aggregation), so ``["secagg:clients=4", "noise:1e-3"]`` means every client
    adds noise and the server sees the sum. A single string may hold several specs
    separated by ``;``.

    Args:
        specs: the specs; an empty list or ``None`` means no defense (an empty spec
            string inside it is an error).
        make_other_batch: passed to a secure aggregation (the other clients' data).

    Returns:
        ``None`` (no defense), the single defense, or a :class:`Compose`.

    Raises:
        InvalidConfigError: for a bad spec or an impossible combination.
    """
    if specs is None:
        return None
    items = [specs] if isinstance(specs, str) else list(specs)
    for item in items:
        # An empty spec given explicitly (``--defense ""``) must not silently mean "none".
        if not str(item).replace(";", "").strip():
            raise InvalidConfigError(
                f"A defense spec is empty: leave it out for no defense, or use one of these forms: {_forms()}."
            )
    parts = [p.strip() for item in items for p in item.split(";") if p.strip()]
    parsed: list[Defense] = []
    for p in parts:
        d = parse_defense(p)
        parsed.extend(d.defenses if isinstance(d, Compose) else (d,))
    if make_other_batch is not None:
        parsed = [
            dataclasses.replace(d, make_other_batch=make_other_batch) if isinstance(d, SecureAggregation) else d
            for d in parsed
        ]
    order = {"compute": 0, "transform": 1, "aggregate": 2}
    parsed.sort(key=lambda d: order[_role(d)])  # stable: transforms keep their order
    return compose(*parsed)


def describe(defense: Defense | None) -> str:
    """A one-line, human-readable description of a defense (or of none)."""
    if defense is None:
        return "No defense: the client shares its plain FedSGD gradient."
    if isinstance(defense, Compose):
        return " Then: ".join(describe(d) for d in defense.defenses)
    if isinstance(defense, GaussianNoise):
        return f"Gaussian noise with standard deviation {defense.sigma:g} added to every shared entry."
    if isinstance(defense, Prune):
        where = "of each tensor" if defense.scope == "tensor" else "across all shared tensors"
        return f"Pruning: the {defense.fraction:.0%} smallest-magnitude entries {where} are set to zero."
    if isinstance(defense, RandomMask):
        return f"Random masking: a random {defense.fraction:.0%} of each tensor's entries are set to zero."
    if isinstance(defense, Quantize):
        if defense.precision == "fp16":
            return "Half precision: the update is rounded to fp16."
        return "int8: each tensor is quantised to 8-bit integers with one scale (max |g| / 127)."
    if isinstance(defense, DPSGD):
        eps = defense.epsilon
        eps_text = "no formal privacy (no noise)" if math.isinf(eps) else f"epsilon = {eps:.3g} at delta = {defense.delta:g}"
        return (
            f"DP-SGD: each example's gradient clipped to norm {defense.clip_norm:g}, Gaussian noise with "
            f"multiplier {defense.noise_multiplier:g}; {eps_text} ({defense.steps} step(s), "
            f"sampling rate {defense.sample_rate:g})."
        )
    if isinstance(defense, FedAvg):
        mb = "the full batch" if defense.minibatch_size is None else f"minibatches of {defense.minibatch_size}"
        return (
            f"FedAvg: {defense.local_steps} local SGD step(s) with learning rate {defense.lr:g} over {mb}; "
            "the weight change is shared."
        )
    if isinstance(defense, SecureAggregation):
        who = {
            "random": "clients holding random data",
            "copies": "clients holding copies of the same batch",
        }[defense.others] if defense.make_other_batch is None else "other clients"
        inner = "" if defense.client_defense is None else f" Each client first applies: {describe(defense.client_defense)}"
        return (
            f"Secure aggregation: the server sees only the sum over {defense.clients} clients "
            f"(the attacked one and {defense.clients - 1} {who}).{inner}"
        )
    return f"Custom defense {getattr(defense, 'name', type(defense).__name__)}."


def epsilon_of(defense: Defense | None) -> float | None:
    """The DP epsilon of a defense (or of the DP-SGD inside a Compose), else None."""
    if isinstance(defense, DPSGD):
        return defense.epsilon
    if isinstance(defense, Compose):
        found = [epsilon_of(d) for d in defense.defenses]
        return next((e for e in found if e is not None), None)
    if isinstance(defense, SecureAggregation):
        return epsilon_of(defense.client_defense)
    return None


# -------------------------------------------------------------------- utility cost


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


__all__ = [
    "CLIP_SCOPES",
    "OTHER_CLIENTS",
    "PRECISIONS",
    "PRUNE_SCOPES",
    "SPEC_FORMS",
    "DPSGD",
    "Compose",
    "FedAvg",
    "GaussianNoise",
    "Prune",
    "Quantize",
    "RandomMask",
    "SecureAggregation",
    "UpdateTransform",
    "compose",
    "describe",
    "epsilon_of",
    "fedsgd_update",
    "int8_round_trip",
    "parse_defense",
    "parse_defenses",
    "random_batch_like",
    "utility_cost",
]
