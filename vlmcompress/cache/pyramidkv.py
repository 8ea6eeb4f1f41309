"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling").

SnapKV's scores with pyramid-shaped budgets: layer l keeps w + m_l tokens where m_l falls
linearly from m_max = 2m − m/β (first layer) to m_min = m/β (last layer), m = budget − w,
rounded so that the mean over layers is exactly the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .allocation import integer_allocation
from .context import PromptContext
from .snapkv import SnapKVCache, SnapKVOptions


@dataclass(frozen=True)
class PyramidKVOptions(SnapKVOptions):
    beta: float = 20.0  # ratio of the mean budget (less the window) to the last layer's

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 1:
            raise ValueError(f"beta must be >= 1 (ratio of the mean to the last layer's budget), got {self.beta!r}")


class PyramidKVCache(SnapKVCache):
    name = "pyramidkv"
    Options = PyramidKVOptions

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

    def layer_budgets(self, ctx: PromptContext) -> torch.Tensor:
        window = self.window(ctx)
        counts = [
            self.pyramid(int(mean), int(length), ctx.num_layers, window)[ctx.layer_idx]
            for mean, length in zip(ctx.budget.tolist(), ctx.real_length.tolist())
        ]
        return torch.tensor(counts)
