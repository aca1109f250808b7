"""The client's training setup: LoRA adapters, precision and dropout (issue 11).

Today's plain client shares a full-parameter gradient computed in fp32 with dropout off.
Real federated fine-tuning of language models rarely looks like that, so one frozen
config, :class:`ClientTraining`, describes how the client trains, and every face builds
it the same way (:func:`parse_client` from ``--client`` specs, ``--precision`` and
``--dropout``) and hands it to :func:`fedclient.compute_update`'s ``training``:

* **LoRA** (Hu et al., 2021) through peft: the base weights are frozen and the update
  holds only the adapters' gradients (or deltas under FedAvg), keyed by the names peft
  saves them under (``base_model.model.<module>.lora_A.weight``);
* **precision**: the client's model runs and differentiates in fp32, bf16 or fp16, and
  the shared update is in that dtype;
* **dropout**: the model trains in train mode with its own dropout rates, seeded.

FedAvg over epochs of mini-batches stays a computing defense
(``--defense fedavg:epochs=2,minibatch=2,lr=1e-4``) and composes with any setup here.

This module is torch-free, so a command line can parse and check its options before
torch loads; the model-dependent checks (:func:`check_training`) import torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedclient.errors import InvalidConfigError
from fedclient.specvalues import format_number, spec_integer, spec_number

if TYPE_CHECKING:  # pragma: no cover
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")
"""Dtypes the client's model can train in."""

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Precision name -> ``torch`` dtype attribute."""

MAX_LORA_ALPHA = 1e6
"""Largest LoRA alpha (beyond it a value is a typo)."""

CLIENT_FORMS = (
    "lora[:r=R][,alpha=A][,targets=M1|M2][,seed=S]",
    "fp32 | bf16 | fp16 | precision=P",
    "dropout[:p=P]",
)
"""The accepted forms of a ``--client`` spec (shown in error messages)."""


def _forms() -> str:
    return "; ".join(CLIENT_FORMS)


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters on the client (Hu et al., 2021: ``W' = W + (alpha / r) B A``).

    peft initialises ``B = 0``, which makes the A gradient zero at the first step:
    the server learns nothing from a first-round update, and a client in any later
    round holds nonzero adapters, which the server knows (it aggregated them). So the
    adapters here start from a seeded state "after warm-up": A as peft draws it, B
    drawn from ``N(0, init_std^2)``; the server knows both (they are part of the model it
    sent), only the base weights are frozen.

    Attributes:
        r: adapter rank (1 .. the width of the adapted layers).
        alpha: scale numerator; ``None`` means ``alpha = r`` (scale 1).
        targets: module names adapted (suffixes such as ``c_attn`` or ``q_proj``);
            empty: the family's attention input projections.
        seed: seeds the adapters' initial values (public, like every model weight).
        init_std: standard deviation of B's seeded initial values.
    """

    r: int = 16  # adapter rank
    alpha: float | None = None  # scale numerator (None: alpha = r)
    targets: tuple[str, ...] = ()  # adapted modules; (): the attention input projections
    seed: int = 0  # seeds A and B (known to the server)
    init_std: float = 0.02  # std of B's seeded initial values ("after warm-up")

    def __post_init__(self) -> None:
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1):
            raise InvalidConfigError(
                f"The LoRA rank r must be a whole number of at least 1 (e.g. r=16), got {self.r!r}."
            )
        if self.alpha is not None and not (
            isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0 < self.alpha <= MAX_LORA_ALPHA
        ):
            raise InvalidConfigError(
                f"The LoRA alpha must be a number > 0 and at most {MAX_LORA_ALPHA:g} (e.g. alpha=32), got {self.alpha!r}."
            )
        if not all(isinstance(t, str) and t.strip() for t in self.targets):
            raise InvalidConfigError("LoRA targets must be module names such as c_attn or q_proj.")
        if not (isinstance(self.init_std, (int, float)) and math.isfinite(self.init_std) and self.init_std > 0):
            raise InvalidConfigError(f"The LoRA init_std must be a number > 0, got {self.init_std!r}.")

    @property
    def scale(self) -> float:
        """``alpha / r``, the factor of ``B A``."""
        return (self.r if self.alpha is None else self.alpha) / self.r

    @property
    def name(self) -> str:
        parts = [f"r={self.r}"]
        if self.alpha is not None:
            parts.append(f"alpha={_fmt(self.alpha)}")
        if self.targets:
            parts.append("targets=" + "|".join(self.targets))
        if self.seed != 0:
            parts.append(f"seed={self.seed}")
        return "lora:" + ",".join(parts)


