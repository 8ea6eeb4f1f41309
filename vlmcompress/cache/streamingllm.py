"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks").

Keep the first `sink_tokens` tokens (attention sinks) and the most recent ones:
kept = sinks ∪ the last (budget − sinks) positions. During decoding the window rolls: the
oldest non-sink token is retired as each new one arrives.
"""

from __future__ import annotations

import torch

from .base import PROTECTED, CompressedCache, DecodeContext, PromptContext


def _first_valid(valid: torch.Tensor, count: int) -> torch.Tensor:
    """`[b, h, n]` True on the first `count` valid slots of each row."""
    return valid & (valid.long().cumsum(-1) <= count)


def _recency_scores(positions: torch.Tensor, valid: torch.Tensor, sink_tokens: int,
                    sinks_first: bool = True) -> torch.Tensor:
    """Sinks (the `sink_tokens` valid slots of lowest position) first, then the newest: `[b, h, n]` float64.

    `sinks_first`: the sinks are the first valid slots, as in prefill and eager decoding (prompt slots in
    order, new tokens after them or in a retired non-sink slot). Static decoding may write a token into an
    empty slot before them, so there (False) the sinks are found by position.
    """
    if sinks_first:
        sinks = _first_valid(valid, sink_tokens)
    elif sink_tokens == 0:
        sinks = torch.zeros_like(valid)
    else:
        lowest = positions.masked_fill(~valid, torch.iinfo(positions.dtype).max).topk(
            min(sink_tokens, positions.shape[-1]), dim=-1, largest=False).values
        sinks = valid & (positions <= lowest[..., -1:])  # all valid slots where fewer than `sink_tokens`
    return _sinks_then_newest(positions, sinks)


def _sinks_then_newest(positions: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """`[b, h, n]` float64 scores: the `sinks` protected (the earliest first), then the newest positions."""
    position = positions.double()
    return torch.where(sinks, PROTECTED - position, position)


class StreamingLLMCache(CompressedCache):
    name = "streamingllm"
    evicts_during_decoding = True

    def __init__(self, budget: float | int = 0.1, sink_tokens: int = 4):
        super().__init__(budget)
        if not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        self.sink_tokens = sink_tokens
        self._sinks: dict[int, torch.Tensor | None] = {}  # static decoding's fixed sink slots, by layer

    def score(self, ctx: PromptContext) -> torch.Tensor:
        b, h, n, _ = ctx.keys.shape
        positions = torch.arange(n, device=ctx.keys.device).expand(b, h, n)
        valid = ctx.key_valid[:, None].expand(b, h, n) if ctx.key_valid is not None else torch.ones_like(positions, dtype=torch.bool)
        return _recency_scores(positions, valid, self.sink_tokens)

    def decode_scores(self, ctx: DecodeContext) -> torch.Tensor:
        layer = ctx.layer
        valid = layer.slot_valid if layer.slot_valid is not None else torch.ones_like(layer.positions, dtype=torch.bool)
        if layer.write_offset is None:
            return _recency_scores(layer.positions, valid, self.sink_tokens)
        sinks = self._static_sinks(ctx.module.layer_idx, layer, valid)
        if sinks is None:
            return _recency_scores(layer.positions, valid, self.sink_tokens, sinks_first=False)
        return _sinks_then_newest(layer.positions, sinks)

    def end_static(self, steps_written: int) -> None:
        super().end_static(steps_written)
        self._sinks.clear()  # a next turn may compact the slots

    def _static_sinks(self, layer_idx: int, layer, valid: torch.Tensor) -> torch.Tensor | None:
        """The sink slots of a statically decoding layer, found at its first step (before any capture) and
        fixed after: a row holding more than `sink_tokens` tokens never evicts its sinks nor makes new ones.
        None if some row holds fewer (its next tokens become sinks): those layers find them every step."""
        if layer_idx not in self._sinks:
            # First static step: the prompt's slots are in order and the one new token comes after them.
            enough = bool((valid.sum(-1) > self.sink_tokens).all())
            self._sinks[layer_idx] = _first_valid(valid, self.sink_tokens) if enough else None
        return self._sinks[layer_idx]
