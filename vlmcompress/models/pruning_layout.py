"""The pruned sequence's layout: which positions stay (left-padded to the longest sample), the gathers that
shorten a batch's sequences, and the mask of the pruned layout."""

from __future__ import annotations

import torch

from ..decoding.grouped_sdpa import GROUPED_SDPA
from ..glue import additive_mask


def left_padded_layout(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For keep `[b, L]` (bool) the gather index `[b, L']` of the kept positions, left-padded to the longest
    sample, and which slots are real `[b, L']`."""
    counts = keep.sum(dim=1)
    width = int(counts.max())
    pad = width - counts  # [b]
    slots = torch.arange(width, device=keep.device)[None].expand(keep.shape[0], -1)
    valid = slots >= pad[:, None]
    # the k-th kept position of each row, for slot pad + k
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)  # kept positions first, ascending
    rank = (slots - pad[:, None]).clamp(min=0)
    index = order.gather(1, rank)
    return index, valid


def gather_sequence(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather `index` `[b, L']` along the sequence `dim` of `tensor`, whose batch dim precedes `dim`
    (a leading broadcast batch of 1 is expanded)."""
    dim = dim % tensor.dim()
    batch_dim = dim - 1
    shape = list(tensor.shape)
    if shape[batch_dim] == 1 and index.shape[0] > 1:
        shape[batch_dim] = index.shape[0]
        tensor = tensor.expand(*shape)
    view = [1] * tensor.dim()
    view[batch_dim], view[dim] = index.shape[0], index.shape[1]
    expanded = list(tensor.shape)
    expanded[dim] = index.shape[1]
    return tensor.gather(dim, index.to(tensor.device).view(view).expand(expanded))


def attention_mask_for(config, key_valid: torch.Tensor, query_length: int, dtype) -> torch.Tensor | None:
    """The mask an attention layer needs for `query_length` queries ending the held keys `[b, kv]`, in the
    form its implementation expects (2-D padding mask for flash-attention, additive 4-D otherwise)."""
    implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    all_valid = bool(key_valid.all())
    if "flash" in implementation:
        return None if all_valid else key_valid.long()
    if implementation not in ("sdpa", GROUPED_SDPA, "eager"):
        raise NotImplementedError(f"FastV supports sdpa, eager and flash attention, not {implementation!r}")
    if all_valid and query_length == 1:
        return None
    kv = key_valid.shape[-1]
    slots = torch.arange(kv, device=key_valid.device)
    query_slots = kv - query_length + torch.arange(query_length, device=key_valid.device)
    allowed = key_valid[:, None, None, :] & (slots[None, :] <= query_slots[:, None])[None, None]
    return additive_mask(allowed, dtype)


def run_lengths(where: torch.Tensor) -> list[int]:
    """Lengths of the contiguous runs of True in `where` `[b, L]`, row-major."""
    lengths = []
    for row in where:
        padded = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).to(torch.int8)
        edges = padded.diff()
        starts, ends = (edges == 1).nonzero().squeeze(-1), (edges == -1).nonzero().squeeze(-1)
        lengths += (ends - starts).tolist()
    return lengths
