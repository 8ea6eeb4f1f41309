"""Attention scores for eviction and pruning, recomputed from an attention module's own inputs.

The upstream attention runs unchanged (SDPA, flash-attention or eager); the scoring
methods need attention *weights* for a few queries only, so instead of switching the
model to eager attention we recompute those queries from the hidden states the module
received (its `q_proj`, optional `q_norm`, and its own rotary function, which also
covers Qwen2-VL's M-RoPE because the model passes the merged cos/sin) and take a
softmax against the keys already in the cache.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from .compilation import compiled_where_it_works
from .glue import rotary_function

# Score rows are padded to a multiple of this many keys: an odd prompt length (LLaVA-OV's 7473) otherwise
# sends the score product to an unaligned tensor-core kernel, several times slower (docs/benchmarks.md).
SCORE_ROW_ALIGNMENT = 8


def recompute_projection(module: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings, which: str):
    """Rotated queries (`which="q"`) or keys (`"k"`) `[batch, heads, len, head_dim]` of an attention
    module for `hidden_states` `[batch, len, hidden]`.

    `position_embeddings` is the `(cos, sin)` pair the module received, already sliced to
    the same positions as `hidden_states`.
    """
    batch, length, _ = hidden_states.shape
    states = getattr(module, f"{which}_proj")(hidden_states).view(batch, length, -1, module.head_dim)
    if getattr(module, f"{which}_norm", None) is not None:
        states = getattr(module, f"{which}_norm")(states)
    states = states.transpose(1, 2)
    states, _ = rotary_function(module)(states, states, *position_embeddings)
    return states


def recompute_queries(module: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    return recompute_projection(module, hidden_states, position_embeddings, "q")


def recompute_keys(module: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
    return recompute_projection(module, hidden_states, position_embeddings, "k")


def slice_positions(position_embeddings, index: slice | torch.Tensor):
    """Select sequence positions (second-to-last dim) of a `(cos, sin)` pair."""
    cos, sin = position_embeddings
    return cos[..., index, :], sin[..., index, :]


@lru_cache(maxsize=None)
def _fp32_product_of_half_inputs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.baddbmm(..., out_dtype=torch.float32)` takes `dtype` inputs on `device` (CUDA, recent
    torch): the product then runs on the tensor cores from the cache's own keys, accumulating in float32."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    a, b = torch.randn(2, 8, 16, device=device), torch.randn(2, 16, 8, device=device)
    try:
        product = torch.baddbmm(torch.zeros(2, 1, 8, device=device), a.to(dtype), b.to(dtype), torch.float32)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.allclose(product, torch.bmm(a.to(dtype).float(), b.to(dtype).float()), rtol=1e-3, atol=1e-3))


def attention_chunks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    max_elements: int = 1 << 26,
    query_valid: torch.Tensor | None = None,
    statistics=None,
):
    """Yield `(rows, probs)`: softmax attention of chunks of `queries` over `keys`, in float32.

    queries `[b, H, q, d]` are the last q positions of keys `[b, h, n, d]` (`H = h * groups`), so each sees
    the keys up to its own (causal); key_valid `[b, n]` or `[b, h, n]`, False for padding; query_valid
    `[b, q]`, False for a query that is not to count: its row sees no key, so its probabilities are all 0.
    `probs` is `[b, h, groups, rows, n]`; chunks hold at most `max_elements` scores, so a long prompt never
    materialises its whole attention matrix.

    The scores are made in one pass: scaling and the keys' padding (an additive bias) are applied by the
    product itself, and only the last q columns, where causality bites, are masked after it. On CUDA,
    half-precision keys are multiplied as they are, accumulating in float32. The keys are padded to a multiple
    of `SCORE_ROW_ALIGNMENT` (masked by the bias) so that the product runs on an aligned kernel.

    With `statistics`, yield `(rows, statistics(logits))` instead: the chunk's masked scores `[b, h, groups,
    rows, padded]`, -inf where a query does not see a key (the padding columns past n included), for a caller
    that reduces the probabilities at once (`received_from_logits`), so that they are never written out.
    """
    b, num_heads, q_len, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    groups = num_heads // kv_heads
    if _fp32_product_of_half_inputs(keys.device, keys.dtype):
        q, k = queries.to(keys.dtype), keys
    else:
        q, k = queries.float(), keys.float()
    q = q.reshape(b, kv_heads, groups, q_len, dim)
    padded = n + (-n % SCORE_ROW_ALIGNMENT)
    if padded != n:
        k = F.pad(k, (0, 0, 0, padded - n))
    k_t = k.reshape(b * kv_heads, padded, dim).transpose(1, 2)  # a view: K is not copied into another layout
    bias = torch.zeros(b, kv_heads, 1, padded, dtype=torch.float32, device=keys.device)
    bias[..., n:] = float("-inf")
    if key_valid is not None:
        valid = (key_valid if key_valid.dim() == 3 else key_valid[:, None]).to(keys.device)
        bias[..., :n].masked_fill_(~valid[:, :, None], float("-inf"))
    bias = bias.view(b * kv_heads, 1, padded)
    # row r of the queries sees the first r + 1 of the last q keys (itself included)
    tail = torch.ones(q_len, q_len, dtype=torch.bool, device=keys.device).tril()
    some_rows_out = query_valid is not None and not bool(query_valid.all())
    step = max(1, max_elements // max(1, b * num_heads * padded))
    for start in range(0, q_len, step):
        rows = slice(start, min(q_len, start + step))
        count = rows.stop - rows.start
        chunk = q[:, :, :, rows].reshape(b * kv_heads, groups * count, dim)
        if q.dtype == torch.float32:
            logits = torch.baddbmm(bias, chunk, k_t, alpha=scaling)
        else:
            logits = torch.baddbmm(bias, chunk, k_t, torch.float32, alpha=scaling)
        logits = logits.view(b, kv_heads, groups, count, padded)
        logits[..., n - q_len:n].masked_fill_(~tail[rows], float("-inf"))
        if some_rows_out:
            logits.masked_fill_(~query_valid[:, None, None, rows, None].to(keys.device), float("-inf"))
        if statistics is not None:
            yield rows, statistics(logits)
            continue
        probs = torch.softmax(logits, dim=-1)[..., :n]
        if some_rows_out or key_valid is not None:  # a row that sees no key (left out, or a padding query)
            probs.nan_to_num_(0.0)  # is all NaN after the softmax
        yield rows, probs


def received_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """`[b, h, padded]` attention each key receives from one chunk of `attention_chunks` (its masked scores,
    `statistics`): the softmax summed over the chunk's queries and averaged over the query heads that share the
    key's KV head, in float32; a row that sees no key adds 0."""
    return torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=3).mean(dim=2)


def accumulated_attention(queries, keys, scaling, key_valid=None, compile: bool = False) -> torch.Tensor:
    """Attention each key receives from `queries`, the last positions of `keys` (`attention_chunks`),
    summed over the queries and averaged over the query heads that share its KV head: `[b, h, n]` in float64.
    `compile`: one compiled softmax-and-sum per chunk where inductor works (`vlmcompress.compilation`), which
    never writes the probabilities out."""
    reduce = compiled_where_it_works(received_from_logits, keys.device, keys.dtype) if compile else \
        received_from_logits
    total = None
    for _, part in attention_chunks(queries, keys, scaling, key_valid, statistics=reduce):
        part = part[..., :keys.shape[2]].double()
        total = part if total is None else total + part
    return total


def key_validity_from_mask(attention_mask, batch: int, kv_length: int, device) -> torch.Tensor | None:
    """Which keys are real tokens (not left padding), read off the mask the attention received.

    SDPA/eager get a 4-D mask (bool, True = attend; or additive float, 0 = attend) whose last
    query row, the final prompt token, sees every real key; flash-attention gets the 2-D
    padding mask; `None` means no padding.
    """
    if attention_mask is None or not isinstance(attention_mask, torch.Tensor):
        return None
    if attention_mask.dim() == 2:
        valid = attention_mask[:, -kv_length:].bool()
    else:
        row = attention_mask[:, 0, -1, :kv_length]
        valid = row if row.dtype == torch.bool else row == 0
    valid = valid.to(device).expand(batch, -1)
    return None if bool(valid.all()) else valid
