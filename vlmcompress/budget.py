"""The budget rule shared by KV eviction and visual-token pruning.

A float in (0, 1] is a share, kept as round-half-up(share × n) tokens; an int >= 1 is a count of
tokens. Where a share rounds to no token, KV eviction raises (`CompressedCache.budget_tokens`) and
pruning keeps one (`pruning.keep_count`).
"""

from __future__ import annotations

import math
import numbers


def validate_budget(budget, name: str, share_of: str, count_of: str) -> float | int:
    """`budget` as a float share or an int count; a `ValueError` naming the valid forms otherwise.

    name: the argument's name in messages (`kv_budget`); share_of / count_of: what a float is a
    share of and what an int counts (`prompt tokens`, `tokens kept per layer`).
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(
            f"{name} must be a float in (0, 1] (share of {share_of} kept) or an int >= 1 ({count_of}), got {budget!r}"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"{name}={budget} keeps no token: use an int >= 1 or a float in (0, 1]")
        return int(budget)
    budget = float(budget)
    if math.isnan(budget) or not 0.0 < budget <= 1.0:
        raise ValueError(
            f"{name}={budget} is out of range: a float budget is the share of {share_of} kept, in (0, 1]; "
            f"for a number of tokens pass an int"
        )
    return budget
