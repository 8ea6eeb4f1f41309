"""SDPA for grouped-query attention under a mask, without copying the keys and values per query head.

transformers' SDPA integration uses torch's native GQA only without a mask (a mask would send CUDA to the
math kernel); with one it calls `repeat_kv`, which copies the whole held K and V `num_heads / kv_heads`
times (7x for Qwen2-7B) in every layer at every decoding step. A compressed cache whose rows hold
different numbers of real slots (VL-Cache's per-sample budgets, a left-padded batch) needs a mask at every
step, so its decoding paid that copy.

Here the heads of one group share their KV head (head h reads KV head h // groups), so the queries
`[b, heads, q, d]` are viewed as `[b, kv_heads, groups * q, d]` and one SDPA call attends each KV head
with all of its group's queries: the same attention, no copy of K or V. This is done for a single query
(decoding; any mask views for free) and for masks given per KV head `[b, kv_heads, q, kv]`, the form
`CompressedCache.decode_attention_mask` builds for this implementation; everything else goes to
transformers' own `sdpa_attention_forward` unchanged. A decoding step on the GPU under an additive mask
runs `split_kv_attention` instead of SDPA: the same attention, split over the held slots so that enough
programs run to read K and V at the GPU's bandwidth (`vlmcompress/decoding/split_kv.py`).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import split_kv

GROUPED_SDPA = "vlmcompress_sdpa"


def grouped_mask(attention_mask, heads: int, kv_heads: int, q_len: int) -> torch.Tensor | None:
    """`attention_mask` for queries viewed as `[b, kv_heads, groups * q, d]`, or None where transformers' SDPA
    is left to it: no grouping, no mask (it then uses torch's own GQA), or several queries under a mask shared
    by all heads (a prompt's: grouping would copy the mask `groups` times)."""
    if heads == kv_heads or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 4:
        return None
    if q_len == 1:  # the rows are the group's heads: a per-head mask views, a per-KV-head or shared one broadcasts
        if attention_mask.shape[1] == heads:
            return attention_mask.unflatten(1, (kv_heads, -1)).flatten(2, 3)
        return attention_mask
    if attention_mask.shape[1] == kv_heads > 1:  # per KV head: each head of the group gets its KV head's rows
        return attention_mask[:, :, None].expand(-1, -1, heads // kv_heads, -1, -1).flatten(2, 3)
    return None


def grouped_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: query `[b, heads, q, d]`, key/value `[b, kv_heads, kv, d]`;
    returns `([b, q, heads, d], None)`."""
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    mask = grouped_mask(attention_mask, heads, kv_heads, q_len)
    if mask is None or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    query = query.reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
    if q_len == 1 and not dropout and split_kv.takes(query, key, value, mask):  # a decoding step on the GPU
        out = split_kv.split_kv_attention(query, key, value, mask, dim ** -0.5 if scaling is None else scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                               scale=scaling)
    # reshape: some kernels return a strided output that cannot be viewed
    return out.reshape(batch, heads, q_len, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, grouped_sdpa_attention_forward)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)  # the model-level masks are SDPA's
