"""What a method sees when it scores: one layer's prompt (`PromptContext`) or one decoding step (`DecodeContext`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import received_attention
from ..scoring import accumulated_attention, attention_chunks, recompute_queries, slice_positions
from .layer import CompressedLayer


@dataclass
class PromptContext:
    """What a method may use to score one layer's prompt: the attention module, its inputs, the keys."""

    module: torch.nn.Module
    layer_idx: int
    num_layers: int
    hidden_states: torch.Tensor  # [b, n, hidden] the attention's input
    position_embeddings: tuple  # (cos, sin) for the n positions
    keys: torch.Tensor  # [b, h, n, d] rotated keys of the prompt
    key_valid: torch.Tensor | None  # [b, n] False on left padding; None if no padding
    visual_mask: torch.Tensor | None  # [b, n] True on visual tokens, when known
    # Budgets and lengths are host decisions (top-k widths, windows) and live on the CPU: reading them
    # off the device in every layer would make the host wait for each layer before queueing the next.
    budget: torch.Tensor  # [b] the sample's mean budget in tokens, on the CPU
    real_length: torch.Tensor  # [b] prompt length without padding, on the CPU
    # What a policy computes once per prompt and reuses in every layer (keyed as it likes); the cache keeps it.
    memo: dict = field(default_factory=dict, repr=False)
    _queries: dict = field(default_factory=dict, repr=False)

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def queries(self, last: int) -> torch.Tensor:
        """Rotated queries of the last `last` prompt positions, `[b, H, last, d]`."""
        if last not in self._queries:
            index = slice(self.length - last, None)
            self._queries[last] = recompute_queries(
                self.module, self.hidden_states[:, index], slice_positions(self.position_embeddings, index)
            )
        return self._queries[last]

    def accumulated_attention(self, last: int) -> torch.Tensor:
        """Attention received by each key from the last `last` queries, `[b, h, n]` (float64); from every query
        (H2O, LOOK-M) on CUDA without writing the score matrix out (`received_attention`)."""
        queries = self.queries(last)
        if last == self.length and received_attention.takes(queries, self.keys, self.key_valid):
            return received_attention.received_attention(queries, self.keys, self.module.scaling, self.key_valid)
        return accumulated_attention(queries, self.keys, self.module.scaling, self.key_valid, compile=True)

    def attention_chunks(self, last: int, query_valid: torch.Tensor | None = None, statistics=None):
        """`attention.attention_chunks` of the last `last` queries; `query_valid` `[b, last]` leaves some out;
        `statistics` reduces each chunk's scores instead."""
        return attention_chunks(self.queries(last), self.keys, self.module.scaling, self.key_valid,
                                query_valid=query_valid, statistics=statistics)


@dataclass
class DecodeContext:
    """One decoding forward of one layer: the new tokens' hidden states against the held keys."""

    module: torch.nn.Module
    layer: CompressedLayer
    hidden_states: torch.Tensor  # [b, q, hidden]
    position_embeddings: tuple

    def accumulated_attention(self) -> torch.Tensor:
        # One new token sees every valid slot, wherever it was written (`attention_chunks` masks causally
        # only among several new tokens, which are appended last).
        queries = recompute_queries(self.module, self.hidden_states, self.position_embeddings)
        keys, held = self.layer.attended_keys()
        return accumulated_attention(queries, keys, self.module.scaling, held)

