"""VL-Cache (Tu et al., 2025, "VL-Cache: Sparsity and Modality-Aware KV Cache Compression for
Vision-Language Model Inference Acceleration", ICLR).

Modality-aware scoring: score of key j = Σ_{i post-vision} softmax(q_i·K/√d)_j, the attention it
receives from the queries after the last visual token (the text that follows the image), averaged
over the query heads of each KV head. Sparsity-aware allocation: a layer's density is the share
of the post-vision attention entries at least `threshold` × their row's maximum; layer budgets are
proportional to density (denser layers keep more), capped at the prompt, mean exactly the budget.
A prompt without visual tokens (chosen per sample in a batch) uses its last `window_size` queries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..compilation import compiled_where_it_works
from .allocation import Density
from .base import CompressedCache
from .context import PromptContext
from .policy import Policy, Scores


@dataclass(frozen=True)
class VLCache(Policy):
    """VL-Cache (Tu et al., 2025): score_j = Σ_{post-vision queries i} softmax(q_i·K/√d)_j, and the layer's
    density (share of entries >= threshold x their row's maximum) for the `Density` allocation."""

    threshold: float = 0.01  # an attention entry is dense at >= threshold x its row's maximum
    window_size: int = 32  # the queries that score a prompt without visual tokens: its last window_size

    def __post_init__(self):
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) (share of a row's maximum attention), got {threshold!r}")
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"window_size must be an int >= 1, got {self.window_size!r}")

    def post_vision_queries(self, ctx: PromptContext) -> torch.Tensor:
        """`[b, n]` True on each sample's post-vision prompt positions: after its last visual token, or, for a
        sample without one, its last `window_size` positions (the rule is chosen per sample, so a batch
        mixing image and text-only prompts gives each its single-prompt result)."""
        batch, n = ctx.keys.shape[0], ctx.length
        slot = torch.arange(n, device=ctx.keys.device)
        visual = ctx.visual_mask
        if visual is None:
            visual = torch.zeros(batch, n, dtype=torch.bool, device=slot.device)
        has_visual = visual.any(dim=-1).cpu()
        if not bool(has_visual.all()):
            shortest = int(ctx.real_length[~has_visual].min())
            if self.window_size > shortest:
                raise ValueError(
                    f"window_size={self.window_size} is larger than the prompt ({shortest} tokens) and the "
                    "prompt has no visual token: pass a smaller window_size"
                )
        last_visual = torch.where(visual, slot, -1).max(dim=-1).values
        # left padding: a sample's last `window_size` positions are the last slots of its row
        last_visual = torch.where(has_visual.to(slot.device), last_visual, n - 1 - self.window_size)
        return slot[None, :] > last_visual[:, None]

    def post_vision_rows(self, ctx: PromptContext) -> tuple[torch.Tensor, int, bool]:
        """`(post, last, every_row)`: `[b, last]` True on the post-vision rows among the last `last` prompt
        positions (the longest post-vision span), and whether all of them are. Every layer has the same, so
        it is read off the device once per prompt (`ctx.memo`) rather than in each layer."""
        key = (ctx.visual_mask, ctx.keys.shape[0], ctx.length)
        memo = ctx.memo.get("post_vision")
        if memo is None or memo[0][0] is not key[0] or memo[0][1:] != key[1:]:
            post = self.post_vision_queries(ctx)
            last = int((ctx.length - post.float().argmax(dim=-1)).max())
            post = post[:, -last:]
            memo = ctx.memo["post_vision"] = (key, post, last, bool(post.all()))
        post, last, every_row = memo[1:]
        return post.to(ctx.keys.device), last, every_row

    def score(self, ctx: PromptContext) -> Scores:
        """The post-vision attention each key receives, `[b, h, n]`, and its density: the share of the visible
        post-vision attention entries >= threshold x their row's maximum, `[b]`. One pass over the attention
        serves both."""
        post, last, every_row = self.post_vision_rows(ctx)
        statistics = compiled_where_it_works(post_vision_statistics, ctx.keys.device, ctx.keys.dtype)
        statistics = functools.partial(statistics, threshold=self.threshold)
        scores, dense = None, 0
        # A sample's earlier rows (shorter post-vision span) see no key, so they add nothing to any sum below.
        chunks = ctx.attention_chunks(last, query_valid=None if every_row else post, statistics=statistics)
        for _, (part, kept) in chunks:
            part = part[..., :ctx.length].double()
            scores = part if scores is None else scores + part
            dense = dense + kept
        heads = ctx.queries(last).shape[1]
        density = dense.double() / (self.visible_keys(ctx, post) * heads).clamp(min=1)
        return Scores(scores, density=density)

    @staticmethod
    def visible_keys(ctx: PromptContext, post: torch.Tensor) -> torch.Tensor:
        """`[b]` (float64): keys seen by the post-vision rows `post` `[b, last]` (the last `last` prompt
        positions), summed over the rows: each row sees the real keys up to its own position."""
        key_valid = ctx.key_valid if ctx.key_valid is not None else torch.ones(
            ctx.keys.shape[0], ctx.length, dtype=torch.bool, device=ctx.keys.device)
        seen_up_to = key_valid.long().cumsum(dim=-1)[:, -post.shape[-1]:]  # [b, last]
        return (seen_up_to * post).sum(dim=-1).double()


class VLCacheCache(CompressedCache):
    name = "vlcache"
    policy_class = VLCache
    allocation_class = Density


def post_vision_statistics(logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """From one chunk of masked post-vision scores (`attention_chunks`' statistics, `[b, h, groups, rows,
    padded]`): the attention each key receives (as `attention.received_from_logits`) and, per sample, how
    many probabilities are >= threshold x their row's maximum (an integer count; a row that sees no key counts
    none). One function, so that compiled it reads the scores without writing the probabilities out."""
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    row_max = probs.amax(dim=-1)  # 0 only on a row that sees no key
    kept = (probs >= threshold * row_max[..., None]).sum(dim=-1) * (row_max > 0)
    return probs.sum(dim=3).mean(dim=2), kept.sum(dim=(1, 2, 3))
