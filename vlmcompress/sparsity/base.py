"""What every sparsity method shares: argument checks, N:M patterns, mask selection, the registry entry.

Conventions (all methods):

* A Linear weight `W` is `[out_features, in_features]`; masks are bool tensors of `W`'s shape, **True =
  pruned** (set to an exact 0).
* Unstructured: a comparison group of `n` weights loses exactly `prune_count(ratio, n)` =
  floor(ratio x n) weights, the ones with the lowest score (per output row for Wanda, per layer or per row
  for magnitude, per block of 128 columns for SparseGPT).
* `"N:M"`: at most N nonzero weights in every M consecutive input weights of a row (NVIDIA's 2:4); the
  M - N lowest-scoring of every group are pruned, so the sparsity is 1 - N/M (0.5 for 2:4 and 4:8).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

PATTERNS = ("unstructured", "2:4", "4:8")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern) -> tuple[int, int] | None:
    """None for "unstructured", (N, M) for "N:M" (N nonzeros kept in every M); ValueError otherwise."""
    if isinstance(pattern, str) and pattern.strip().lower() == "unstructured":
        return None
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(
            f"sparsity_pattern={pattern!r} is not valid; choose one of {list(PATTERNS)} "
            f"(or any 'N:M' with 0 < N < M: N nonzeros kept in every M consecutive input weights)"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"sparsity_pattern={pattern!r}: an N:M pattern needs 0 < N < M, e.g. '2:4' or '4:8'")
    return n, m


def validate_ratio(ratio) -> float:
    """A number in [0, 1): the share of weights set to zero (0 leaves the model untouched)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"sparsity_ratio must be a number in [0, 1) (share of weights zeroed), got {ratio!r}")
    ratio = float(ratio)
    if math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise ValueError(
            f"sparsity_ratio={ratio!r} is out of range: it is the share of weights zeroed, in [0, 1) "
            f"(1.0 would delete every weight; 0 leaves the model untouched)"
        )
    return ratio


def check_nm_ratio(ratio: float, nm: tuple[int, int] | None, pattern) -> None:
    if nm is None or ratio == 0.0:
        return
    n, m = nm
    implied = 1.0 - n / m
    if abs(ratio - implied) > 1e-9:
        raise ValueError(
            f"sparsity_pattern={pattern!r} fixes the sparsity at 1 - {n}/{m} = {implied:g}, "
            f"but sparsity_ratio={ratio:g}: pass sparsity_ratio={implied:g} (or use pattern='unstructured')"
        )


def check_nm_divides(name: str, in_features: int, nm: tuple[int, int] | None) -> None:
    """ValueError naming the layer when M does not divide its input width."""
    if nm is None:
        return
    n, m = nm
    if in_features % m:
        raise ValueError(
            f"sparsity_pattern '{n}:{m}' needs the input width of every pruned layer to be a multiple of {m}, "
            f"but {name} has in_features={in_features}: use pattern='unstructured', an N:M pattern whose M "
            f"divides {in_features}, or leave this layer out (targets=...)"
        )


def prune_count(ratio: float, n: int) -> int:
    """Weights pruned out of a comparison group of `n` (floor(ratio x n), robust to float error)."""
    return min(n, int(math.floor(ratio * n + 1e-9)))


def mask_lowest(score: torch.Tensor, ratio: float, nm: tuple[int, int] | None = None, dim_group: str = "row"):
    """Bool mask (True = pruned) of the lowest scores of `score` `[out, in]`.

    dim_group: "row" compares within each output row, "layer" across the whole matrix (unstructured only).
    With `nm=(N, M)` the M-N lowest of every M consecutive inputs of a row are pruned.
    """
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        rows, cols = score.shape
        grouped = score.reshape(rows, cols // m, m)
        idx = torch.topk(grouped, m - n, dim=-1, largest=False).indices
        return mask.reshape(rows, cols // m, m).scatter_(-1, idx, True).reshape(rows, cols)
    if dim_group == "layer":
        k = prune_count(ratio, score.numel())
        if k:
            idx = torch.topk(score.flatten(), k, largest=False).indices
            mask.view(-1)[idx] = True
        return mask
    k = prune_count(ratio, score.shape[1])
    if k:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


# Keyword options of `sparsify` that every method takes, besides its own (`SparsityMethod.options`).
COMMON_OPTIONS = ("targets", "num_samples", "progress", "calibration_seed")


@dataclass(frozen=True)
class SparsityMethod:
    """A registry entry: how a method is called and what statistics it needs from calibration.

    stats: "none" (no calibration), "norm" (sum of squares of each input feature, Wanda) or "hessian"
    (X^T X, SparseGPT). prune(weight_fp32, stats, ratio, nm, **options) -> (new weight, mask).
    """

    name: str
    stats: str
    prune: Callable
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""
    # check(ratio, nm, options) -> options: the method's own options checked (a ValueError naming the fix) and
    # completed for this ratio and N:M pattern, before any weight is read
    check: Callable | None = None

    def option_names(self) -> set[str]:
        return set(COMMON_OPTIONS) | set(self.options)
