"""Defenses that recompute the update: DP-SGD and FedAvg local training.

They replace the FedSGD gradient rather than transform it, so in a
:class:`~fedclient.defenses.compose.Compose` at most one of them is given, first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedclient.batch import Batch
from fedclient.client import batch_loss, record_diagnostics
from fedclient.defenses.base import (
    MAX_DP_STEPS,
    MAX_LOCAL_STEPS,
    MAX_MINIBATCH,
    MAX_SCALE,
    _check,
    _finite,
    _fmt,
    _randn_like,
    _with,
)
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

CLIP_SCOPES = ("all", "shared")
"""What DP-SGD's per-example norm is measured over (see :class:`DPSGD`)."""


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

    def describe(self) -> str:
        """One line for people, with the privacy budget."""
        eps = self.epsilon
        eps_text = "no formal privacy (no noise)" if math.isinf(eps) else f"epsilon = {eps:.3g} at delta = {self.delta:g}"
        return (
            f"DP-SGD: each example's gradient clipped to norm {self.clip_norm:g}, Gaussian noise with "
            f"multiplier {self.noise_multiplier:g}; {eps_text} ({self.steps} step(s), "
            f"sampling rate {self.sample_rate:g})."
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

    The client runs local SGD steps with learning rate ``lr`` on a copy of the weights
    (the caller's model is never modified). The batch is split in order into ``M``
    minibatches of ``minibatch_size`` examples (the last may be smaller; ``None`` means
    the full batch, ``M = 1``) and step ``s`` uses minibatch ``s mod M``. With
    ``epochs`` the client makes that many full passes over its data, i.e.
    ``epochs * ceil(B / minibatch_size)`` steps (issue 11: ``epochs`` used to be read
    as an alias of ``steps``); without it, ``local_steps`` steps. This is DAGER's
    FedAvg setting (Petrov et al., 2024, Sec. 6): the server sees one weight delta for
    all of it. A minibatch larger than the batch is refused when the update is computed.

    A half-precision model (``training.precision`` bf16/fp16) trains as a
    mixed-precision client does: fp32 master weights, forward and backward in the
    model's dtype, and the delta shared in that dtype (in pure bf16 a step of
    ``lr = 1e-4`` would round away on most weights).

    Sign convention: the update is ``initial - final`` weights, so one step on the full
    batch shares exactly ``lr * gradient`` (the FedSGD gradient scaled by ``lr``).
    ``update.kind`` is ``"fedavg-delta"``. The local steps run in the model's current
    mode (``compute_update`` puts it in eval mode: no dropout, a deterministic update).
    """

    local_steps: int = 1  # E: number of local SGD steps
    lr: float = 0.01  # eta: local learning rate
    minibatch_size: int | None = None  # examples per local step; None: the full batch
    epochs: int | None = None  # full passes over the data; set: steps = epochs * ceil(B / minibatch)

    def __post_init__(self) -> None:
        _check(
            self.epochs is None
            or (isinstance(self.epochs, int) and not isinstance(self.epochs, bool)
                and 1 <= self.epochs <= MAX_LOCAL_STEPS),
            f"FedAvg needs a whole number of epochs from 1 to {MAX_LOCAL_STEPS:,} (e.g. 2), got {self.epochs!r}.",
        )
        _check(
            isinstance(self.local_steps, int) and not isinstance(self.local_steps, bool)
            and 1 <= self.local_steps <= MAX_LOCAL_STEPS,
            f"FedAvg needs a whole number of local steps from 1 to {MAX_LOCAL_STEPS:,} (e.g. 4), "
            f"got {self.local_steps!r}.",
        )
        _check(
            _finite(self.lr) and 0 < self.lr <= 1e3,
            f"The FedAvg learning rate must be a finite number > 0 (e.g. 1e-4), got {self.lr!r}.",
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
        if self.epochs is not None:
            return f"fedavg:epochs={self.epochs},lr={_fmt(self.lr)}{mb}"
        return f"fedavg:steps={self.local_steps},lr={_fmt(self.lr)}{mb}"

    def steps_for(self, batch_size: int) -> int:
        """The number of local steps on a batch of ``batch_size`` examples."""
        if self.epochs is None:
            return self.local_steps
        mb = batch_size if self.minibatch_size is None else self.minibatch_size
        return self.epochs * math.ceil(batch_size / max(1, mb))

    def describe(self) -> str:
        """One line for people."""
        mb = "the full batch" if self.minibatch_size is None else f"minibatches of {self.minibatch_size}"
        if self.epochs is not None:
            return (
                f"FedAvg: {self.epochs} epoch(s) of local SGD over {mb} with learning rate {self.lr:g}; "
                "the weight change is shared."
            )
        return (
            f"FedAvg: {self.local_steps} local SGD step(s) with learning rate {self.lr:g} over {mb}; "
            "the weight change is shared."
        )

    def __call__(
        self, model: torch.nn.Module, batch: Batch, *, parameters: list[str], generator: torch.Generator
    ) -> SharedUpdate:
        size = batch.batch_size
        if self.minibatch_size is not None and self.minibatch_size > size:
            raise InvalidConfigError(
                f"The FedAvg minibatch of {self.minibatch_size} is larger than the client's batch of {size}: "
                f"use minibatch={size} or less."
            )
        mb = size if self.minibatch_size is None else self.minibatch_size
        minibatches = [select_examples(batch, slice(i, min(size, i + mb))) for i in range(0, size, mb)]
        steps = self.steps_for(size)
        named = dict(model.named_parameters())
        train = trainable_names(model)
        initial = {n: named[n].detach() for n in train}
        frozen = {n: p.detach() for n, p in named.items() if n not in initial}
        buffers = dict(model.named_buffers())
        # fp32 master weights (a no-op copy for an fp32 model): half-precision steps of a
        # small lr would otherwise round away; the forward runs in the model's dtype.
        weights = {n: t.clone().to(torch.float32) if t.is_floating_point() else t.clone() for n, t in initial.items()}
        moved = {n: torch.zeros_like(w) for n, w in weights.items()}  # sum of lr * g, fp32
        with torch.enable_grad():
            for step in range(steps):
                leaves = {n: w.requires_grad_(True) for n, w in weights.items()}
                cast = {n: w.to(initial[n].dtype) for n, w in leaves.items()}
                fmodel = FunctionalModel(model, {**frozen, **buffers, **cast})
                loss = batch_loss(fmodel, minibatches[step % len(minibatches)])  # type: ignore[arg-type]
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                for (n, w), g in zip(leaves.items(), grads):
                    if g is not None:
                        moved[n] = moved[n] + self.lr * g.detach()
                weights = {
                    n: (w.detach() - self.lr * g) if g is not None else w.detach()
                    for (n, w), g in zip(leaves.items(), grads)
                }
        # The delta is the sum of the steps (what initial - final equals): subtracting two
        # fp32 weight sets would add their round-off (~6e-8 |w|), about 1e-3 of a delta at
        # lr = 1e-4, which drowns the weak directions of the span. Frozen parameters: zero.
        delta = {
            n: moved[n].to(initial[n].dtype).detach() if n in initial else torch.zeros_like(named[n]).detach()
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
            update, delta, self.name, local_steps=steps, lr=self.lr, minibatch_size=mb,
            **({"epochs": self.epochs} if self.epochs is not None else {}),
        )
