"""Defense specs and descriptions: ``parse_defense("dp:clip=1,noise=1")`` and back.

Every defense's ``name`` is its canonical spec string and ``parse_defense(d.name) == d``;
:func:`describe` gives the defense's own one-line explanation and :func:`epsilon_of` its
privacy budget, for the CLIs' reports and the app.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from fedclient.batch import Batch
from fedclient.client import Defense
from fedclient.defenses.aggregation import SecureAggregation
from fedclient.defenses.base import describe
from fedclient.defenses.compose import Compose, _role, compose
from fedclient.defenses.computing import DPSGD, FedAvg
from fedclient.defenses.transforms import PRECISIONS, GaussianNoise, Prune, Quantize, RandomMask
from fedclient.errors import InvalidConfigError
from fedclient.specvalues import spec_integer, spec_number

SPEC_FORMS = (
    "noise:SIGMA | noise:sigma=SIGMA | noise:var=VARIANCE",
    "dp:clip=C,noise=Z[,delta=D][,rate=Q][,steps=N][,accountant=rdp|prv][,over=all|shared]",
    "prune:P[,scope=tensor|global]",
    "mask:P",
    "fp16 | int8",
    "fedavg:epochs=E,lr=ETA[,minibatch=M] | fedavg:steps=S,lr=ETA[,minibatch=M]",
    "secagg:clients=K[,others=random|copies]",
)
"""The accepted forms of :func:`parse_defense` (shown in its error messages)."""


def _forms() -> str:
    return "; ".join(SPEC_FORMS)


def _number(key: str, text: str, spec: str) -> float:
    return spec_number(key, text, f"defense {spec!r}")


def _integer(key: str, text: str, spec: str) -> int:
    return spec_integer(key, text, f"defense {spec!r}")


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
            "steps": "steps", "e": "steps", "local_steps": "steps", "epochs": "epochs", "epoch": "epochs",
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
        if "steps" in v and "epochs" in v:
            raise InvalidConfigError(
                f"In defense {spec!r}, give epochs (full passes over the data) or steps, not both."
            )
        return FedAvg(
            local_steps=_integer("steps", v.get("steps", "1"), spec),
            epochs=_integer("epochs", v["epochs"], spec) if "epochs" in v else None,
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




__all__ = ["SPEC_FORMS", "describe", "epsilon_of", "parse_defense", "parse_defenses"]
