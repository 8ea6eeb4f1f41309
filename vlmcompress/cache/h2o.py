"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs").

Score of key j = its accumulated attention Σ_i softmax(q_i·K/√d)_j over every query so far
(averaged over the query heads of its KV head); keep the `recent_ratio` share of the budget as
the most recent tokens and fill the rest with the highest-scored ones. A decode-time method:
each new token's attention is added to the scores and the lowest-scored non-recent slot is
retired, so the cache stays at its budget while generating.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompressedCache
from .context import DecodeContext, PromptContext
from .policy import PROTECTED, Policy, Scores


def protect_recent(scores: torch.Tensor, positions: torch.Tensor, newest: int | torch.Tensor,
                    recent: torch.Tensor) -> torch.Tensor:
    """Mark the slots holding the `recent[b]` newest positions (up to `newest`, an int or a device scalar) as
    always kept."""
    is_recent = positions > newest - recent.to(positions.device, non_blocking=True)[:, None, None]
    return torch.where(is_recent, PROTECTED + positions.double(), scores)


@dataclass(frozen=True)
class H2O(Policy):
    """H2O (Zhang et al., 2023): score_j = Σ_{every query i so far} softmax(q_i·K/√d)_j; the recent share kept."""

    recent_ratio: float = 0.5  # the share of the budget kept as the most recent tokens

    evicts_during_decoding = True

    def __post_init__(self):
        ratio = self.recent_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ValueError(
                f"recent_ratio must be in [0, 1] (share of the budget kept as recent tokens), got {ratio!r}")

    def recent_tokens(self, budget: torch.Tensor) -> torch.Tensor:
        return torch.floor(budget.double() * self.recent_ratio).long().clamp(min=1)

    def score(self, ctx: PromptContext) -> Scores:
        accumulated = ctx.accumulated_attention(ctx.length)
        positions = torch.arange(ctx.length, device=ctx.keys.device).expand_as(accumulated)
        ranking = protect_recent(accumulated, positions, ctx.length - 1, self.recent_tokens(ctx.budget))
        return Scores(ranking, running=accumulated)

    def decode_scores(self, ctx: DecodeContext) -> torch.Tensor:
        layer = ctx.layer
        layer.scores += ctx.accumulated_attention()  # in place: the layer owns this buffer
        recent = self.recent_tokens(layer.capacity)
        return protect_recent(layer.scores, layer.positions, layer.newest_position(), recent)


class H2OCache(CompressedCache):
    name = "h2o"
    policy_class = H2O
