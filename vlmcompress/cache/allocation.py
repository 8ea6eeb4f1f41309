"""How many tokens each layer keeps: an allocation over layers that works with any policy.

`Uniform` keeps the mean budget in every layer. `Pyramid` (PyramidKV) and `Density` (VL-Cache) spread the same
mean unevenly, as kvpress's `AdaKVPress(scorer)` wraps any scorer: `CompressedCache(policy=SnapKV(),
allocation=Pyramid())`. Counts are per sample, on the CPU (host decisions: top-k widths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .context import PromptContext
from .policy import Policy, Scores


@dataclass(frozen=True)
class Uniform:
    """Every layer keeps each sample's mean budget."""

    needs_all_layers: ClassVar[bool] = False  # a layer's count waits for every layer's scores

    def layer_budgets(self, policy: Policy, ctx: PromptContext) -> torch.Tensor:
        """Tokens to keep in `ctx.layer_idx`, `[b]` on the CPU."""
        return ctx.budget


@dataclass(frozen=True)
class Pyramid:
    """PyramidKV (Cai et al., 2024): over the tokens the policy always keeps (w), layer l keeps m_l more, m_l
    falling linearly from 2m - m/beta (first layer) to m/beta (last), m = budget - w; mean exactly the budget."""

    needs_all_layers: ClassVar[bool] = False

    beta: float = 20.0  # the ratio of the mean (less the always-kept tokens) to the last layer's

    def __post_init__(self):
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise ValueError(f"beta must be >= 1 (ratio of the mean to the last layer's budget), got {self.beta!r}")

    def pyramid(self, mean: int, length: int, num_layers: int, window: int) -> list[int]:
        """Per-layer token counts for one sample, mean exactly `mean`, each within [window, length]."""
        window = min(window, mean)
        spread = mean - window
        low = spread / self.beta
        high = 2 * spread - low
        if num_layers == 1:
            weights = [1.0]
        else:
            weights = [high - (high - low) * layer / (num_layers - 1) for layer in range(num_layers)]
        extra = integer_allocation(weights, spread * num_layers, upper=length - window)
        return [window + e for e in extra]

    def layer_budgets(self, policy: Policy, ctx: PromptContext) -> torch.Tensor:
        window = policy.always_kept(ctx)
        counts = [
            self.pyramid(int(mean), int(length), ctx.num_layers, window)[ctx.layer_idx]
            for mean, length in zip(ctx.budget.tolist(), ctx.real_length.tolist())
        ]
        return torch.tensor(counts)


@dataclass(frozen=True)
class Density:
    """VL-Cache (Tu et al., 2025): layer budgets proportional to the layer's attention density (the policy's
    `Scores.density`), at least 1 and at most the prompt, mean exactly the budget."""

    needs_all_layers: ClassVar[bool] = True

    def allocate_all_layers(self, contexts: list[PromptContext], scores: list[Scores]) -> list[torch.Tensor]:
        """Per-layer budgets, a list over layers of `[b]` on the CPU."""
        if any(layer.density is None for layer in scores):
            raise ValueError("the density allocation needs a policy that measures attention density (VL-Cache's)")
        first = contexts[0]
        # one device-to-host copy of every layer's densities (not one per layer and sample)
        densities = torch.stack([layer.density for layer in scores], dim=1).tolist()  # [b][layer]
        per_sample = [integer_allocation(row, int(mean) * len(contexts), upper=int(length), lower=1)
                      for row, mean, length in zip(densities, first.budget.tolist(), first.real_length.tolist())]
        counts = torch.tensor(per_sample, device=first.budget.device)  # [b, layers]
        return list(counts.T)


def integer_allocation(weights: list[float], total: int, upper: int, lower: int = 0) -> list[int]:
    """Integers in [lower, upper], proportional to `weights`, summing exactly to `total`.

    Shares above `upper` are clipped and their excess redistributed over the others in
    proportion to their weights (water-filling); the rounding goes by largest remainder.
    """
    count = len(weights)
    if not lower * count <= total <= upper * count:
        raise ValueError(f"cannot split {total} tokens over {count} layers within [{lower}, {upper}] each")
    spare = total - lower * count
    room = upper - lower
    weights = [max(0.0, float(w)) for w in weights]
    if sum(weights) == 0:
        weights = [1.0] * count
    shares = [0.0] * count
    free = list(range(count))
    while free:
        mass = sum(weights[i] for i in free)
        left = spare - sum(shares[i] for i in range(count) if i not in free)
        proposal = {i: (left * weights[i] / mass if mass > 0 else left / len(free)) for i in free}
        clipped = [i for i in free if proposal[i] > room]
        if not clipped:
            for i in free:
                shares[i] = proposal[i]
            break
        for i in clipped:
            shares[i] = room
        free = [i for i in free if i not in clipped]
    counts = [min(room, math.floor(s + 1e-9)) for s in shares]
    remainder = spare - sum(counts)
    order = sorted(range(count), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order:
        if remainder == 0:
            break
        if counts[i] < room:
            counts[i] += 1
            remainder -= 1
    return [lower + c for c in counts]

