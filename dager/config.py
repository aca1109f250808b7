"""Configuration of the DAGER attack (one frozen dataclass, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass

from fedclient.errors import InvalidConfigError


@dataclass(frozen=True)
class DagerConfig:
    """Settings of one DAGER run; the defaults need no per-batch tuning.

    Attributes:
        rank_tolerance: relative eigenvalue cut (of the largest eigenvalue of the
            float64 Gram matrix) that decides the rank of a gradient's input space.
        layer1_threshold: acceptance threshold on the relative layer-1 distance;
            ``None`` derives it from the sorted distances (largest gap past the rank).
        layer2_threshold: acceptance threshold on the relative layer-2 distance;
            ``None`` derives it from the distances of the first search step.
        max_prefixes: search budget: the most prefixes (decoder) kept alive at one
            position; the best ones are kept and ``budget_exhausted`` is reported.
        max_combinations: encoder search budget: the most candidate sequences
            evaluated; ``combinations_capped`` is reported when it is hit. 40k: on
            minilm-l6 at B=4 (``messages.txt``, 8 batches) 20k gave 93.8% exact and 40k
            96.9% (2.5 s a batch); on one CPU a batch of four long sentences needed
            more than 20k (floating-point differences between CPUs move the search).
        noise_tolerant: rank candidates by distance and keep the best ones instead of
            fixed thresholds, so updates with small noise (defenses) still leak. It is
            also the request for a best effort when the layer-1 span is full (rank at
            or above 0.95 d): without it such a run stops at the rank step with the
            ``span_full`` warning; with it the search runs, bounded by
            ``max_prefixes`` and ``time_budget_s``.
        top_k_plot: how many of the smallest vocabulary distances each
            :class:`~dager.events.TokensFiltered` event carries (for plots).
        time_budget_s: wall-clock budget of one attack in seconds, checked in the
            layer-1 filter, after every item of the search (at least every chunk of
            work) and in the greedy completion; when it is reached the attack stops
            and returns what it found, exact sentences still exact and the search's
            surviving prefixes as inexact partial ones (``time_budget`` warning,
            ``StopReason.TIME_BUDGET``). ``None``: no limit (the CLI's default; the
            app passes one).
        device: torch device the attack computes on (``"cpu"`` or ``"cuda"``).
    """

    rank_tolerance: float = 1e-6
    layer1_threshold: float | None = None
    layer2_threshold: float | None = None
    max_prefixes: int = 1024
    max_combinations: int = 40_000
    noise_tolerant: bool = False
    top_k_plot: int = 200
    time_budget_s: float | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not 0.0 < self.rank_tolerance < 1.0:
            raise InvalidConfigError(
                f"rank_tolerance must lie strictly between 0 and 1 (got {self.rank_tolerance}); "
                "1e-6 is a good default."
            )
        for name in ("layer1_threshold", "layer2_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise InvalidConfigError(
                    f"{name} must lie strictly between 0 and 1, or be None for automatic "
                    f"(got {value})."
                )
        if self.max_prefixes < 1:
            raise InvalidConfigError(f"max_prefixes must be at least 1 (got {self.max_prefixes}).")
        if self.max_combinations < 1:
            raise InvalidConfigError(
                f"max_combinations must be at least 1 (got {self.max_combinations})."
            )
        if self.top_k_plot < 1:
            raise InvalidConfigError(f"top_k_plot must be at least 1 (got {self.top_k_plot}).")
        if self.time_budget_s is not None and not (
            isinstance(self.time_budget_s, (int, float)) and 0 < self.time_budget_s < float("inf")
        ):
            raise InvalidConfigError(
                f"time_budget_s must be a positive number of seconds, or None for no limit "
                f"(got {self.time_budget_s})."
            )
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise InvalidConfigError(
                f"device must be 'cpu' or 'cuda' (got {self.device!r})."
            )
