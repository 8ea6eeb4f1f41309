"""LOOK-M (Wan et al., 2024, "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
Inference").

Text-prior eviction at prefill: score of key j = its accumulated attention Σ_i softmax(q_i·K/√d)_j over every prompt
query i (H2O's, averaged over the query heads of each KV head). The last `recent_ratio` share of the budget (at
least one token) is kept as the recent window; the rest of the budget goes to the text tokens first, ranked by
score, then to the visual tokens by score. The evicted entries are then merged into the kept ones (`merge=`, a
`cache.merge` strategy: `pivotal` by default, LOOK-M's main setting; `average`, `weighted`; None for eviction alone).

As EffiVLM-Bench runs it: importance averaged over the query heads of a KV head, the recent window 10 % of the
budget. LOOK-M's own code, unlike its paper and EffiVLM-Bench, keeps every text token whatever the budget (its
keep-mask is `score >= 0`, which every text token passes); here the budget binds text tokens too. LOOK-M compresses
the prompt once and never evicts while decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompressedCache
from .context import PromptContext
from .h2o import H2O, protect_recent


@dataclass(frozen=True)
class LookM(H2O):
    """LOOK-M (Wan et al., 2024): the recent share of the budget kept, then text tokens before visual ones, each by
    accumulated attention Σ_{every prompt query i} softmax(q_i·K/√d)_j; the evicted entries merged (`merge=`)."""

    recent_ratio: float = 0.1  # the share of the budget kept as the most recent tokens

    evicts_during_decoding = False

    def score(self, ctx: PromptContext) -> torch.Tensor:
        accumulated = ctx.accumulated_attention(ctx.length)
        ranking = accumulated
        if ctx.visual_mask is not None:
            # a key receives at most one unit of attention from each of the n queries: text + (n + 1) outranks it
            text = ~ctx.visual_mask[:, None]
            ranking = torch.where(text, accumulated + (ctx.length + 1), accumulated)
        positions = torch.arange(ctx.length, device=ctx.keys.device).expand_as(accumulated)
        return protect_recent(ranking, positions, ctx.length - 1, self.recent_tokens(ctx.budget))


class LookMCache(CompressedCache):
    name = "lookm"
    policy_class = LookM
    merge_default = "pivotal"
