"""DLG on text: the baseline that DAGER is raced against.

Following Zhu et al. (2019, Sec. 4.2, "language model"), the attacker optimises
continuous dummy input embeddings (fed to the model as ``inputs_embeds``) and dummy soft
labels so that the gradient they produce matches the shared one, then decodes each
embedding to the vocabulary token whose input embedding is most similar (cosine).

Threat model, as for DAGER: the attacker has the model and the shared update (the same
:class:`~fedclient.update.SharedUpdate` DAGER sees) and knows the batch size; as in the
DLG paper it assumes a sequence length (:attr:`TextDlgConfig.seq_len`). Gradients of the
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

from dlg.attack import gradient_distance, warm_up_optimizers
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
            special tokens included); ``None`` means 8.
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
    params = {n: named[n] for n in names}
    target = {n: update[n].detach().to(device) for n in names}
    batch_size = int(update.batch_size)
    seq_len = config.seq_len or 8
    task = update.task
    vocab, width = emb_matrix.shape
    if task == "classification":
        label_shape: tuple[int, ...] = (batch_size, int(model.config.num_labels))
    elif task == "next-token":
        label_shape = (batch_size, seq_len - 1, int(vocab))
        if seq_len < 2:
            raise InvalidConfigError("seq_len must be at least 2 for next-token prediction.")
    else:
        raise LabInputError(f"The text baseline does not support the task {task!r}.")

    yield DlgStarted(
        method="dlg-text",
        model=str(getattr(bundle, "name", "model")),
        batch_size=batch_size,
        iterations=config.iterations,
        restarts=1,
    )

    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        scale = float(emb_matrix.std())
        unit_vocab = torch.nn.functional.normalize(emb_matrix.detach().float(), dim=-1)  # (V, d)
    embeds = (torch.randn((batch_size, seq_len, width), generator=gen) * scale).to(device)
    embeds.requires_grad_(True)  # (B, T, d) dummy input embeddings
    label_logits = torch.randn(label_shape, generator=gen).to(device).requires_grad_(True)
    # The embedding step is relative to the embedding scale (GPT-2's init std is 0.02,
    # MiniLM's trained one about 0.05), so one lr fits every model.
    opt = torch.optim.Adam(
        [
            {"params": [embeds], "lr": config.lr * max(scale, 1e-4)},
            {"params": [label_logits], "lr": 0.1},
        ]
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[int(config.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.3
    )

    def decode(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            sims = torch.nn.functional.normalize(x.detach().float(), dim=-1) @ unit_vocab.T  # (B, T, V)
            return sims.argmax(dim=-1).cpu()  # (B, T)

    def texts(ids: torch.Tensor) -> tuple[str, ...]:
        return tuple(bundle.decode(row.tolist()).strip() for row in ids)  # type: ignore[attr-defined]

    losses: list[float] = []
    best_loss, best_embeds = math.inf, embeds.detach().clone()
    deadline = math.inf if config.time_budget_s is None else t0 + config.time_budget_s
    stop_reason = "budget"
    last_event = time.perf_counter()
    for it in range(1, config.iterations + 1):
        if time.perf_counter() >= deadline:
            stop_reason = "time_budget"  # finish with the best guess so far
            break
        opt.zero_grad()
        loss_d = _dummy_loss(model, task, embeds, label_logits)
        grads = torch.autograd.grad(loss_d, list(params.values()), create_graph=True)
        loss = gradient_distance(dict(zip(names, grads)), target, config.distance)
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            log.debug("text DLG diverged at iteration %d", it)
            stop_reason = "diverged"
            break
        if value < best_loss:
            best_loss, best_embeds = value, embeds.detach().clone()
        opt.step()
        sched.step()
        losses.append(value)
        now = time.perf_counter()
        due = (it % config.preview_every == 0 or it == config.iterations) and now - last_event >= config.preview_seconds
        if due or now - last_event >= HEARTBEAT_SECONDS:
            last_event = now
            ids = decode(embeds)
            yield TextDlgStep(iteration=it, loss=value, token_ids=ids, texts=texts(ids))

    ids = decode(best_embeds)
    result = TextDlgResult(
        sentences=texts(ids),
        token_ids=tuple(tuple(int(t) for t in row) for row in ids),
        losses=tuple(losses),
        seconds=time.perf_counter() - t0,
        stop_reason=stop_reason,
    )
    yield TextDlgFinished(result=result)


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
