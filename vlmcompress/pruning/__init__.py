"""Visual-token pruning: FastV, VisionZip, PruMerge, PruMerge+, written once against plain tensors.

Each method is a small module with a `METHOD` registry entry (where it acts, defaults, options) and a
selection function: tensors in (features, attention scores, keys), indices and merged features out.
Where the tensors come from in each architecture is the business of `vlmcompress.models`.
"""

from __future__ import annotations

from . import fastv, prumerge, prumerge_plus, visionzip
from .base import PruneMethod, Selection, allocate, keep_count, validate_budget
from .fastv import fastv_keep
from .flops import prefill_flops
from .prumerge import iqr_outlier_count, prumerge_select
from .prumerge_plus import prumerge_plus_select
from .visionzip import visionzip_select
from ..registry import Registry

PRUNE_METHODS = Registry("visual-token pruning")
for method in (fastv, visionzip, prumerge, prumerge_plus):
    PRUNE_METHODS.register(method.METHOD)


def get_method(name: str) -> PruneMethod:
    """The registry entry of `name` (case-insensitive; "prumerge_plus" etc. are aliases of "prumerge+")."""
    return PRUNE_METHODS.lookup(name)


def validate_prune_args(method: str, budget=None, **options) -> tuple[str, float | int | None]:
    """Check a method name, its budget and options; return (canonical name, budget).

    A budget of None takes the method's default (FastV 0.5, VisionZip 192/576); for PruMerge and PruMerge+
    None means adaptive (the IQR rule picks the count).
    """
    spec = get_method(method)
    spec.resolve_options(options)
    if budget is None:
        return spec.name, spec.default_budget
    return spec.name, validate_budget(budget, spec.name)


__all__ = [
    "PRUNE_METHODS", "PruneMethod", "Selection", "get_method", "validate_prune_args",
    "validate_budget", "keep_count", "allocate", "prefill_flops", "fastv_keep", "visionzip_select",
    "prumerge_select", "prumerge_plus_select", "iqr_outlier_count",
]
