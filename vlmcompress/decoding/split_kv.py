"""Split-KV attention for one decoding query per sample (flash-decoding), under an additive mask.

At a decoding step SDPA's kernels run one program per (sample, head, block of queries). With one query per
sample and a grouped-query head's group viewed as the rows of its KV head (`vlmcompress_sdpa`), that is
batch x kv_heads programs (32 at batch 8 on Qwen2-7B), each walking every held slot: too few to fill a GPU
of 132 multiprocessors, which then reads K and V far below its bandwidth (docs/benchmarks.md). Here the slots are
split into chunks; one program per (sample, KV head, chunk) attends its group's queries to its chunk with
a running softmax, and a second kernel, one program per query row, merges the chunks by their log-sum-exp
(Dao, Haziza, Massa and Sizov, 2023, "Flash-Decoding for long-context inference"):

    out = Σ_c exp(lse_c − lse) · out_c,   lse = log Σ_c exp(lse_c)

Triton kernels, used on CUDA for bf16/fp16 where a probe against SDPA passes (`split_kv_works`); everywhere
else, and for masks it does not take (boolean), `vlmcompress_sdpa` calls SDPA as before.
`DecodingOptions(split_kv=False)` turns it off (bench/decode_step.py --split-kv).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

from .. import compilation
from .options import active

MERGE_BLOCK_SPLITS = 16  # chunks whose results one merge step loads together


@dataclasses.dataclass(frozen=True)
class AttentionLaunch:
    """How `attend_chunk` runs: `block_slots` slots a program step loads (a chunk is a multiple of it), enough
    chunks per (sample, KV head) for about `programs_per_multiprocessor` programs on each multiprocessor (one
    chunk where the (sample, KV head) rows alone are as many as the multiprocessors), and triton's warps and
    pipeline stages."""

    block_slots: int = 64
    programs_per_multiprocessor: int = 2
    num_warps: int = 4
    num_stages: int = 3

    def chunks(self, rows: int, multiprocessors: int) -> int:
        """How many chunks each (sample, KV head) row's slots go into (at most one per `block_slots`, which the
        caller sees to). Where the rows fill the multiprocessors, splitting them further only adds merging:
        InternLM2.5-7B's 256 rows at batch 32 attend in 124.7 µs as one chunk each against 138.2 µs as two
        (H100, 132 multiprocessors, decode_attention_tune_h100.json)."""
        if rows >= multiprocessors:
            return 1
        return math.ceil(self.programs_per_multiprocessor * multiprocessors / rows)


# the default; bench/decode_attention.py --tune found none faster by more than 3 % at Qwen2-7B's batch-8 shapes
# on an H100 (bench/results/decode_attention_tune_h100.json)
LAUNCH = AttentionLaunch()


@functools.lru_cache(maxsize=None)
def _kernels(interpret: str | None):
    """The two triton kernels, built on first use (so that a machine without triton never asks for it), and
    again under `TRITON_INTERPRET`, which `triton.jit` reads when it decorates."""
    import triton
    import triton.language as tl

    @triton.jit
    def attend_chunk(Q, K, V, MASK, PART, LSE, scale, slots, chunk, kv_heads, groups,
                     sq_b, sq_h, sq_g, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_h, sm_g, sm_n,
                     BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, DIM: tl.constexpr):
        row, split = tl.program_id(0), tl.program_id(1)  # row: sample * kv_heads + KV head
        b, h = (row // kv_heads).to(tl.int64), row % kv_heads  # int64: a long cache's offsets pass 2**31
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, DIM)
        live_g = g < groups
        q = tl.load(Q + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :], mask=live_g[:, None], other=0.0)
        start = split * chunk
        top = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, DIM], tl.float32)
        for offset in range(0, chunk, BLOCK_N):  # the last chunk may end past the slots: masked
            n = start + offset + tl.arange(0, BLOCK_N)
            live_n = n < slots
            k = tl.load(K + b * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=live_n[:, None], other=0.0)
            v = tl.load(V + b * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=live_n[:, None], other=0.0)
            bias = tl.load(MASK + b * sm_b + h * sm_h + g[:, None] * sm_g + n[None, :] * sm_n,
                           mask=live_g[:, None] & live_n[None, :], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale + bias.to(tl.float32)
            scores = tl.where(live_n[None, :], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            probs = tl.exp(scores - new_top[:, None])
            rescale = tl.exp(top - new_top)
            total = total * rescale + tl.sum(probs, 1)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
            top = new_top
        part = row * tl.num_programs(1) + split
        tl.store(PART + (part * BLOCK_G + g[:, None]) * DIM + d[None, :], acc / total[:, None])
        tl.store(LSE + part * BLOCK_G + g, top + tl.log(total))

    @triton.jit
    def merge_chunks(PART, LSE, OUT, splits, kv_heads, groups, so_b, so_h, so_g,
                     BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, DIM: tl.constexpr):
        # one program per (sample, KV head, query row): the chunks' results are loaded BLOCK_S at a time,
        # whose loads are all in flight at once, rather than one chunk after another
        row, g = tl.program_id(0), tl.program_id(1)
        b, h = (row // kv_heads).to(tl.int64), row % kv_heads
        d = tl.arange(0, DIM)
        top = tl.full([1], float("-inf"), tl.float32)
        total = tl.zeros([1], tl.float32)
        acc = tl.zeros([DIM], tl.float32)
        for first in range(0, splits, BLOCK_S):
            split = first + tl.arange(0, BLOCK_S)
            live = split < splits
            part = row * splits + split
            lse = tl.load(LSE + part * BLOCK_G + g, mask=live, other=float("-inf"))
            chunk_out = tl.load(PART + (part[:, None] * BLOCK_G + g) * DIM + d[None, :], mask=live[:, None],
                                other=0.0)
            new_top = tl.maximum(top, tl.max(lse, 0))
            weight = tl.exp(lse - new_top)
            rescale = tl.exp(top - new_top)
            acc = acc * rescale + tl.sum(chunk_out * weight[:, None], 0)
            total = total * rescale + tl.sum(weight, 0)
            top = new_top
        tl.store(OUT + b * so_b + h * so_h + g * so_g + d, (acc / total).to(OUT.dtype.element_ty))

    return attend_chunk, merge_chunks


def split_kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                       scale: float, splits: int | None = None,
                       launch: AttentionLaunch | None = None) -> torch.Tensor:
    """softmax(query · keyᵀ · scale + mask) · value for `query` `[b, kv_heads, groups, d]` (a group's query heads
    as rows), `key`/`value` `[b, kv_heads, slots, d]`, an additive `mask` broadcastable to `[b, kv_heads,
    groups, slots]`; returns `[b, kv_heads, groups, d]` in the query's dtype. `splits`: how many chunks the
    slots go into (by default as `launch` says); `launch`: by default `LAUNCH`."""
    batch, kv_heads, groups, dim = query.shape
    slots = key.shape[2]
    launch = launch or LAUNCH
    rows = batch * kv_heads
    if splits is None:
        splits = launch.chunks(rows, _multiprocessors(query.device))
    splits = max(1, min(splits, math.ceil(slots / launch.block_slots)))
    chunk = launch.block_slots * math.ceil(slots / splits / launch.block_slots)  # a multiple of the block
    splits = math.ceil(slots / chunk)  # every chunk holds at least one slot
    block_g = max(16, next_power_of_2(groups))  # tl.dot takes at least 16 rows
    query = query if query.stride(-1) == 1 else query.contiguous()
    mask = mask.expand(batch, kv_heads, groups, slots)
    parts = torch.empty(rows, splits, block_g, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(rows, splits, block_g, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, kv_heads, groups, dim, dtype=query.dtype, device=query.device)
    attend_chunk, merge_chunks = _kernels(os.environ.get("TRITON_INTERPRET"))
    attend_chunk[(rows, splits)](
        query, key, value, mask, parts, lse, scale, slots, chunk, kv_heads, groups,
        *query.stride()[:3], *key.stride()[:3], *value.stride()[:3], *mask.stride(),
        BLOCK_G=block_g, BLOCK_N=launch.block_slots, DIM=dim, num_warps=launch.num_warps,
        num_stages=launch.num_stages)
    merge_chunks[(rows, groups)](parts, lse, out, splits, kv_heads, groups, *out.stride()[:3], BLOCK_G=block_g,
                                 BLOCK_S=min(MERGE_BLOCK_SPLITS, next_power_of_2(splits)), DIM=dim)
    return out


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> bool:
    """Whether `split_kv_attention` serves this decoding call (see the module docstring)."""
    dim = query.shape[-1]
    return (query.is_cuda and active().split_kv and query.dtype in (torch.float16, torch.bfloat16)
            and key.dtype == value.dtype == query.dtype and isinstance(mask, torch.Tensor)
            and mask.is_floating_point() and dim >= 16 and dim & (dim - 1) == 0
            and key.stride(-1) == 1 and value.stride(-1) == 1 and split_kv_works(query.device, query.dtype))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


@functools.lru_cache(maxsize=None)
def split_kv_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels build on `device` and agree with SDPA there: probed once, with a warning if not (the
    calls then go to SDPA)."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 2, 7, 64, generator=generator).to(device, dtype),
                         *(torch.randn(2, 2, 300, 64, generator=generator).to(device, dtype) for _ in range(2)))
    mask = torch.zeros(2, 2, 1, 300, dtype=dtype, device=device)
    mask[0, :, :, 250:] = torch.finfo(dtype).min
    return compilation.agrees_or_warns(
        lambda: split_kv_attention(query, key, value, mask, 0.125, splits=3),
        lambda: torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.125),
        2e-2, "the split-KV decoding kernel", "SDPA", "decoding attention uses SDPA", device)
