"""VisionZip (Yang et al., 2024, "VisionZip: Longer is Better but Not Necessary in VLMs", arXiv:2412.04467).

Rule: keep the dominant tokens with the highest [CLS] attention (mean attention received where the encoder has
no [CLS]: SigLIP, Qwen2-VL) in the vision encoder's feature layer, and merge the rest into contextual tokens:
uniformly strided targets, every other token assigned to its most key-similar target, target + mean(assigned).

Dominant:contextual follows the paper's settings (54:10 of 64, 108:20 of 128, 162:30 of 192 tokens), i.e.
a contextual share of 10/64 of the kept tokens. Key similarity uses the layer's keys averaged over heads
(the released code's `metric`). Tokens are merged at the projector output (the features the language model
receives), the one representation all architectures share; each merged token sits at its target's position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import PruneMethod, Selection, checked, optional_int, round_half_up, unit_fraction

CONTEXTUAL_RATIO = 10 / 64
DEFAULT_BUDGET = 192 / 576  # the paper's largest LLaVA-1.5 setting


def split_counts(keep: int, n: int, contextual_ratio: float = CONTEXTUAL_RATIO) -> tuple[int, int]:
    """(dominant, contextual) token counts for `keep` of `n` tokens."""
    if keep >= n:
        return n, 0
    contextual = min(round_half_up(keep * contextual_ratio), keep - 1)
    return keep - contextual, max(contextual, 0)


def visionzip_select(features, scores, keys, keep: int, contextual_ratio: float = CONTEXTUAL_RATIO, **_) -> Selection:
    """features `[n, d]`, scores `[n]`, keys `[n, heads, head_dim]` -> the kept `Selection` of `keep` tokens."""
    n = features.shape[0]
    dominant, contextual = split_counts(keep, n, contextual_ratio)
    dominant_idx = scores.double().topk(dominant).indices
    if contextual == 0:
        order = dominant_idx.sort().values
        return Selection(order, features[order])
    is_rest = torch.ones(n, dtype=torch.bool, device=features.device)
    is_rest[dominant_idx] = False
    rest = is_rest.nonzero().squeeze(-1)  # ascending, like the released code's masked_select
    metric = F.normalize(keys[rest].float().mean(dim=1), dim=-1)
    step = max(1, rest.numel() // contextual)
    targets = torch.arange(0, rest.numel(), step, device=features.device)[:contextual]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=features.device)
    is_target[targets] = True
    others = (~is_target).nonzero().squeeze(-1)
    assign = (metric[others] @ metric[targets].T).argmax(dim=-1)  # [n_others]
    one_hot = F.one_hot(assign, contextual).to(torch.float32)
    counts = one_hot.sum(dim=0).clamp(min=1)[:, None]
    aggregated = (one_hot.T @ features[rest[others]].float()) / counts
    contextual_features = (features[rest[targets]].float() + aggregated).to(features.dtype)
    indices = torch.cat([dominant_idx, rest[targets]])
    merged = torch.cat([features[dominant_idx], contextual_features])
    order = indices.argsort()
    return Selection(indices[order], merged[order])


@dataclass(frozen=True)
class VisionZipOptions:
    contextual_ratio: float = CONTEXTUAL_RATIO  # the share of the kept tokens that are merged contextual ones
    vision_layer: int | None = None  # the encoder layer scored (None: the one the projector reads)

    def __post_init__(self):
        checked(self, contextual_ratio=unit_fraction("visionzip contextual_ratio"),
                vision_layer=optional_int("vision_layer"))


METHOD = PruneMethod(
    name="visionzip",
    stage="projector",
    default_budget=DEFAULT_BUDGET,
    options=VisionZipOptions,
    select=visionzip_select,
)
