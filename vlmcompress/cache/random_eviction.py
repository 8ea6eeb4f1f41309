"""Random eviction: the lower bound EffiVLM-Bench sets beside the scoring methods (Wang et al., 2025,
"EffiVLM-Bench: A Comprehensive Benchmark for Evaluating Training-Free Acceleration in Large
Vision-Language Models").

score_j ~ U(0, 1), drawn from a generator seeded by (`seed`, layer) for the j-th real token of the prompt;
the last `window_size` tokens are kept, as by SnapKV, and the rest of the budget is a uniform sample of
the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompressedCache
from .context import PromptContext
from .policy import PROTECTED, Policy

# the layers' seeds are seed * LAYER_STRIDE + layer: distinct for every (seed, layer) of any real model
LAYER_STRIDE = 1 << 16


def uniform_draws(seed: int, layer_idx: int, length: int, heads: int, device) -> torch.Tensor:
    """`[heads, length]` float64 draws in [0, 1) for token positions 0..length-1 of one layer. Drawn position by
    position (`[length, heads]`, transposed), so a position's draws do not depend on the prompt's length."""
    generator = torch.Generator(device=device).manual_seed(seed * LAYER_STRIDE + layer_idx)
    return torch.rand(length, heads, generator=generator, device=device, dtype=torch.float64).T


@dataclass(frozen=True)
class Random(Policy):
    """Random eviction (EffiVLM-Bench's lower bound): score_j ~ U(0, 1) seeded per layer; the last w tokens kept."""

    window_size: int = 32  # w: the last w prompt tokens, always kept
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 0:
            raise ValueError(f"window_size must be an int >= 0, got {self.window_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**40:
            raise ValueError(f"seed must be an int in [0, 2**40), got {self.seed!r}")

    def always_kept(self, ctx: PromptContext) -> int:
        return min(self.window_size, int(ctx.real_length.min()))

    def score(self, ctx: PromptContext) -> torch.Tensor:
        b, h, n, _ = ctx.keys.shape
        device = ctx.keys.device
        draws = uniform_draws(self.seed, ctx.layer_idx, n, h, device)
        # a sample's j-th real token takes draw j wherever left padding put it, so batch equals single
        if ctx.key_valid is None:
            token = torch.arange(n, device=device).expand(b, n)
        else:
            token = (ctx.key_valid.long().cumsum(-1) - 1).clamp(min=0)
        scores = draws[:, token].transpose(0, 1)  # [b, h, n]
        slot = torch.arange(n, device=device, dtype=torch.float64)
        window = (slot >= n - self.window_size).expand(b, h, n)
        return torch.where(window, PROTECTED + slot, scores)


class RandomCache(CompressedCache):
    name = "random"
    policy_class = Random
