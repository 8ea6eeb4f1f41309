"""PruMerge+ (Shang et al., 2024, arXiv:2403.15388, Sec. "PruMerge+").

Rule: PruMerge's IQR outliers plus spatially uniform samples (every int(step/3)-th token from int(step/6),
step = int(n / outliers), skipping outliers, as in the released code), then the same k-nearest merge.

Budget: by default (`prune_budget=None`) the count is adaptive (outliers + uniform samples). A budget fixes
the total: min(outliers, keep) highest-attention tokens, the rest of `keep` filled with tokens evenly spaced
over the remaining ones (raster order), so both halves of the rule stay and the count is exact.
"""

from __future__ import annotations

import torch

from .base import PruneMethod, Selection
from .prumerge import MERGE_K, MergeOptions, iqr_outlier_count, merge_neighbours


def uniform_samples(n: int, outliers: int) -> list[int]:
    """The released code's spatial samples for `outliers` IQR outliers among `n` tokens."""
    step = max(1, int(1 / (outliers / n)))
    return list(range(int(step / 6), n - 1, max(1, int(step / 3))))


def prumerge_plus_select(features, scores, keys, keep: int | None = None, merge_k: int = MERGE_K, **_) -> Selection:
    n = features.shape[0]
    outliers = iqr_outlier_count(scores)
    ranked = scores.double().argsort(descending=True)
    if keep is None:
        top = ranked[:outliers]
        is_top = torch.zeros(n, dtype=torch.bool, device=features.device)
        is_top[top] = True
        extra = torch.tensor([i for i in uniform_samples(n, outliers) if not is_top[i]], dtype=torch.long,
                             device=features.device)
    else:
        keep = min(int(keep), n)
        top = ranked[: min(outliers, keep)]
        is_top = torch.zeros(n, dtype=torch.bool, device=features.device)
        is_top[top] = True
        rest = (~is_top).nonzero().squeeze(-1)
        fill = keep - top.numel()
        picks = [int((i + 0.5) * rest.numel() / fill) for i in range(fill)] if fill > 0 else []
        extra = rest[torch.tensor(picks, dtype=torch.long, device=features.device)]
    kept = torch.cat([top, extra.to(top.device)]).sort().values
    return Selection(kept, merge_neighbours(features, scores, keys, kept, merge_k))


METHOD = PruneMethod(
    name="prumerge+",
    stage="projector",
    default_budget=None,
    options=MergeOptions,
    select=prumerge_plus_select,
    aliases=("prumerge_plus", "prumergeplus", "prumerge-plus"),
)
