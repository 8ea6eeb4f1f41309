"""Merging evicted KV entries into the kept ones (LOOK-M's strategies; EffiVLM-Bench's `--merge`), an option of
every KV method: `load(kv="snapkv", merge="pivotal")`, or `CompressedCache(0.1, policy=SnapKV(), merge=Pivotal())`.

At prefill, once a layer's kept slots are chosen, each evicted real token e of a (sample, KV head) goes to the kept
entry p of the same (sample, head) whose key is the most cosine-similar to its key (on the CPU, the first in position
order on a tie), and every kept entry becomes, for its key and its value alike (x = k or v),

    x_p <- (x_p + Σ_{e -> p} c_e) / (1 + |{e -> p}|)

with the strategy's contribution c_e: `average` x_e, `pivotal` (x_e + x_p) / 2, `weighted` s_e·x_e, where
s_e = cos(k_e, k_p). These are the formulas of LOOK-M's code (Wan et al., 2024; `scatter_reduce(mean,
include_self=True)` into the most similar conserved key); EffiVLM-Bench's `--merge` offers `pivot` alone. LOOK-M's
code also drops, for `average` and `weighted`, the evicted entries whose maximum similarity, averaged over the heads
at the same rank in each head's evicted list (different tokens in different heads), is below the mean; that filter
is not kept here: every evicted entry is merged. Left padding is neither merged nor merged into. Decode-time
methods (H2O, StreamingLLM) merge at prefill only, as EffiVLM-Bench's do; what they retire while decoding is
dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..registry import Registry

# Evicted rows whose similarities to the kept keys are computed at once: bounds the [b, h, rows, kept] matrix.
ROWS_PER_CHUNK = 1024


@dataclass(frozen=True)
class Merge:
    """A merging strategy: `contribution` says what an evicted entry adds to the kept entry it joins."""

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()

    def contribution(self, evicted: torch.Tensor, target: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """c_e for evicted entries `[..., d]` joining `target` `[..., d]` with cosine `similarity` `[...]`."""
        raise NotImplementedError

    def __call__(self, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, kept_keys: torch.Tensor,
                 kept_values: torch.Tensor, kept_valid: torch.Tensor | None, key_valid: torch.Tensor | None):
        """The kept keys and values `[b, h, k, d]` (gathered from `keys`/`values` `[b, h, n, d]` at `slots`
        `[b, h, k]`) with the evicted entries merged in. `kept_valid` `[b, h, k]` is False on kept slots not attended
        (padding, beyond a sample's budget), `key_valid` `[b, n]` False on left padding; None: all True."""
        dtype = torch.promote_types(keys.dtype, torch.float32)
        b, h, n, _ = keys.shape
        kept_valid = kept_valid if kept_valid is not None else torch.ones_like(slots, dtype=torch.bool)
        live = torch.zeros(b, h, n, dtype=torch.bool, device=keys.device).scatter_(-1, slots, kept_valid)
        evicted = ~live if key_valid is None else ~live & key_valid[:, None]
        target, similarity = self.most_similar(keys, kept_keys, kept_valid, dtype)
        count = torch.zeros(b, h, slots.shape[-1], dtype=dtype, device=keys.device).scatter_add_(
            -1, target, evicted.to(dtype))
        index = target[..., None].expand(-1, -1, -1, keys.shape[-1])
        merged = []
        for full, kept in ((keys, kept_keys), (values, kept_values)):
            full, kept = full.to(dtype), kept.to(dtype)
            added = torch.where(evicted[..., None], self.contribution(full, kept.gather(2, index), similarity[..., None]),
                                0)
            total = kept.scatter_add(2, index, added)
            merged.append((total / (1 + count[..., None])).to(keys.dtype))
        return merged[0], merged[1]

    @staticmethod
    def most_similar(keys, kept_keys, kept_valid, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """For every prompt key `[b, h, n]`: the index of the valid kept key of largest cosine similarity, and
        that similarity."""
        kept = F.normalize(kept_keys.to(dtype), dim=-1).transpose(-1, -2)
        targets, similarities = [], []
        for start in range(0, keys.shape[2], ROWS_PER_CHUNK):
            rows = F.normalize(keys[:, :, start:start + ROWS_PER_CHUNK].to(dtype), dim=-1)
            cosine = (rows @ kept).masked_fill(~kept_valid[:, :, None], float("-inf"))
            best = cosine.max(dim=-1)
            targets.append(best.indices)
            similarities.append(best.values)
        return torch.cat(targets, dim=-1), torch.cat(similarities, dim=-1)


@dataclass(frozen=True)
class Average(Merge):
    """LOOK-M's averaged merging: x_p <- mean of x_p and the evicted x_e joining it."""

    name = "average"
    aliases = ("averaged", "avg")

    def contribution(self, evicted, target, similarity):
        return evicted


@dataclass(frozen=True)
class Pivotal(Merge):
    """LOOK-M's pivotal merging (EffiVLM-Bench's `pivot`): each evicted x_e first averaged with its pivot x_p,
    x_p <- mean of x_p and the (x_e + x_p) / 2."""

    name = "pivotal"
    aliases = ("pivot",)

    def contribution(self, evicted, target, similarity):
        return (evicted + target) / 2


@dataclass(frozen=True)
class Weighted(Merge):
    """LOOK-M's weighted merging: x_p <- mean of x_p and the s_e·x_e, s_e = cos(k_e, k_p)."""

    name = "weighted"

    def contribution(self, evicted, target, similarity):
        return similarity * evicted


MERGE_STRATEGIES = Registry("KV-merge")
for strategy in (Average, Pivotal, Weighted):
    MERGE_STRATEGIES.register(strategy)


def resolve_merge(merge) -> Merge | None:
    """`merge=` as given (a strategy's name, a `Merge`, or None / "none" for no merging) -> a `Merge` or None; a
    `ValueError` naming the strategies otherwise."""
    if merge is None or isinstance(merge, Merge):
        return merge
    if isinstance(merge, str) and merge.strip().lower() == "none":
        return None
    if not isinstance(merge, str):
        raise ValueError(f"merge must be a strategy's name, one of {sorted(MERGE_STRATEGIES)}, or None; got {merge!r}")
    return MERGE_STRATEGIES.lookup(merge)()
