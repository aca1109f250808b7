"""Per-example gradients, per-example clipping and privacy accounting for DP-SGD.

DP-SGD (Abadi et al., 2016, "Deep Learning with Differential Privacy", Alg. 1) clips
each example's gradient to norm ``C``, sums, adds ``N(0, (zC)^2)`` and divides by the
batch size. Clipping needs one gradient per example; this module computes them with
``torch.func`` (``functional_call`` + ``vmap(grad)``, the approach of Opacus' functorch
grad sampler) and falls back to a loop over examples when a model cannot be vmapped.

Hugging Face text models read their 2D attention mask in Python control flow
(``transformers.masking_utils`` checks ``mask.all()`` to skip mask creation), which
``vmap`` cannot trace. For families whose mask we know (declared in :mod:`fedclient.families`, keyed by
``config.model_type``), the vmapped per-example call therefore passes the equivalent
ready-made 4D additive mask, which transformers forwards as is. Other models are tried
with their 2D mask and fall back to the loop if that fails. Both paths compute the same
numbers (tests compare them).

The privacy budget comes from Opacus' accountants (RDP by default, PRV on request),
never from a hand-written formula.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch.func import functional_call, grad, vmap

from fedclient.batch import Batch, ImageBatch, TextBatch
from fedclient.client import batch_loss
from fedclient.errors import InvalidConfigError
from fedclient.families import FAMILIES

log = logging.getLogger(__name__)

# The attention pattern of each family's 4D mask comes from its declaration
# (fedclient.families: FamilyAdapter.mask_kind). Only families whose 4D mask is exactly
# "padding (and causality)" may be declared; a family with sliding windows or custom
# position logic must not be added without a test that compares the vmapped gradients
# with the per-example loop.


def __getattr__(name: str) -> object:
    # MASK_KINDS, the old table, now derived from the family declarations.
    if name == "MASK_KINDS":
        return {t: f.mask_kind for t, f in FAMILIES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PER_EXAMPLE_METHODS = ("auto", "vmap", "loop")
"""``auto``: vmap, falling back to the loop if the model cannot be vmapped."""

ACCOUNTANTS = ("rdp", "prv")
"""Opacus accountants: Renyi DP (Mironov 2017) and PRV (Gopi et al. 2021)."""

DEFAULT_CHUNK_BYTES = 2 * 1024**3
"""Per-example gradients are computed in chunks of examples of at most about this size."""


# --------------------------------------------------------------------------- batches


def batch_tensors(batch: Batch) -> tuple[tuple[torch.Tensor, ...], Callable[..., Batch]]:
    """The per-example tensors of a batch (batch dim first) and how to rebuild one.

    Returns:
        ``(tensors, rebuild)`` where ``rebuild(*tensors)`` makes a batch of the same kind
        (task, padding side) from tensors sliced along dim 0.
    """
    if isinstance(batch, TextBatch):
        task, side = batch.task, batch.padding_side

        def rebuild_text(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> Batch:
            return TextBatch(input_ids=ids, attention_mask=mask, labels=labels, task=task, padding_side=side)

        return (batch.input_ids, batch.attention_mask, batch.labels), rebuild_text
    if isinstance(batch, ImageBatch):
        image_task = batch.task

        def rebuild_image(images: torch.Tensor, labels: torch.Tensor) -> Batch:
            return ImageBatch(images=images, labels=labels, task=image_task)

        return (batch.images, batch.labels), rebuild_image
    raise ValueError(f"unknown batch type {type(batch).__name__}")


def select_examples(batch: Batch, index: torch.Tensor | slice | Sequence[int]) -> Batch:
    """The sub-batch of the examples at ``index`` (same task and padding)."""
    tensors, rebuild = batch_tensors(batch)
    if not isinstance(index, slice):
        index = torch.as_tensor(list(index) if not isinstance(index, torch.Tensor) else index, dtype=torch.long)
    return rebuild(*(t[index] for t in tensors))


# ------------------------------------------------------------------ functional model


def _additive_mask(mask_2d: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """A ``(B, 1, T, T)`` additive attention mask from a ``(B, T)`` padding mask.

    0 where a query may attend to a key, the dtype's minimum elsewhere (transformers'
    convention, understood by both its eager and SDPA attention).
    """
    keep = mask_2d.bool()[:, None, None, :]  # (B, 1, 1, T)
    t = mask_2d.shape[-1]
    if kind == "causal":
        causal = torch.ones(t, t, dtype=torch.bool, device=mask_2d.device).tril()  # (T, T)
        keep = keep & causal  # (B, 1, T, T)
    elif kind == "bidirectional":
        keep = keep.expand(-1, -1, t, -1)  # (B, 1, T, T)
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    zero = torch.zeros((), dtype=dtype, device=mask_2d.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask_2d.device)
    return torch.where(keep, zero, low)


class FunctionalModel:
    """Calls ``model`` with substituted tensors (``torch.func.functional_call``).

    It quacks like the model for :func:`fedclient.client.batch_loss`, which lets the
    client's own loss be differentiated with respect to a parameter dict, vmapped, or
    evaluated at locally trained weights without touching the caller's model.

    Args:
        model: the module whose code runs.
        tensors: parameter and buffer name -> tensor to use instead of the module's own.
        mask_kind: when set (``"causal"`` / ``"bidirectional"``), a 2D ``attention_mask``
            keyword is replaced by the equivalent 4D additive mask (see module docs).
    """

    def __init__(
        self, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], mask_kind: str | None = None
    ) -> None:
        self.model = model
        self.tensors = dict(tensors)
        self.mask_kind = mask_kind

    def __call__(self, *args: object, **kwargs: object) -> object:
        mask = kwargs.get("attention_mask")
        if self.mask_kind is not None and isinstance(mask, torch.Tensor) and mask.ndim == 2:
            kwargs["attention_mask"] = _additive_mask(mask, self.mask_kind, _float_dtype(self.tensors))
        return functional_call(self.model, self.tensors, args, kwargs)


def _float_dtype(tensors: Mapping[str, torch.Tensor]) -> torch.dtype:
    for t in tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def mask_kind_for(model: torch.nn.Module) -> str | None:
    """The 4D mask kind for a model's family, or None when no family is declared for it."""
    family = FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None) or "")
    return None if family is None else family.mask_kind


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require a gradient, in model order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------ per-example gradients


