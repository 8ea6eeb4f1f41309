"""PruMerge (Shang et al., 2024, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models", arXiv:2403.15388).

Rule: keep the IQR outliers of the [CLS] attention (scores > Q3 + 1.5·IQR; mean attention received where the
encoder has no [CLS]), and update each kept token with its k most key-similar other tokens:
y_p <- y_p + sum_j a_j y_j (the released code's update, k = 32).

Budget: by default (`prune_budget=None`) the count is adaptive, the number of IQR outliers of each image,
and `compression_stats` reports what it was. A budget replaces that count: the kept tokens are then the
`keep` highest-attention ones (the IQR outliers are exactly the top of that ranking, so the budget only moves
the cut). When every token is kept nothing was pruned and nothing is merged (identity at full budget).
The released code also appends one extra token (the attention-weighted sum of all pruned tokens); it has no
position in the prompt's sequence and is not part of the paper's Algorithm 1, so we leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import PruneMethod, Selection, checked, optional_int, positive_int

MERGE_K = 32


def iqr_outlier_count(scores: torch.Tensor) -> int:
    """Number of scores above Q3 + 1.5·IQR (quantiles by linear interpolation, like numpy.percentile); >= 1."""
    values = scores.double()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64, device=values.device))
    return max(1, int((values > q3 + 1.5 * (q3 - q1)).sum()))


def merge_neighbours(features, scores, keys, kept: torch.Tensor, merge_k: int = MERGE_K) -> torch.Tensor:
    """y_p + sum over the `merge_k` other tokens most cosine-similar to p by key of a_j y_j, for p in `kept`."""
    n = features.shape[0]
    if kept.numel() == n or n < 2:
        return features[kept]
    unit = F.normalize(keys.flatten(1).float(), dim=-1)
    similarity = unit[kept] @ unit.T  # [m, n]
    similarity[torch.arange(kept.numel(), device=kept.device), kept] = float("-inf")  # not itself
    neighbours = similarity.topk(min(merge_k, n - 1), dim=-1).indices  # [m, k]
    weights = scores.float()[neighbours][..., None]
    update = (weights * features.float()[neighbours]).sum(dim=1)
    return (features[kept].float() + update).to(features.dtype)


def prumerge_select(features, scores, keys, keep: int | None = None, merge_k: int = MERGE_K, **_) -> Selection:
    """features `[n, d]`, scores `[n]`, keys `[n, heads, head_dim]`; `keep=None`: the IQR outlier count."""
    m = iqr_outlier_count(scores) if keep is None else min(int(keep), features.shape[0])
    kept = scores.double().topk(m).indices.sort().values
    return Selection(kept, merge_neighbours(features, scores, keys, kept, merge_k))


@dataclass(frozen=True)
class MergeOptions:
    """PruMerge's and PruMerge+'s options."""

    merge_k: int = MERGE_K  # the most key-similar tokens merged into each kept one
    vision_layer: int | None = None  # the encoder layer scored (None: the one the projector reads)

    def __post_init__(self):
        checked(self, merge_k=positive_int("merge_k"), vision_layer=optional_int("vision_layer"))


METHOD = PruneMethod(name="prumerge", stage="projector", default_budget=None, options=MergeOptions,
                     select=prumerge_select)
