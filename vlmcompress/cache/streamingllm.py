"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").

Keep the first `sink_tokens` tokens (attention sinks) and the most recent ones:
kept = sinks ∪ the last (budget − sinks) positions. During decoding the window rolls: the
oldest non-sink token is retired as each new one arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompressedCache
from .context import DecodeContext, PromptContext
from .layer import first_valid
from .policy import PROTECTED, Policy


def sinks_then_newest(positions: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """`[b, h, n]` float64 scores: the `sinks` protected (the earliest first), then the newest positions."""
    position = positions.double()
    return torch.where(sinks, PROTECTED - position, position)


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM (Xiao et al., 2024): kept = the first `sink_tokens` ∪ the newest (budget − sinks) tokens."""

    sink_tokens: int = 4  # the attention sinks: the first tokens, always kept

    evicts_during_decoding = True
    adapts_over_heads = False  # recency alone: every head's scores are the same

    def __post_init__(self):
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {self.sink_tokens!r}")

    def score(self, ctx: PromptContext) -> torch.Tensor:
        b, h, n, _ = ctx.keys.shape
        positions = torch.arange(n, device=ctx.keys.device).expand(b, h, n)
        valid = (ctx.key_valid[:, None].expand(b, h, n) if ctx.key_valid is not None
                 else torch.ones_like(positions, dtype=torch.bool))
        return sinks_then_newest(positions, first_valid(valid, self.sink_tokens))

    def decode_scores(self, ctx: DecodeContext) -> torch.Tensor:
        # the sinks are the earliest valid slots, which this method never retires
        layer = ctx.layer
        return sinks_then_newest(layer.positions, layer.earliest_valid(self.sink_tokens))


class StreamingLLMCache(CompressedCache):
    name = "streamingllm"
    policy_class = StreamingLLM
