"""What every visual-token pruning method shares: budgets, their allocation over images, the method registry entry.

Budgets. `prune_budget` is either a float in (0, 1], the share of a sample's prunable visual tokens kept,
or an int >= 1, the number of prunable visual tokens kept per sample. A float keeps
round-half-up(budget x n) tokens (at least 1), an int min(budget, n). Projector-side methods prune each
image/video ("segment") separately; the sample's count is split over its segments in proportion to their
sizes (largest remainder, at least one token per segment). Tokens that are never pruned (LLaVA-OneVision's
image-newline tokens) are not prunable and do not count against the budget.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch

from ..budget import validate_budget as validate_share_or_count


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def validate_budget(budget, method: str) -> float | int:
    """A float in (0, 1] (share of visual tokens kept) or an int >= 1 (visual tokens kept per sample)."""
    return validate_share_or_count(budget, f"prune_budget for {method!r}", "visual tokens", "visual tokens kept per sample")


def keep_count(budget: float | int, n: int) -> int:
    """Visual tokens kept out of `n` prunable ones under `budget` (see the module docstring)."""
    if n <= 0:
        return 0
    if isinstance(budget, float):
        return min(n, max(1, round_half_up(budget * n)))
    return min(n, int(budget))


def allocate(total: int, sizes: list[int]) -> list[int]:
    """Split `total` kept tokens over segments of `sizes` tokens: one each first (while `total` allows,
    largest segments first), the rest in proportion to the remaining sizes by largest remainder."""
    sizes = [int(s) for s in sizes]
    counts = [0] * len(sizes)
    order = sorted((i for i, s in enumerate(sizes) if s > 0), key=lambda i: (-sizes[i], i))
    for i in order[:total]:
        counts[i] = 1
    rest = total - sum(counts)
    room = [s - c for s, c in zip(sizes, counts)]
    if rest <= 0 or sum(room) == 0:
        return counts
    quotas = [rest * r / sum(room) for r in room]
    floors = [min(r, int(math.floor(q))) for q, r in zip(quotas, room)]
    left = rest - sum(floors)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - floors[i]), i))
    for i in by_remainder:
        if left == 0:
            break
        if floors[i] < room[i]:
            floors[i] += 1
            left -= 1
    return [c + f for c, f in zip(counts, floors)]


@dataclass(frozen=True)
class Selection:
    """What a projector-side method returns for one segment: `indices` `[k]` (ascending) of the tokens that
    stay, and their `features` `[k, d]` (merged ones where the method merges)."""

    indices: torch.Tensor
    features: torch.Tensor


@dataclass(frozen=True)
class PruneMethod:
    """A registry entry: where the method acts, its default budget and its options (a frozen dataclass whose
    fields have defaults and whose `__post_init__` checks them, `checked`)."""

    name: str
    stage: str  # "projector": before the language model; "llm": inside it, at layer K
    default_budget: float | None  # None: the method picks its own count (PruMerge's IQR rule)
    options: type
    select: Callable | None = None  # projector methods: select(features, scores, keys, keep, **options) -> Selection
    aliases: tuple[str, ...] = ()

    def option_names(self) -> set[str]:
        return {option.name for option in fields(self.options)}

    def resolve_options(self, options: dict) -> dict:
        """Every option of the method, its defaults filled in, checked; a `ValueError` naming the fix otherwise."""
        unknown = set(options) - self.option_names()
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)} for prune={self.name!r}; valid options: "
                             f"{sorted(self.option_names())}")
        return asdict(self.options(**options))


def checked(options, **checks: Callable) -> None:
    """In an options dataclass's `__post_init__`: each named field checked and normalised by its check."""
    for name, check in checks.items():
        object.__setattr__(options, name, check(getattr(options, name)))


def positive_int(name: str, minimum: int = 1):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        return int(value)

    return check


def optional_int(name: str):
    def check(value):
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an int (a layer index, negative counts from the end) or None, got {value!r}")
        return int(value)

    return check


def unit_fraction(name: str):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
        return float(value)

    return check
