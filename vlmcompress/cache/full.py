"""The uncompressed baseline in the eviction caches' machinery: every prompt token is kept.

Not a compression method (it is not in `KV_METHODS`): it exists so that static decoding
(`load(..., cuda_graphs=True)` without `kv=`) has a cache to preallocate, and so the uncompressed
model is measured with the same decoding path as the compressed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompressedCache
from .context import PromptContext
from .policy import Policy


@dataclass(frozen=True)
class KeepAll(Policy):
    """Every prompt token (the uncompressed baseline)."""

    def score(self, ctx: PromptContext) -> torch.Tensor:
        return torch.zeros(ctx.keys.shape[:3], dtype=torch.float64, device=ctx.keys.device)


class FullCache(CompressedCache):
    name = "full"
    policy_class = KeepAll

    def __init__(self):
        super().__init__(1.0)  # every token: no budget to choose