@dataclass(frozen=True)
class ClientTraining:
    """How the client trains: adapters, dtype and dropout (one config for every face).

    Attributes:
        lora: LoRA adapters, or ``None`` for full-parameter training.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: the dtype of the client's
            model, of its gradient and of the shared update.
        dropout: train in train mode with the model's own dropout rates (seeded by
            ``compute_update``'s ``seed``); ``False``: eval mode, no dropout.
    """

    lora: LoraSpec | None = None  # adapters; None: every weight trains
    precision: str = "fp32"  # dtype of the model, its gradient and the update
    dropout: bool = False  # train mode with the model's dropout rates, seeded
    dropout_rate: float | None = None  # with dropout: every dropout of the client's copy at this rate

    def __post_init__(self) -> None:
        if self.dropout_rate is not None and not (
            isinstance(self.dropout_rate, (int, float)) and math.isfinite(self.dropout_rate) and 0 <= self.dropout_rate < 1
        ):
            raise InvalidConfigError(f"The dropout rate p must be in [0, 1) (e.g. 0.1), got {self.dropout_rate!r}.")
        if self.dropout_rate is not None and not self.dropout:
            raise InvalidConfigError("A dropout rate needs dropout on: use --client dropout:p=0.1.")
        if self.precision not in PRECISIONS:
            raise InvalidConfigError(
                f"Unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}."
            )
        if not isinstance(self.dropout, bool):
            raise InvalidConfigError(f"dropout must be True or False, got {self.dropout!r}.")

    @property
    def plain(self) -> bool:
        """True for today's client: every weight, fp32, no dropout."""
        return self.lora is None and self.precision == "fp32" and not self.dropout

    @property
    def name(self) -> str:
        """The canonical spec (``parse_client([t.name]) == t``); ``"plain"`` for the default."""
        parts = []
        if self.lora is not None:
            parts.append(self.lora.name)
        if self.precision != "fp32":
            parts.append(self.precision)
        if self.dropout:
            parts.append("dropout" if self.dropout_rate is None else f"dropout:p={_fmt(self.dropout_rate)}")
        return " + ".join(parts) if parts else "plain"

    def record(self) -> dict[str, object]:
        """The setup as JSON values (what a result file records)."""
        lora = None
        if self.lora is not None:
            lora = {
                "r": self.lora.r,
                "alpha": self.lora.r if self.lora.alpha is None else self.lora.alpha,
                "targets": list(self.lora.targets) or "attention inputs",
                "seed": self.lora.seed,
            }
        return {"lora": lora, "precision": self.precision, "dropout": self.dropout, "dropout_rate": self.dropout_rate}

    def describe(self) -> str:
        """One human-readable line."""
        what = "every weight trains" if self.lora is None else (
            f"LoRA adapters of rank {self.lora.r} (scale {self.lora.scale:g}) on "
            f"{', '.join(self.lora.targets) or 'the attention input projections'}; the base weights are frozen"
        )
        rate = "the model's dropout rates" if self.dropout_rate is None else f"dropout rate {self.dropout_rate:g}"
        mode = f"train mode with {rate} (seeded)" if self.dropout else "eval mode (no dropout)"
        return f"Client training: {what}; {self.precision}; {mode}."


_fmt = format_number


def _integer(key: str, text: str, spec: str) -> int:
    return spec_integer(key, text, f"client spec {spec!r}")


def _number(key: str, text: str, spec: str) -> float:
    return spec_number(key, text, f"client spec {spec!r}")


