"""FastV (Chen et al., 2024, "An Image is Worth 1/2 Tokens After Layer 2", arXiv:2403.06764).

Rule: at language-model layer K, drop the visual tokens that received the least attention (mean over
heads) from the last prompt token in layer K-1, for all layers >= K.

The paper scores with the attention of the *last* token of the prompt (its released code,
`last_layer_attention_avg_last_tok`); we do the same. The attention weights are recomputed for that one
query from layer K-1's own inputs (the model keeps running SDPA / flash-attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import PruneMethod, checked, positive_int

DEFAULT_LAYER = 2  # K in the paper
DEFAULT_BUDGET = 0.5  # R = 50% dropped in the paper's main setting


def fastv_keep(attention: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` entries of `attention` `[n]` (last-token attention received by each
    prunable visual token) that are kept: the largest ones."""
    keep = min(int(keep), attention.shape[-1])
    return attention.double().topk(keep).indices.sort().values


@dataclass(frozen=True)
class FastVOptions:
    layer: int = DEFAULT_LAYER  # K: the first layer that sees the pruned sequence

    def __post_init__(self):
        checked(self, layer=positive_int("fastv layer (K)"))


METHOD = PruneMethod(name="fastv", stage="llm", default_budget=DEFAULT_BUDGET, options=FastVOptions)
