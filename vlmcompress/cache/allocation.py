"""Integer budgets over layers: the rounding every non-uniform allocation (PyramidKV, VL-Cache) shares."""

from __future__ import annotations

import math


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

