"""The attention each prompt key receives from every prompt query, without writing the attention matrix.

H2O and LOOK-M score a key by the attention it receives from all the prompt's queries, Σ_i softmax(q_i·K/√d)_j
(causal). Made from chunks of the score matrix (`scoring.attention_chunks`) that costs the product once more and
writes and reads back every score in float32 (b·H·n² of them: 5 GB per layer for Qwen2-VL-7B at batch 8 and 2408
tokens), which made H2O's prefill half again as long as the uncompressed one. Here two triton kernels do it as
flash attention does, from tiles that stay on chip:

1. `row_lse`: each query row's log-sum-exp, lse_i = log Σ_j exp(s_ij) over the keys it sees, with a running max;
2. `column_sums`: per block of keys, Σ_i exp(s_ij − lse_i) over every query row (and query head of the KV head),
   which is softmax(s_i)_j summed over i; averaged over the group's query heads.

Used on CUDA for bf16/fp16 where a probe against the chunked computation passes (`received_attention_works`) and
`DecodingOptions(fused_scoring=True)` (the default); the chunked computation everywhere else. On the CPU the
kernels run in triton's interpreter for the tests.
"""

from __future__ import annotations

import functools
import os

import torch

from . import compilation
from .decoding.options import active
from .scoring import accumulated_attention

BLOCK_QUERIES = 64
BLOCK_KEYS = 64


