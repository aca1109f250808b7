"""DLG on text: the baseline that DAGER is raced against.

Following Zhu et al. (2019, Sec. 4.2, "language model"), the attacker optimises
continuous dummy input embeddings (fed to the model as ``inputs_embeds``) and dummy soft
labels so that the gradient they produce matches the shared one, then decodes each
embedding to the vocabulary token whose input embedding is most similar (cosine).

Threat model, as for DAGER: the attacker has the model and the shared update (the same
:class:`~fedclient.update.SharedUpdate` DAGER sees) and knows the batch size. The
sequence length is not handed over from the private batch: :func:`infer_seq_len` reads
it off the update (the position-embedding rows past the longest sequence get no
gradient); where it cannot (RoPE models have no position embedding; noise hides the
zero rows) the attack makes an explicit guess (:func:`guess_seq_len`) and reports it as
such (:attr:`dlg.events.TextDlgResult.seq_len_source`). Gradients of the
input-embedding matrix are not matched: with ``inputs_embeds`` the dummy batch never
looks rows up, so that gradient carries no signal for the optimisation.

It is a baseline: on transformers with random or pretrained weights it usually recovers
only some tokens, far from DAGER's exact recovery. It is measured honestly, not tuned to
look good.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dlg.objective import gradient_distance
from dlg.optimize import warm_up_optimizers
from dlg.events import DlgStarted, TextDlgEvent, TextDlgFinished, TextDlgResult, TextDlgStep
from fedclient.errors import InvalidConfigError, LabInputError
from fedclient.update import SharedUpdate

log = logging.getLogger(__name__)

DISTANCES = ("l2", "cosine")

HEARTBEAT_SECONDS = 0.3
"""A step event at least this often (whenever an iteration ends past it), so a face can
stop the run promptly; one iteration is the finest grain (a full-model double backward)."""


@dataclass(frozen=True)
class TextDlgConfig:
    """Settings of the text baseline.

    Attributes:
        iterations: Adam steps.
        lr: Adam step size on the embeddings, relative to the embedding matrix's
            standard deviation (the label logits use 0.1).
        seq_len: the sequence length the attacker assumes (tokens per example,
            special tokens included); ``None`` (the default): inferred from the update
            (:func:`infer_seq_len`), else guessed (:func:`guess_seq_len`).
        distance: gradient distance, ``"l2"`` (DLG) or ``"cosine"`` (Geiping et al.;
            more stable on deep transformers, the default).
        preview_every: emit a decoded guess every this many iterations.
        preview_seconds: at most one step event per this many seconds.
        seed: seeds the dummy initialisation.
        device: ``"cpu"`` or ``"cuda"``.
        time_budget_s: wall-clock budget of the attack in seconds; when it is reached
            the attack stops and reports the best reconstruction so far (stop reason
            ``"time_budget"``). ``None``: no limit (the CLI's default; the app passes one).
    """

    iterations: int = 100
    lr: float = 0.1
    seq_len: int | None = None
    distance: str = "cosine"
    preview_every: int = 5
    preview_seconds: float = 0.25
    seed: int = 0
    device: str = "cpu"
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.time_budget_s is not None and not (
            math.isfinite(self.time_budget_s) and self.time_budget_s > 0
        ):
            raise InvalidConfigError(
                f"time_budget_s must be a positive number of seconds, or None (got {self.time_budget_s})."
            )
        if not 1 <= self.iterations <= 100_000:
            raise InvalidConfigError(f"iterations must be between 1 and 100000, got {self.iterations}.")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidConfigError(f"lr must be a positive number, got {self.lr}.")
        if self.seq_len is not None and not 1 <= self.seq_len <= 512:
            raise InvalidConfigError(f"seq_len must be between 1 and 512, got {self.seq_len}.")
        if self.distance not in DISTANCES:
            raise InvalidConfigError(f"distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}.")
        if self.preview_every < 1:
            raise InvalidConfigError(f"preview_every must be at least 1, got {self.preview_every}.")
        if self.preview_seconds < 0:
            raise InvalidConfigError(f"preview_seconds must be zero or positive, got {self.preview_seconds}.")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidConfigError(f"device must be 'cpu' or 'cuda', got {self.device!r}.")


LABEL_LR = 0.1
"""Adam step size of the dummy label logits."""

MIN_EMBEDDING_SCALE = 1e-4
"""Floor of the embedding matrix's std when it scales the embeddings' step."""

LR_MILESTONES = (3 / 8, 5 / 8, 7 / 8)
"""Fractions of the iterations at which the step sizes decay."""

LR_DECAY = 0.3
"""Factor of each step-size decay."""

POSITION_EMBEDDING_SUFFIXES = ("wpe.weight", "position_embeddings.weight")
"""Names (suffixes) of absolute position-embedding tables: GPT-2's ``wpe``, BERT's
``position_embeddings``. Families with rotary positions (Llama) have none."""

DEFAULT_SEQ_LEN = 8
"""The guess when the update says nothing about the length (DLG assumes one too)."""


def _model_of(bundle_or_model: object) -> torch.nn.Module:
    model = getattr(bundle_or_model, "model", bundle_or_model)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a model bundle or a torch module, got {type(bundle_or_model).__name__}")
    return model


def _nonzero_rows(g: torch.Tensor) -> torch.Tensor:
    """``(R,)`` bool: which rows of a ``(R, d)`` gradient are not exactly zero."""
    return g.detach().reshape(g.shape[0], -1).ne(0).any(dim=1)


def infer_seq_len(bundle_or_model: object, update: SharedUpdate) -> int | None:
    """The padded sequence length of the client's batch, read off the shared update.

    Row ``p`` of an absolute position-embedding table only gets a gradient when some
    example has a real token at position ``p``: padding does not reach the loss, so
    the rows past the longest sequence are exactly zero. The last non-zero row + 1 is
    the longest sequence, which is the batch's padded length (right or left padding).
    For next-token prediction the last token of a sequence predicts nothing and, under
    causal attention, influences nothing else, so its row is zero too: the length is
    one more. This uses only what the server sees.

    Args:
        bundle_or_model: a :class:`dager.zoo.ModelBundle` or the model itself.
        update: the shared update.

    Returns:
        The length, or ``None`` when the update cannot tell: no position embedding
        (RoPE), its gradient not shared, or no zero rows (e.g. noise was added).
    """
    model = _model_of(bundle_or_model)
    names = [n for n, _ in model.named_parameters() if n.endswith(POSITION_EMBEDDING_SUFFIXES)]
    name = next((n for n in names if n in update), None)
    if name is None:
        return None
    used = _nonzero_rows(update[name])  # (P,)
    if not bool(used.any()) or bool(used.all()):
        return None  # nothing, or everything (noise): no zero tail to read
    last = int(used.nonzero().max())
    return last + 2 if update.task == "next-token" else last + 1


def guess_seq_len(bundle_or_model: object, update: SharedUpdate) -> int:
    """The attacker's guess when :func:`infer_seq_len` cannot tell.

    The input-embedding gradient has a non-zero row per distinct token the batch used
    (when it is shared and not noised), so at least ``ceil(distinct / batch size)``
    tokens per example were used; otherwise :data:`DEFAULT_SEQ_LEN`. A lower bound, so
    it is reported as a guess.
    """
    model = _model_of(bundle_or_model)
    emb = model.get_input_embeddings().weight
    name = next((n for n, p in model.named_parameters() if p is emb), None)
    if name is None or name not in update:
        return DEFAULT_SEQ_LEN
    used = _nonzero_rows(update[name])  # (V,)
    distinct = int(used.sum())
    if distinct == 0 or distinct == used.numel():  # nothing, or dense (noise, tied output head)
        return DEFAULT_SEQ_LEN
    return max(2, min(512, -(-distinct // max(1, int(update.batch_size)))))


def resolve_seq_len(bundle_or_model: object, update: SharedUpdate, config: TextDlgConfig) -> tuple[int, str]:
    """``(seq_len, source)``: the config's (``"given"``), inferred, or guessed."""
    if config.seq_len is not None:
        return config.seq_len, "given"
    inferred = infer_seq_len(bundle_or_model, update)
    if inferred is not None and inferred <= 512:
        return inferred, "inferred"
    return guess_seq_len(bundle_or_model, update), "guessed"


def _dummy_loss(
    model: torch.nn.Module, task: str, embeds: torch.Tensor, label_logits: torch.Tensor
) -> torch.Tensor:
    """The client's training loss on the dummy batch (soft labels), mean over the batch."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)  # (B, T)
    # Fused attention kernels have no double backward; the math kernel does, and
    # selecting it here leaves the shared model's configuration untouched.
    with sdpa_kernel(SDPBackend.MATH):
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    if task == "classification":
        # logits (B, K), label_logits (B, K)
        return -(torch.softmax(label_logits, -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
    if task == "next-token":
        # logits (B, T, V) predict tokens 1..T-1 from 0..T-2; label_logits (B, T-1, V)
        logp = torch.log_softmax(logits[:, :-1, :], -1)  # (B, T-1, V)
        return -(torch.softmax(label_logits, -1) * logp).sum(-1).mean()
    raise LabInputError(f"The text baseline does not support the task {task!r}.")


@torch.enable_grad()  # gradient matching differentiates gradients, whatever the caller's mode
def iter_dlg_text(
    bundle: object,
    update: SharedUpdate,
    *,
    config: TextDlgConfig = TextDlgConfig(),
) -> Iterator[TextDlgEvent]:
    """Run DLG on text against a shared update, as an event stream.

    Args:
        bundle: a :class:`dager.zoo.ModelBundle` (model, tokenizer, task).
        update: the shared update from :func:`fedclient.compute_update` on this model.
        config: the attack settings.

    Yields:
        One :class:`DlgStarted` (method ``"dlg-text"``), throttled
        :class:`TextDlgStep` events with the current nearest-token decoding, and one
        :class:`TextDlgFinished` with one sentence per example. A step comes at least
        after every iteration that ends :data:`HEARTBEAT_SECONDS` after the last event.
        Closing the generator stops the attack at once; ``config.time_budget_s`` stops
        it with the best guess so far (stop reason ``"time_budget"``).

    Raises:
        LabInputError: the update holds none of the model's (non-embedding) parameters,
            or its task is unsupported.
    """
    warm_up_optimizers()  # torch's one-off optimizer start-up, outside the clock
    t0 = time.perf_counter()
    setup = _text_setup(bundle, update, config)
    yield DlgStarted(method="dlg-text", model=str(getattr(bundle, "name", "model")),
                     batch_size=setup.batch_size, iterations=config.iterations, restarts=1)
    dummies = _Dummies(setup, config)

    def texts(ids: torch.Tensor) -> tuple[str, ...]:
        return tuple(bundle.decode(row.tolist()).strip() for row in ids)  # type: ignore[attr-defined]

    losses: list[float] = []
    best_loss, best_embeds = math.inf, dummies.embeds.detach().clone()
    deadline = math.inf if config.time_budget_s is None else t0 + config.time_budget_s
    stop_reason = "budget"
    last_event = time.perf_counter()
    for it in range(1, config.iterations + 1):
        if time.perf_counter() >= deadline:
            stop_reason = "time_budget"  # finish with the best guess so far
            break
        snapshot = dummies.embeds.detach().clone()
        value = dummies.step(setup, config)
        if not math.isfinite(value):
            log.debug("text DLG diverged at iteration %d", it)
            stop_reason = "diverged"
            break
        if value < best_loss:
            best_loss, best_embeds = value, snapshot  # the loss is that of the iterate before the step
        losses.append(value)
        now = time.perf_counter()
        due = (it % config.preview_every == 0 or it == config.iterations) and now - last_event >= config.preview_seconds
        if due or now - last_event >= HEARTBEAT_SECONDS:
            last_event = now
            ids = dummies.decode(dummies.embeds)
            yield TextDlgStep(iteration=it, loss=value, token_ids=ids, texts=texts(ids))

    ids = dummies.decode(best_embeds)
    result = TextDlgResult(
        sentences=texts(ids),
        token_ids=tuple(tuple(int(t) for t in row) for row in ids),
        losses=tuple(losses),
        seconds=time.perf_counter() - t0,
        seq_len=setup.seq_len,
        seq_len_source=setup.seq_len_source,
        stop_reason=stop_reason,
    )
    yield TextDlgFinished(result=result)


@dataclass(frozen=True)
class _TextSetup:
    """What the attack reads off the model and the update (internal)."""

    model: torch.nn.Module
    params: dict[str, torch.Tensor]
    target: dict[str, torch.Tensor]
    task: str
    batch_size: int
    seq_len: int
    seq_len_source: str
    label_shape: tuple[int, ...]


def _text_setup(bundle: object, update: SharedUpdate, config: TextDlgConfig) -> _TextSetup:
    """Check the model and the update; choose the sequence length and the label shape."""
    model: torch.nn.Module = bundle.model  # type: ignore[attr-defined]
    device = torch.device(config.device)
    if next(model.parameters()).device != device:
        raise InvalidConfigError(
            f"The model is on {next(model.parameters()).device}, the attack on {device}: load the "
            "model on the attack's device."
        )
    model.eval()
    emb_matrix = model.get_input_embeddings().weight  # (V, d)
    named = dict(model.named_parameters())
    names = [n for n in update if n in named and named[n] is not emb_matrix]
    if not names:
        raise LabInputError(
            "The shared update holds no parameter of this model besides the input embeddings; "
            "the text baseline needs the other layers' gradients."
        )
    batch_size = int(update.batch_size)
    seq_len, seq_len_source = resolve_seq_len(model, update, config)
    log.debug("text DLG: seq_len %d (%s)", seq_len, seq_len_source)
    task = update.task
    if task == "classification":
        label_shape: tuple[int, ...] = (batch_size, int(model.config.num_labels))
    elif task == "next-token":
        label_shape = (batch_size, seq_len - 1, int(emb_matrix.shape[0]))
        if seq_len < 2:
            raise InvalidConfigError("seq_len must be at least 2 for next-token prediction.")
    else:
        raise LabInputError(f"The text baseline does not support the task {task!r}.")
    return _TextSetup(model=model, params={n: named[n] for n in names},
                      target={n: update[n].detach().to(device) for n in names}, task=task,
                      batch_size=batch_size, seq_len=seq_len, seq_len_source=seq_len_source,
                      label_shape=label_shape)


class _Dummies:
    """The dummy embeddings and label logits, their optimizer, and the decoding (internal)."""

    def __init__(self, setup: _TextSetup, config: TextDlgConfig) -> None:
        device = torch.device(config.device)
        emb_matrix = setup.model.get_input_embeddings().weight  # (V, d)
        gen = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            scale = float(emb_matrix.std())
            self.unit_vocab = torch.nn.functional.normalize(emb_matrix.detach().float(), dim=-1)  # (V, d)
        shape = (setup.batch_size, setup.seq_len, int(emb_matrix.shape[1]))
        self.embeds = (torch.randn(shape, generator=gen) * scale).to(device)
        self.embeds.requires_grad_(True)  # (B, T, d) dummy input embeddings
        self.label_logits = torch.randn(setup.label_shape, generator=gen).to(device).requires_grad_(True)
        # The embedding step is relative to the embedding scale (GPT-2's init std is 0.02,
        # MiniLM's trained one about 0.05), so one lr fits every model.
        self.opt = torch.optim.Adam([
            {"params": [self.embeds], "lr": config.lr * max(scale, MIN_EMBEDDING_SCALE)},
            {"params": [self.label_logits], "lr": LABEL_LR},
        ])
        milestones = [int(config.iterations * f) for f in LR_MILESTONES]
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=milestones, gamma=LR_DECAY)

    def step(self, setup: _TextSetup, config: TextDlgConfig) -> float:
        """One Adam step on the gradient distance; the loss before the step (no step if not finite)."""
        loss_d = _dummy_loss(setup.model, setup.task, self.embeds, self.label_logits)
        grads = torch.autograd.grad(loss_d, list(setup.params.values()), create_graph=True)
        loss = gradient_distance(dict(zip(setup.params, grads)), setup.target, config.distance)
        # The gradient of the dummies only: backward() would also fill the shared
        # model's .grad with weight gradients nobody reads (the app caches that model:
        # +336 MB held after a race on gpt2-small-random) and pay to compute them.
        self.embeds.grad, self.label_logits.grad = torch.autograd.grad(loss, [self.embeds, self.label_logits])
        value = float(loss.detach())
        if math.isfinite(value):
            self.opt.step()
            self.sched.step()
        return value

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` the vocabulary tokens nearest (cosine) to ``(B, T, d)`` embeddings."""
        with torch.no_grad():
            sims = torch.nn.functional.normalize(x.detach().float(), dim=-1) @ self.unit_vocab.T  # (B, T, V)
            return sims.argmax(dim=-1).cpu()


def run_dlg_text(
    bundle: object, update: SharedUpdate, *, config: TextDlgConfig = TextDlgConfig()
) -> TextDlgResult:
    """Run :func:`iter_dlg_text` to the end and return its result."""
    result: TextDlgResult | None = None
    for event in iter_dlg_text(bundle, update, config=config):
        if isinstance(event, TextDlgFinished):
            result = event.result
    assert result is not None
    return result
