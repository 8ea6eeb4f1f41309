"""What an architecture says about its visual tokens: where its vision encoder's attention is, and how its
per-patch statistics map to the tokens the projector emits (`VisionAdapter`, one subclass per forked model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenMaps:
    """Per-token vision statistics of one modality, in the order the projector's features are scattered into
    the prompt: scores `[n]`, keys `[n, heads, head_dim]`, protected `[n]` (never pruned), and the number of
    tokens of each image/video (None: each contiguous run of placeholder tokens is one)."""

    scores: torch.Tensor
    keys: torch.Tensor
    protected: torch.Tensor
    lengths: list[int] | None = None


class VisionAdapter:
    """Where an architecture's visual tokens come from; one subclass per forked model module."""

    score_mode = "mean"  # "cls" where the encoder has a [CLS] token

    def encoder_layers(self, model) -> torch.nn.ModuleList:
        raise NotImplementedError

    def default_layer(self, model) -> int:
        """Index of the encoder layer that produces the features the projector reads."""
        return len(self.encoder_layers(model)) - 1

    def attention_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.self_attn

    def queries_keys(self, module, arguments: dict) -> tuple[torch.Tensor, torch.Tensor, float, list | None]:
        """(queries, keys `[B, H, N, D]`, scaling, attention segments) that `module` computed."""
        raise NotImplementedError

    def token_maps(self, model, calls: dict) -> dict[str, TokenMaps]:
        """Map what each vision call captured to the tokens of its modality. `calls[modality]` is
        `(inputs, records)`: the arguments `get_{modality}_features` was called with, and the per-patch
        `(scores [B, N], keys [B, N, H, D])` of each encoder pass it made."""
        raise NotImplementedError

    def protected_tokens(self, model, calls: dict) -> dict[str, torch.Tensor]:
        """Flat bool masks over each modality's placeholder tokens that must never be dropped."""
        return {}
