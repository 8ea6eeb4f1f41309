"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

Score of prefix key j = pool_k( Σ_{i in last w queries} softmax(q_i·K/√d)_j ), averaged over the
query heads of each KV head (GQA-aware); keep the top (budget − w) prefix keys plus the whole
observation window of the last w tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import CompressedCache
from .context import PromptContext
from .policy import PROTECTED, Policy


@dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV (Li et al., 2024): score_j = pool_k(Σ_{last w queries i} softmax(q_i·K/√d)_j); the window kept."""

    window_size: int = 32  # w: the observation window, the last w prompt tokens
    kernel_size: int = 5  # the pooling's width
    pooling: str = "avgpool"  # or "maxpool"

    def __post_init__(self):
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"window_size must be an int >= 1, got {self.window_size!r}")
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {self.kernel_size!r}")
        if self.pooling not in ("avgpool", "maxpool"):
            raise ValueError(f"pooling must be 'avgpool' or 'maxpool', got {self.pooling!r}")

    def window(self, ctx: PromptContext) -> int:
        shortest = int(ctx.real_length.min())
        if self.window_size > shortest:
            raise ValueError(
                f"window_size={self.window_size} is larger than the prompt ({shortest} tokens): "
                f"pass a window_size <= {shortest}"
            )
        return self.window_size

    def always_kept(self, ctx: PromptContext) -> int:
        return self.window(ctx)

    def pool(self, votes: torch.Tensor) -> torch.Tensor:
        b, h, n = votes.shape
        flat = votes.reshape(b * h, 1, n)
        pad = self.kernel_size // 2
        if self.pooling == "avgpool":
            pooled = F.avg_pool1d(flat, self.kernel_size, stride=1, padding=pad)
        else:
            pooled = F.max_pool1d(flat, self.kernel_size, stride=1, padding=pad)
        return pooled.reshape(b, h, n)

    def score(self, ctx: PromptContext) -> torch.Tensor:
        """Pooled observation-window attention on the prefix; the window itself protected."""
        w = self.window(ctx)
        n = ctx.length
        votes = ctx.accumulated_attention(w)
        prefix = self.pool(votes[..., : n - w])
        window = PROTECTED + torch.arange(n - w, n, device=votes.device, dtype=votes.dtype)
        return torch.cat([prefix, window.expand(*votes.shape[:2], w)], dim=-1)


class SnapKVCache(CompressedCache):
    name = "snapkv"
    policy_class = SnapKV