@functools.lru_cache(maxsize=None)
def _kernels(interpret: str | None):
    """The two kernels, built on first use (a machine without triton never asks for it), and again under
    `TRITON_INTERPRET`, which `triton.jit` reads when it decorates."""
    import triton
    import triton.language as tl

    @triton.jit
    def row_lse(Q, K, BIAS, LSE, scale, n, q_len, heads, groups,
                sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sb_b, sb_n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM: tl.constexpr, PRECISION: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)  # row: sample * heads + query head
        b, head = (row // heads).to(tl.int64), row % heads
        kv = head // groups
        m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, DIM)
        live_m = m < q_len
        q = tl.load(Q + b * sq_b + head * sq_h + m[:, None] * sq_m + d[None, :], mask=live_m[:, None], other=0.0)
        position = n - q_len + m  # each query row sees the keys up to its own position
        top = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        last = tl.minimum(n, n - q_len + (block + 1) * BLOCK_M)
        for start in range(0, last, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            live_n = j < n
            k = tl.load(K + b * sk_b + kv * sk_h + j[:, None] * sk_n + d[None, :], mask=live_n[:, None], other=0.0)
            bias = tl.load(BIAS + b * sb_b + j * sb_n, mask=live_n, other=float("-inf"))
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias[None, :]
            scores = tl.where(j[None, :] <= position[:, None], scores, float("-inf"))
            new_top = tl.maximum(top, tl.max(scores, 1))
            safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)  # a row that sees no key yet
            total = total * tl.exp(top - safe_top) + tl.sum(tl.exp(scores - safe_top[:, None]), 1)
            top = new_top
        lse = tl.where(total > 0, top + tl.log(total), float("inf"))  # +inf: a row seeing no key adds 0 below
        tl.store(LSE + row * q_len + m, lse, mask=live_m)

    @triton.jit
    def column_sums(Q, K, BIAS, LSE, OUT, scale, n, q_len, kv_heads, groups,
                    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sb_b, sb_n,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DIM: tl.constexpr, PRECISION: tl.constexpr):
        row, block = tl.program_id(0), tl.program_id(1)  # row: sample * kv_heads + KV head
        b, kv = (row // kv_heads).to(tl.int64), row % kv_heads
        j = block * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, DIM)
        live_n = j < n
        k = tl.load(K + b * sk_b + kv * sk_h + j[:, None] * sk_n + d[None, :], mask=live_n[:, None], other=0.0)
        bias = tl.load(BIAS + b * sb_b + j * sb_n, mask=live_n, other=float("-inf"))
        acc = tl.zeros([BLOCK_N], tl.float32)
        first = tl.maximum(0, block * BLOCK_N - (n - q_len))  # the first query row that sees this block
        first = (first // BLOCK_M) * BLOCK_M
        for group in range(0, groups):
            head = kv * groups + group
            for start in range(first, q_len, BLOCK_M):
                m = start + tl.arange(0, BLOCK_M)
                live_m = m < q_len
                q = tl.load(Q + b * sq_b + head * sq_h + m[:, None] * sq_m + d[None, :], mask=live_m[:, None],
                            other=0.0)
                lse = tl.load(LSE + (b * kv_heads * groups + head) * q_len + m, mask=live_m, other=float("inf"))
                scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias[None, :]
                seen = (j[None, :] <= (n - q_len + m)[:, None]) & live_m[:, None]
                probs = tl.where(seen, tl.exp(scores - lse[:, None]), 0.0)
                acc += tl.sum(probs, 0)
        tl.store(OUT + row * n + j, acc / groups, mask=live_n)

    return row_lse, column_sums


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scaling: float,
                       key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """`scoring.accumulated_attention` for queries `[b, H, q, d]` (the last q positions of keys `[b, h, n, d]`),
    key_valid `[b, n]` (False on padding) or None: `[b, h, n]` in float64."""
    b, heads, q_len, dim = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    queries = queries if queries.stride(-1) == 1 else queries.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    bias = torch.zeros(b, n, dtype=torch.float32, device=keys.device)
    if key_valid is not None:
        bias.masked_fill_(~key_valid.to(keys.device), float("-inf"))
    lse = torch.empty(b, heads, q_len, dtype=torch.float32, device=keys.device)
    out = torch.empty(b, kv_heads, n, dtype=torch.float32, device=keys.device)
    precision = "ieee" if queries.dtype == torch.float32 else "tf32"  # half inputs: a plain half product
    row_lse, column_sums = _kernels(os.environ.get("TRITON_INTERPRET"))
    strides = (*queries.stride()[:3], *keys.stride()[:3], *bias.stride())
    row_lse[(b * heads, -(-q_len // BLOCK_QUERIES))](
        queries, keys, bias, lse, scaling, n, q_len, heads, groups, *strides,
        BLOCK_M=BLOCK_QUERIES, BLOCK_N=BLOCK_KEYS, DIM=dim, PRECISION=precision)
    column_sums[(b * kv_heads, -(-n // BLOCK_KEYS))](
        queries, keys, bias, lse, out, scaling, n, q_len, kv_heads, groups, *strides,
        BLOCK_M=BLOCK_QUERIES, BLOCK_N=BLOCK_KEYS, DIM=dim, PRECISION=precision)
    return out.double()


def takes(queries: torch.Tensor, keys: torch.Tensor, key_valid) -> bool:
    """Whether `received_attention` serves this call (module docstring)."""
    dim = queries.shape[-1]
    return (queries.is_cuda and active().fused_scoring and keys.dtype in (torch.float16, torch.bfloat16)
            and queries.dtype == keys.dtype and (key_valid is None or key_valid.dim() == 2)
            and dim >= 16 and dim & (dim - 1) == 0 and received_attention_works(keys.device, keys.dtype))


@functools.lru_cache(maxsize=None)
def received_attention_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels build on `device` and agree with the chunked computation there: probed once, with a
    warning if not (the calls then take the chunked one)."""
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 4, 150, 64, generator=generator).to(device, dtype)
    keys = torch.randn(2, 2, 150, 64, generator=generator).to(device, dtype)
    key_valid = torch.ones(2, 150, dtype=torch.bool, device=device)
    key_valid[1, :30] = False
    return compilation.agrees_or_warns(
        lambda: received_attention(queries, keys, 0.125, key_valid),
        lambda: accumulated_attention(queries, keys, 0.125, key_valid),
        2e-2, "the received-attention kernels", "the chunked scores", "prefill scoring writes its scores out",
        device)