_LORA_KEYS = {"r": "r", "rank": "r", "alpha": "alpha", "targets": "targets", "target": "targets",
              "target_modules": "targets", "seed": "seed"}


def _parse_lora(rest: str, spec: str) -> dict[str, object]:
    values: dict[str, object] = {}
    for item in (p.strip() for p in rest.split(",") if p.strip()):
        key, eq, value = item.partition("=")
        if not eq:
            if values:
                raise InvalidConfigError(f"In client spec {spec!r}, write {item!r} as key=value (keys: r, alpha, targets, seed).")
            key, value = "r", item
        canon = _LORA_KEYS.get(key.strip().lower())
        if canon is None:
            raise InvalidConfigError(
                f"Unknown LoRA setting {key.strip()!r} in {spec!r}: use r, alpha, targets or seed (forms: {_forms()})."
            )
        if canon in values:
            raise InvalidConfigError(f"In client spec {spec!r}, {canon} is given twice: keep one.")
        value = value.strip()
        if canon == "r":
            values["r"] = _integer("r", value, spec)
        elif canon == "alpha":
            values["alpha"] = _number("alpha", value, spec)
        elif canon == "seed":
            values["seed"] = _integer("seed", value, spec)
        elif canon == "targets":
            names = tuple(t.strip() for t in value.replace("+", "|").split("|") if t.strip())
            if not names:
                raise InvalidConfigError(f"In client spec {spec!r}, targets needs module names such as c_attn|c_fc.")
            values["targets"] = names
        else:  # pragma: no cover - the key table above is exhaustive
            raise ValueError(f"unknown key {canon!r}")
    return values


def parse_client(
    specs: Sequence[str] | str | None = None, *, precision: str | None = None, dropout: bool = False
) -> ClientTraining:
    """Build the client's training setup from ``--client`` specs and the shortcut flags.

    Forms (see :data:`CLIENT_FORMS`): ``lora``, ``lora:r=16``, ``lora:r=8,alpha=16,
    targets=q_proj|v_proj``, ``bf16`` (or ``precision=bf16``), ``dropout``. Specs
    repeat (``--client lora:r=16 --client bf16``) and a single string may hold several
    separated by ``;`` or `` + `` (the form :attr:`ClientTraining.name` writes).

    Args:
        specs: the ``--client`` specs; ``None`` or empty: the plain client.
        precision: the ``--precision`` flag (``None``: not given).
        dropout: the ``--dropout`` flag.

    Raises:
        InvalidConfigError: an unknown form or value, or the same setting given twice
            with different values.
    """
    items = [specs] if isinstance(specs, str) else list(specs or [])
    parts: list[str] = []
    for item in items:
        if not str(item).replace(";", "").replace("+", "").strip():
            raise InvalidConfigError(
                f"A --client spec is empty: leave it out for the plain client, or use one of these forms: {_forms()}."
            )
        parts.extend(p.strip() for chunk in str(item).split(";") for p in chunk.split(" + ") if p.strip())
    lora: dict[str, object] | None = None
    chosen: dict[str, object] = {}

    def choose(key: str, value: object, spec: str) -> None:
        if key in chosen and chosen[key] != value:
            raise InvalidConfigError(
                f"The client's {key} is given twice ({chosen[key]!r} and {value!r} in {spec!r}): keep one."
            )
        chosen[key] = value

    for spec in parts:
        head, _, rest = spec.partition(":")
        head = head.strip().lower()
        if head == "lora":
            values = _parse_lora(rest, spec)
            if lora is not None:
                clash = [k for k in values if k in lora and lora[k] != values[k]]
                if clash:
                    raise InvalidConfigError(f"LoRA {clash[0]} is given twice with different values: keep one.")
                lora.update(values)
            else:
                lora = values
        elif head in PRECISIONS and not rest.strip():
            choose("precision", head, spec)
        elif head.startswith("precision=") and not rest.strip():
            value = head.partition("=")[2].strip()
            if value not in PRECISIONS:
                raise InvalidConfigError(f"Unknown precision {value!r} in {spec!r}: use one of {', '.join(PRECISIONS)}.")
            choose("precision", value, spec)
        elif head in ("dropout", "dropout=on", "dropout=true", "dropout=1"):
            choose("dropout", True, spec)
            if rest.strip():
                key, eq, value = rest.strip().partition("=")
                if not eq or key.strip().lower() not in ("p", "rate"):
                    raise InvalidConfigError(f"In client spec {spec!r}, write the rate as dropout:p=0.1.")
                choose("dropout_rate", _number("p", value.strip(), spec), spec)
        else:
            raise InvalidConfigError(f"Unknown client setting {spec!r}: use one of these forms: {_forms()}.")
    if precision is not None:
        if precision not in PRECISIONS:
            raise InvalidConfigError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
        choose("precision", precision, f"--precision {precision}")
    if dropout:
        choose("dropout", True, "--dropout")
    return ClientTraining(
        lora=None if lora is None else LoraSpec(**lora),  # type: ignore[arg-type]
        precision=str(chosen.get("precision", "fp32")),
        dropout=bool(chosen.get("dropout", False)),
        dropout_rate=chosen.get("dropout_rate"),  # type: ignore[arg-type]
    )


