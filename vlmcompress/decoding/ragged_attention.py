"""Attention over a cache whose KV heads hold different numbers of tokens (head-adaptive budgets).

A ragged layer (`vlmcompress.cache.ragged_layer.RaggedLayer`) stores each (sample, KV head) segment's keys and
values flat, `[total, head_dim]`, one segment after another; its `RaggedSegments` (where each segment starts,
how many tokens it holds) reach this function as the `attention_mask` the cache's per-layer mask pre-hook
passes. Anything else (the prompt's forward, a dense cache) goes to `grouped_sdpa_attention_forward` unchanged,
so one attention implementation serves prefill and ragged decoding.

The exact path here is plain PyTorch (CPU and CUDA): each segment's tokens are gathered into a row padded to
the longest segment (a transient of one step, not storage), the group's queries attend it under the segment's
length (and causally among the step's new tokens, which every segment ends with), softmax and products in at
least float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .grouped_sdpa import grouped_sdpa_attention_forward

RAGGED_ATTENTION = "vlmcompress_ragged"


@dataclass
class RaggedSegments:
    """Where each (sample, KV head) segment of a flat `[total, head_dim]` key/value store lies, in (sample, head)
    order: `starts` and `lengths` `[batch * kv_heads]` (on the store's device, lengths including this step's new
    tokens), `width` the longest length (a host int), `new_tokens` the tokens this step appended to every segment."""

    starts: torch.Tensor
    lengths: torch.Tensor
    width: int
    new_tokens: int


def ragged_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, segments: RaggedSegments,
                     scaling: float) -> torch.Tensor:
    """query `[b, heads, q, d]` (head `k * groups + j` reads KV head k), keys/values `[total, d]` flat in
    `segments`; returns `[b, q, heads, d]` in the query's dtype."""
    batch, heads, q_len, dim = query.shape
    count = segments.starts.numel()
    groups = heads // (count // batch)
    slot = torch.arange(segments.width, device=keys.device)
    filled = slot < segments.lengths[:, None]  # [segments, width]
    index = torch.where(filled, segments.starts[:, None] + slot, 0)
    accumulate = torch.promote_types(query.dtype, torch.float32)
    rows = query.reshape(count, groups * q_len, dim).to(accumulate)  # a segment's group of query heads x q
    logits = rows @ keys[index].to(accumulate).transpose(-1, -2) * scaling  # [segments, groups * q, width]
    # query i of the step sees the held tokens and the new ones up to itself
    query_index = torch.arange(groups * q_len, device=keys.device) % q_len
    visible = (segments.lengths - q_len)[:, None, None] + query_index[None, :, None] + 1
    logits = logits.masked_fill(slot[None, None, :] >= visible, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ values[index].to(accumulate)
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).to(query.dtype).contiguous()


def ragged_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; ragged decoding when `attention_mask` is `RaggedSegments`."""
    if not isinstance(attention_mask, RaggedSegments):
        return grouped_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    return ragged_attention(query, key, value, attention_mask, scale), None


AttentionInterface.register(RAGGED_ATTENTION, ragged_attention_forward)
AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)  # the prompt's masks are SDPA's
