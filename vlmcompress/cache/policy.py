"""What a KV method is: a policy that scores, over the one cache that stores and evicts (`CompressedCache`).

A policy is a small frozen dataclass: its fields are the method's options (with defaults; `__post_init__`
validates them), `score(ctx)` ranks one layer's prompt keys, and a method that evicts while decoding
(`evicts_during_decoding`) also scores the held slots after each step (`decode_scores`). How many tokens each
layer keeps is an allocation's business (`cache.allocation`), which works with any policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .context import DecodeContext, PromptContext

# Scores at or above this are "always keep"; they are ordered among themselves by the
# offset added to it, so a budget smaller than the protected set keeps its best part.
PROTECTED = 1e12


@dataclass
class Scores:
    """A policy's scores of one layer's prompt, and what else it measured in the same pass."""

    ranking: torch.Tensor  # [b, h, n] float64: higher is kept first, >= PROTECTED always
    running: torch.Tensor | None = None  # [b, h, n] scores carried into decoding and accumulated there (H2O)
    density: torch.Tensor | None = None  # [b] share of dense attention entries (VL-Cache's allocation)


@dataclass(frozen=True)
class Policy:
    """Base of the KV methods' policies (see the module docstring)."""

    evicts_during_decoding: ClassVar[bool] = False  # retires slots while decoding to stay at the budget
    adapts_over_heads: ClassVar[bool] = True  # its scores can split a layer's budget over the heads (head_adaptive)

    def score(self, ctx: PromptContext) -> torch.Tensor | Scores:
        """Importance of each prompt key, `[b, kv_heads, n]` (float64), or `Scores` with more."""
        raise NotImplementedError

    def always_kept(self, ctx: PromptContext) -> int:
        """Tokens of every sample this policy protects in every layer (SnapKV's window): the floor of a
        non-uniform allocation."""
        return 0

    def decode_scores(self, ctx: DecodeContext) -> torch.Tensor:
        """For a method that evicts while decoding: scores of the held slots `[b, h, slots]` after this step."""
        raise NotImplementedError
