"""Magnitude pruning (Han et al., "Learning both Weights and Connections for Efficient Neural Networks",
NeurIPS 2015; the baseline of Wanda and SparseGPT).

Formula: score S_ij = |W_ij|; the lowest scores are zeroed. Comparison group: **per layer** by default (the
whole weight matrix, as the magnitude baseline in the Wanda and SparseGPT papers), or per output row with
`comparison="row"` (Wanda's grouping). N:M patterns compare within each group of M inputs of a row.
No calibration data is used.
"""

from __future__ import annotations

import torch

from .base import SparsityMethod, mask_lowest

COMPARISONS = ("layer", "row")


def magnitude_mask(weight: torch.Tensor, ratio: float, nm=None, comparison: str = "layer") -> torch.Tensor:
    """Bool mask (True = pruned) of the lowest |W| (per layer or per output row)."""
    if comparison not in COMPARISONS:
        raise ValueError(f"comparison={comparison!r} for magnitude; choose one of {list(COMPARISONS)}")
    return mask_lowest(weight.abs().float(), ratio, nm, dim_group=comparison)


def _prune(weight, stats, ratio, nm, comparison: str = "layer"):
    mask = magnitude_mask(weight, ratio, nm, comparison)
    return weight.masked_fill(mask, 0), mask


def _check(ratio, nm, options: dict) -> dict:
    if options["comparison"] not in COMPARISONS:
        raise ValueError(f"comparison={options['comparison']!r} for magnitude; choose one of {list(COMPARISONS)}")
    return options


METHOD = SparsityMethod(
    name="magnitude", stats="none", prune=_prune, options={"comparison": "layer"}, check=_check,
    description="|W|, per layer (comparison='row': per output row); no calibration",
)
