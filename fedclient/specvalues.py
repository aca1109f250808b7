"""Numbers inside ``kind:key=value`` specs (defenses and client setups), parsed once.

Every message names the spec it came from (``where``: ``"defense 'noise:x'"`` or
``"client spec 'lora:r=x'"``) and the key, in one sentence.
"""

from __future__ import annotations

import math

from fedclient.errors import InvalidConfigError


def spec_number(key: str, text: str, where: str) -> float:
    """``text`` as a finite float, else :class:`InvalidConfigError` naming ``where`` and ``key``."""
    try:
        value = float(text)
    except ValueError:
        raise InvalidConfigError(f"In {where}, {key} must be a number, got {text!r}.") from None
    if not math.isfinite(value):
        raise InvalidConfigError(f"In {where}, {key} must be a finite number, got {text!r}.")
    return value


def spec_integer(key: str, text: str, where: str) -> int:
    """``text`` as a whole number (``"8"`` or ``"8.0"``), else one sentence naming ``key``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):
        raise InvalidConfigError(f"In {where}, {key} must be a whole number, got {text!r}.")
    return int(value)


def format_number(x: float) -> str:
    """A float that reads back exactly (``repr``), without a needless ``.0``."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


__all__ = ["format_number", "spec_integer", "spec_number"]
