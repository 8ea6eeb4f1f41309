"""Head-adaptive budgets (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation
for Efficient LLM Inference"): a layer's budget, h x B tokens over its h KV heads, is split by the scores
themselves, so that heads whose attention is spread out keep more than heads whose attention is concentrated.

Per sample, with B the layer's mean per-head budget (from the allocation over layers) and p_k the positions head k
protects (scores >= PROTECTED: SnapKV's window), as in the reference code the window stays outside the split:
every head keeps its protected positions and, AdaKV's safeguard, its own top f_k = floor(alpha (B - p_k)) others;
the remaining h B - sum_k (p_k + f_k) tokens go to the highest scores of the flattened (head, position) list of
what is left. The sum over heads is exactly h B. (The reference code counts each head's share c_k of one
flattened top-(h (B - p)) and keeps f + round((1 - alpha) c_k), whose sum can miss h B by rounding; taking the
floor first and the rest by one flattened top-k, as kvpress's AdaKVPress does, keeps the budget exact.)
Ties go to the lower (head, position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import PROTECTED


def descending_rank(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's rank along the last dimension, best first, ties to the lower index."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


@dataclass(frozen=True)
class HeadAdaptive:
    """How a layer's tokens are split over its KV heads: evenly (the default), or by AdaKV's flattened top-k
    (`head_adaptive=True`) with a per-head floor of `head_adaptive_floor` x the head's share of the budget."""

    head_adaptive: bool = False
    head_adaptive_floor: float = 0.2  # alpha: the reference code's default (AdaKV's pred.py, kvpress's too)

    def __post_init__(self):
        if not isinstance(self.head_adaptive, bool):
            raise ValueError(f"head_adaptive must be True or False, got {self.head_adaptive!r}")
        alpha = self.head_adaptive_floor
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"head_adaptive_floor must be in [0, 1] (the share of a head's budget it keeps "
                             f"whatever the other heads score), got {alpha!r}")

    def select(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        """`[b, h, n]` True on the kept (head, position) pairs: h x `budget[b]` (on the CPU) per sample, from
        `scores` `[b, h, n]` (-inf on padding, which is never kept)."""
        heads = scores.shape[1]
        budget = budget.to(scores.device)[:, None]  # [b, 1]
        protected_positions = scores >= PROTECTED
        protected = protected_positions.sum(-1).clamp(max=budget)  # [b, h]
        floor = torch.floor(self.head_adaptive_floor * (budget - protected).double()).long()
        own = descending_rank(scores) < (protected + floor)[..., None]  # each head's protected and floor
        rest = heads * budget[:, 0] - (protected + floor).sum(-1)  # [b]
        left = scores.masked_fill(own | protected_positions, float("-inf")).flatten(1)
        shared = descending_rank(left) < rest[:, None]
        return own | shared.view_as(own)