def torch_dtype(precision: str) -> torch.dtype:
    """The ``torch`` dtype of a precision name."""
    import torch

    try:
        return getattr(torch, TORCH_DTYPES[precision])
    except KeyError:
        raise InvalidConfigError(f"Unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.") from None


_HALF_OK: dict[tuple[str, str], bool] = {}


def half_precision_works(precision: str, device: str) -> bool:
    """Whether this machine can train a model in ``precision`` on ``device``.

    A tiny linear layer, LayerNorm, softmax and their backward run once per
    (precision, device); a CPU build without those kernels raises, which answers no.
    """
    key = (precision, str(device))
    if key not in _HALF_OK:
        import torch

        dtype = torch_dtype(precision)
        try:
            x = torch.randn(4, 8, device=device).to(dtype).requires_grad_(True)
            lin = torch.nn.Linear(8, 8).to(device=device, dtype=dtype)
            ln = torch.nn.LayerNorm(8).to(device=device, dtype=dtype)
            y = torch.nn.functional.gelu(lin(ln(x))).softmax(-1).sum()
            y.backward()
            _HALF_OK[key] = bool(x.grad is not None and torch.isfinite(x.grad.float()).all())
        except (RuntimeError, TypeError, NotImplementedError):
            _HALF_OK[key] = False
    return _HALF_OK[key]


def check_training(training: ClientTraining, model: object, *, device: str = "cpu") -> None:
    """Refuse a setup this model or machine cannot train, before anything runs.

    Raises:
        InvalidConfigError: r is larger than the adapted layers' width, a LoRA target
            names no module of the model, or the device cannot compute in the precision.
    """
    if training.precision != "fp32" and not half_precision_works(training.precision, device):
        raise InvalidConfigError(
            f"This {device.upper() if device == 'cpu' else device} cannot train in {training.precision} "
            "(its PyTorch build lacks the kernels): use --precision fp32, or bf16 / --device cuda."
        )
    if training.lora is not None:
        from fedclient.lora import check_lora

        check_lora(training.lora, model)


def describe_training(training: ClientTraining | None) -> str:
    """One line for a setup, or for the plain client."""
    return (training or ClientTraining()).describe()


def info_of(training: ClientTraining) -> Mapping[str, float | int | str]:
    """What the server knows of the setup, for :attr:`SharedUpdate.info` (numbers, strings)."""
    info: dict[str, float | int | str] = {"precision": training.precision, "dropout": int(training.dropout)}
    if training.lora is not None:
        info.update(lora_r=training.lora.r, lora_alpha=float(training.lora.r if training.lora.alpha is None
                                                             else training.lora.alpha))
    return info


__all__ = [
    "CLIENT_FORMS",
    "PRECISIONS",
    "ClientTraining",
    "LoraSpec",
    "check_training",
    "describe_training",
    "half_precision_works",
    "info_of",
    "parse_client",
    "torch_dtype",
]