def per_example_gradients(
    model: torch.nn.Module,
    batch: Batch,
    *,
    parameters: Sequence[str],
    method: str = "auto",
) -> tuple[dict[str, torch.Tensor], str]:
    """One gradient per example of the client's per-example loss.

    The per-example loss is ``batch_loss(..., reduction="none")``: for next-token
    prediction that is each sentence's mean token loss (so the mean of the per-example
    gradients is the sentence-averaged, not the token-averaged, FedSGD gradient).

    Args:
        model: the model (not modified; put it in eval mode for deterministic results).
        batch: the private batch of ``B`` examples.
        parameters: the parameter names to differentiate.
        method: ``"vmap"``, ``"loop"`` or ``"auto"`` (vmap, else loop).

    Returns:
        ``(grads, method_used)``: name -> ``(B, *param.shape)`` tensor, and the method
        that produced them.

    Raises:
        InvalidConfigError: for an unknown method.
        RuntimeError: when ``method="vmap"`` and the model cannot be vmapped.
    """
    chunks = iter_per_example_gradients(model, batch, parameters=parameters, method=method, chunk_bytes=None)
    grads, used = next(chunks)
    return grads, used


def iter_per_example_gradients(
    model: torch.nn.Module,
    batch: Batch,
    *,
    parameters: Sequence[str],
    method: str = "auto",
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES,
) -> Iterator[tuple[dict[str, torch.Tensor], str]]:
    """Per-example gradients, chunk by chunk of examples, to bound memory.

    Yields:
        ``(grads, method_used)`` per chunk, examples in batch order; ``grads`` maps each
        name to ``(b, *param.shape)`` for the ``b`` examples of the chunk.
    """
    if method not in PER_EXAMPLE_METHODS:
        raise InvalidConfigError(
            f"Unknown per-example gradient method {method!r}: use one of {', '.join(PER_EXAMPLE_METHODS)}."
        )
    named = dict(model.named_parameters())
    names = list(dict.fromkeys(parameters))
    size = batch.batch_size
    if chunk_bytes is None:
        per_chunk = size
    else:
        bytes_per_example = sum(named[n].numel() * named[n].element_size() for n in names)
        per_chunk = max(1, min(size, chunk_bytes // max(1, bytes_per_example)))
    use = method
    for start in range(0, size, per_chunk):
        part = select_examples(batch, slice(start, min(size, start + per_chunk)))
        if use in ("auto", "vmap"):
            try:
                yield _vmap_gradients(model, part, names), "vmap"
                use = "vmap"
                continue
            except (RuntimeError, NotImplementedError) as exc:
                if use == "vmap":
                    raise
                log.info("per-example gradients: vmap failed (%s); using a loop over examples", type(exc).__name__)
                use = "loop"
        yield _loop_gradients(model, part, names), "loop"


def _vmap_gradients(model: torch.nn.Module, batch: Batch, names: list[str]) -> dict[str, torch.Tensor]:
    """``vmap(grad(per-example loss))`` over the batch (torch.func)."""
    named = dict(model.named_parameters())
    diff = {n: named[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in named.items() if n not in diff}
    buffers = dict(model.named_buffers())
    mask_kind = mask_kind_for(model) if isinstance(batch, TextBatch) else None
    tensors, rebuild = batch_tensors(batch)

    def example_loss(params: dict[str, torch.Tensor], *example: torch.Tensor) -> torch.Tensor:
        one = rebuild(*(t.unsqueeze(0) for t in example))  # a batch of one example
        fmodel = FunctionalModel(model, {**frozen, **buffers, **params}, mask_kind)
        return batch_loss(fmodel, one, reduction="none")[0]  # type: ignore[arg-type]

    in_dims = (None, *([0] * len(tensors)))
    with torch.enable_grad(), warnings.catch_warnings():
        # SDPA has no vmap batching rule on some builds: torch then loops over examples for
        # that one op and warns each time; the result is the same, so keep the CLI quiet.
        warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
        grads = vmap(grad(example_loss), in_dims=in_dims)(diff, *tensors)
    return {n: grads[n].detach() for n in names}


def _loop_gradients(model: torch.nn.Module, batch: Batch, names: list[str]) -> dict[str, torch.Tensor]:
    """The reference: one backward pass per example."""
    named = dict(model.named_parameters())
    targets = [named[n] for n in names]
    rows: list[list[torch.Tensor]] = []
    with torch.enable_grad():
        for i in range(batch.batch_size):
            loss = batch_loss(model, select_examples(batch, [i]), reduction="none")[0]
            got = torch.autograd.grad(loss, targets, allow_unused=True)
            rows.append([torch.zeros_like(t) if g is None else g.detach() for g, t in zip(got, targets)])
    return {n: torch.stack([row[j] for row in rows]) for j, n in enumerate(names)}


# ------------------------------------------------------------------------- clipping


def per_example_norms(grads: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> torch.Tensor:
    """``(B,)`` L2 norms of each example's gradient over ``names`` (default: all keys)."""
    keys = list(grads) if names is None else list(names)
    # One fused norm per tensor (no float64 copy of the gradients), squared and summed in float64.
    squares = [torch.linalg.vector_norm(grads[n].flatten(1), dim=1).double().pow(2) for n in keys]  # each (B,)
    return torch.stack(squares).sum(dim=0).sqrt().to(grads[keys[0]].dtype)


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``min(1, C / norm)`` per example: examples above the bound are scaled onto it."""
    return torch.where(norms > clip_norm, clip_norm / norms.clamp(min=1e-30), torch.ones_like(norms))


def clip_per_example(
    grads: Mapping[str, torch.Tensor],
    clip_norm: float,
    *,
    norm_over: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip each example's gradient to L2 norm at most ``clip_norm``.

    Args:
        grads: name -> ``(B, ...)`` per-example gradients.
        clip_norm: the bound ``C``.
        norm_over: the names the norm is measured over (default: all of ``grads``).

    Returns:
        ``(clipped, norms)``: the clipped per-example gradients (every key scaled by the
        same per-example factor) and the ``(B,)`` norms before clipping.
    """
    norms = per_example_norms(grads, norm_over)
    factors = clip_factors(norms, clip_norm)
    clipped = {n: g * factors.view(-1, *([1] * (g.ndim - 1))).to(g.dtype) for n, g in grads.items()}
    return clipped, norms


# ----------------------------------------------------------------------- accounting


PRV_MAX_POINTS = 5_000_000
"""Largest discretisation grid the PRV accountant may build (measured on this lab's
machine: about 160 bytes of peak memory per point, so about 0.8 GB here). Opacus sizes
the grid from the steps, the sampling rate and the noise; one million steps at rate 1
asked for 3.6e11 points (2.59 TiB) and died."""

_ACCOUNTANT_FAILURES = (MemoryError, OverflowError, FloatingPointError, ValueError, RuntimeError, ZeroDivisionError)


def _accountant(accountant: str, noise_multiplier: float, sample_rate: float, steps: int):  # noqa: ANN202
    """An Opacus accountant holding ``steps`` identical steps.

    The history is set in one entry (as Opacus' own ``get_noise_multiplier`` does)
    rather than by calling ``step()`` ``steps`` times.
    """
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return acc


def prv_grid_points(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> int | None:
    """The size of the grid Opacus' PRV accountant would build, or ``None`` if unknown.

    Computed the way ``PRVAccountant.get_epsilon`` sizes it (``_get_domain``, with its
    default errors), without building it. It reads a private Opacus method, so any
    failure means "unknown" rather than an error.
    """
    if noise_multiplier <= 0:
        return None
    try:
        from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

        acc = _accountant("prv", noise_multiplier, sample_rate, steps)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            domain = acc._get_domain(  # noqa: SLF001 - the only way to know the cost beforehand
                prvs=[PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)],
                num_self_compositions=[steps],
                eps_error=0.01,
                delta_error=delta / 1000,
            )
        return int(domain.size)
    except Exception:  # noqa: BLE001 - an estimate only; dp_epsilon still guards the real call
        return None


def check_accountant_cost(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str
) -> None:
    """Refuse accounting that would exhaust the machine (PRV's grid), before running it.

    Raises:
        InvalidConfigError: the PRV accountant would need more than
            :data:`PRV_MAX_POINTS` grid points.
    """
    if accountant != "prv":
        return
    points = prv_grid_points(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta)
    if points is not None and points > PRV_MAX_POINTS:
        gib = points * 160 / 1024**3
        raise InvalidConfigError(
            f"The PRV accountant would need about {gib:,.1f} GiB of memory for {steps:,} steps at sampling "
            f"rate {sample_rate:g} and noise {noise_multiplier:g}: use accountant=rdp, or fewer steps or a "
            "lower sampling rate."
        )


def dp_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The privacy budget epsilon at ``delta`` of ``steps`` DP-SGD steps (Opacus).

    The accountant holds ``steps`` steps of ``(noise_multiplier, sample_rate)`` (the
    same history ``accountant.step`` would build) and the total is read with
    ``accountant.get_epsilon(delta)``. A noise multiplier of 0 gives no privacy: ``inf``.

    Raises:
        InvalidConfigError: for an unknown accountant, accounting too large for this
            machine, or an accountant that fails on these numbers (the message says
            what to change).
    """
    if accountant not in ACCOUNTANTS:
        raise InvalidConfigError(f"Unknown privacy accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}.")
    if noise_multiplier <= 0:
        return math.inf
    return _cached_epsilon(float(noise_multiplier), float(sample_rate), int(steps), float(delta), accountant)


@functools.lru_cache(maxsize=64)
def _cached_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """:func:`dp_epsilon` after its checks; cached because the CLI and the app ask for the
    same budget several times (description, JSON, update info) and PRV takes seconds."""
    check_accountant_cost(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant
    )
    acc = _accountant(accountant, noise_multiplier, sample_rate, steps)
    try:
        with warnings.catch_warnings():
            # numpy overflow inside PRV's tails; RDP's "optimal order is the smallest alpha"
            warnings.simplefilter("ignore")
            return float(acc.get_epsilon(delta=delta))
    except _ACCOUNTANT_FAILURES as exc:
        raise InvalidConfigError(
            f"Opacus' {accountant.upper()} accountant could not compute epsilon for {steps:,} steps at sampling "
            f"rate {sample_rate:g}, noise {noise_multiplier:g} and delta {delta:g} ({type(exc).__name__}): "
            f"try accountant={'rdp' if accountant == 'prv' else 'prv'}, fewer steps or more noise."
        ) from None
