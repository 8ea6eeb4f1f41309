"""Attention scores the methods rank by, recomputed from an attention module's own inputs.

The model keeps its attention implementation (SDPA / flash-attention); for the one layer a method reads we
recompute softmax(QK^T) from the queries/keys the module built, in float32 and in query chunks, so a long
prompt or a large image never materialises a whole attention matrix at once.
"""

from __future__ import annotations

import torch

from ..scoring import attention_chunks, key_validity_from_mask, recompute_keys, recompute_queries, slice_positions


def vision_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float, mode: str,
                  segments: list[tuple[int, int]] | None = None, max_elements: int = 1 << 24) -> torch.Tensor:
    """Per-token importance `[B, N]` from one vision attention layer.

    queries/keys `[B, H, N, D]`. mode "cls": the attention token 0 ([CLS]) pays to each token, mean over
    heads. mode "mean": the attention each token receives, averaged over heads and over the queries that can
    see it. `segments` (start, end) split the sequence into independent attention blocks (Qwen2-VL's
    per-image / per-window attention); None: one block.
    """
    batch, heads, n, _ = queries.shape
    q, k = queries.float(), keys.float()
    if mode == "cls":
        probs = torch.softmax(torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) * scaling, dim=-1)
        return probs.mean(dim=1)
    out = torch.zeros(batch, n, dtype=torch.float32, device=q.device)
    for start, end in segments or [(0, n)]:
        length = end - start
        if length == 0:
            continue
        kk = k[:, :, start:end]
        step = max(1, max_elements // max(1, batch * heads * length))
        total = torch.zeros(batch, length, dtype=torch.float32, device=q.device)
        for row in range(start, end, step):
            logits = torch.einsum("bhqd,bhnd->bhqn", q[:, :, row:min(end, row + step)], kk) * scaling
            total += torch.softmax(logits, dim=-1).sum(dim=2).mean(dim=1)
        out[:, start:end] = total / length
    return out


def last_token_attention(module: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings,
                         attention_mask=None) -> torch.Tensor:
    """FastV's score: the attention `[b, n]` the last prompt token pays to every prompt token in this layer,
    averaged over all query heads (padding keys get 0)."""
    batch, n, _ = hidden_states.shape
    queries = recompute_queries(module, hidden_states[:, -1:], slice_positions(position_embeddings, slice(-1, None)))
    keys = recompute_keys(module, hidden_states, position_embeddings)
    valid = key_validity_from_mask(attention_mask, batch, n, keys.device)
    (_, probs), = list(attention_chunks(queries, keys, module.scaling, valid))
    return probs[:, :, :, 0].flatten(1, 2).mean(dim=1)  # [b, n]
