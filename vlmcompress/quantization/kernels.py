"""Triton kernels for `QuantizedLinear` on CUDA, reading the stored layout (`packing`) as it is: no repacking.

A product with few rows (decoding; at most `MAX_PRODUCT_ROWS`) is bound by reading the packed weight. One program
computes a block of output columns over the whole input: it walks the input a step of `block_k` columns at a time,
splits each packed byte into its two codes (high nibble: even column, low nibble: odd column) and multiplies the
codes with the input's even and odd columns. The zero point and scale are applied once per group on the sums, `s ·
(Σ q·x − z · Σ x)`, rather than on every weight; it allocates only its output, so it replays inside CUDA graphs. A
launch may split the input over several programs per block of outputs (`split_k`: one product, no memset; the
last program to finish adds the shares up, `split_sums`). With one row the products are elementwise in float32
and summed (`product_one_row`); with 2-64 rows the rows go 16 at a time (the last block padded) with the codes to
the tensor cores (`product_few_rows`). Both accumulate in float32, and read a code as a float from its bits, with
no conversion instruction: 0x4B000000 | q is the float32 2^23 + q (less 2^23 at once), 0x4300 | q the bf16 128 + q
and 0x6400 | q the fp16 1024 + q (these offsets are subtracted with the zero point, after the tensor-core sums).

With more rows (prefill) the product is bound by arithmetic, which cuBLAS does best: `dequantize` writes the
weight in the model's dtype, bit for bit `dequantize_groups(...).to(dtype)`, for one `F.linear`.

The launch configurations of the few-rows product are a small table by shape (`ONE_ROW_LAUNCHES`,
`FEW_ROWS_LAUNCHES`), which `bench/quant_kernels.py` tunes on a GPU from `candidate_configs`. The kernels serve
bf16/fp16 layers on CUDA where a probe against the dequantized product passes (`kernels_work`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings

import torch
import torch.nn.functional as F

from .. import compilation
from .base import dequantize_groups

# rows up to which `quantized_linear` runs the few-rows product (decoding, up to batch 64); above it, dequantize +
# cuBLAS, whose writing and reading of the whole weight in the model's dtype a prompt's many rows pay back
MAX_PRODUCT_ROWS = 64
DOT_ROWS = 16  # tl.dot takes at least 16 rows: `product_few_rows` takes the input's rows 16 at a time
DEQUANTIZE_BLOCK_N = 64  # output rows one `dequantize` program writes (by one group's columns)


@dataclasses.dataclass(frozen=True)
class ProductConfig:
    """A launch of the few-rows product: `block_m` 1 runs `product_one_row` (one input row), 16 `product_few_rows`
    (any rows, 16 at a time on the tensor cores); each program computes `block_n` outputs, `block_k` input columns
    a step (for `product_few_rows` at most one group). `split_k` (a power of two) splits the input's steps over
    that many programs per block of outputs, whose sums the last of them to finish adds up (`split_sums`): more
    loads in flight where the outputs are few."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    split_k: int = 1

    def fitted(self, in_features: int, group_size: int) -> "ProductConfig":
        """This launch with a step that the input and its groups take: within one group for the tensor-core
        kernel, a divisor of the input width (the steps are not masked) for both."""
        block_k = min(self.block_k, group_size) if self.block_m > 1 else self.block_k
        while in_features % block_k:  # halving ends at the group size at the latest, which divides the input
            block_k //= 2
        if self.split_k < 1 or self.split_k & (self.split_k - 1):
            raise ValueError(f"split_k is a power of two: {self}")
        return dataclasses.replace(self, block_k=block_k)


# The launches of the few-rows product by shape: (out_features at most, in_features at least, launch), the first
# row that matches wins. Rows 2-5 are the fastest of `candidate_configs` per Qwen2-7B shape on an H100 (tuned by
# bench/quant_kernels.py, bench/results/quant_kernels_h100.json; at one row 1.1-1.8x faster than the untuned
# table); the last rows of each table take other widths.
ONE_ROW_LAUNCHES = [
    (1024, 0, ProductConfig(1, 8, 256)),
    (3584, 8192, ProductConfig(1, 32, 512, split_k=8)),  # down_proj, 18944 -> 3584
    (3584, 0, ProductConfig(1, 32, 512, split_k=4)),  # o_proj, 3584 -> 3584
    (8192, 0, ProductConfig(1, 32, 512, split_k=4)),  # the fused q/k/v, 3584 -> 4608
    (math.inf, 0, ProductConfig(1, 32, 512, num_stages=3)),  # the fused gate/up, 3584 -> 37888
]
FEW_ROWS_LAUNCHES = [  # tuned at 8 rows (bench/results/quant_kernels_rows8_h100.json)
    (3584, 8192, ProductConfig(DOT_ROWS, 128, 128, num_warps=4, num_stages=4, split_k=8)),
    (3584, 0, ProductConfig(DOT_ROWS, 64, 128, num_warps=4, num_stages=4, split_k=8)),
    (8192, 0, ProductConfig(DOT_ROWS, 128, 128, num_warps=4, num_stages=4, split_k=8)),
    (math.inf, 0, ProductConfig(DOT_ROWS, 128, 128, num_warps=4, num_stages=4)),
]


def product_config(rows: int, out_features: int, in_features: int) -> ProductConfig:
    """The launch of a product of `rows` rows (at most `MAX_PRODUCT_ROWS`) with a `[out_features, in_features]`
    weight, from the tables above (one row, or more)."""
    table = ONE_ROW_LAUNCHES if rows == 1 else FEW_ROWS_LAUNCHES
    return next(launch for most_out, least_in, launch in table if out_features <= most_out and in_features >= least_in)


def candidate_configs(rows: int) -> list[ProductConfig]:
    """The launches `bench/quant_kernels.py` tries for `rows`: one-row ones (for one row) and tensor-core ones.
    (Steps longer than 512 columns would not divide Qwen2-7B's widths, 7 · 512 and 37 · 512.)"""
    dot = [ProductConfig(DOT_ROWS, block_n, block_k, warps, stages) for block_n in (16, 32, 64, 128)
           for block_k in (64, 128) for warps, stages in ((4, 2), (4, 4))]
    split_dot = [ProductConfig(DOT_ROWS, block_n, 128, 4, stages, split_k) for block_n in (32, 64, 128)
                 for stages in (2, 4) for split_k in (2, 4, 8)]
    if rows > 1:
        return dot + split_dot
    # at one row the loads in flight, out_features x block_k / 2 bytes a step over the whole grid, are what
    # bounds the bandwidth: longer steps, and stages that issue the next steps' loads early, raise them
    one_row = [ProductConfig(1, block_n, block_k, warps, stages) for block_n in (8, 16, 32)
               for block_k in (256, 512) for warps in (4, 8) for stages in (1, 3)]
    split = [ProductConfig(1, block_n, block_k, 4, 1, split_k) for block_n in (16, 32) for block_k in (256, 512)
             for split_k in (2, 4, 8)]
    return one_row + split + dot


@functools.lru_cache(maxsize=None)
def _kernels(interpret: str | None):
    """The three triton kernels, built on first use (so that a machine without triton never asks for it), and
    again under `TRITON_INTERPRET`, which `triton.jit` reads when it decorates."""
    import triton
    import triton.language as tl

    @triton.jit
    def product_one_row(X, QW, S, Z, BIAS, OUT, SUMS, ARRIVED, N, K, row_bytes, groups, HAS_BIAS: tl.constexpr,
                        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr, PART: tl.constexpr,
                        SPLIT_K: tl.constexpr):
        """OUT[n] = Σ_k X[k] (q[n, k] − z) s (+ BIAS[n]); a step reads PARTS × PART columns, each part inside
        one group (so PART = min(step, group)): a [BLOCK_N, PARTS, PART / 2] tile of bytes. With SPLIT_K > 1,
        program (i, j) sums the j-th share of the steps into SUMS[j] and counts itself in ARRIVED[i]; the last
        to arrive adds the shares up, writes OUT and sets the count back to 0 for the next product."""
        block = tl.program_id(0)
        n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        live = n < N
        part, pair = tl.arange(0, PARTS)[:, None], tl.arange(0, PART // 2)[None, :]
        rows = QW + n.to(tl.int64)[:, None, None] * row_bytes
        acc = tl.zeros([BLOCK_N], tl.float32)
        share = tl.cdiv(K // (PARTS * PART), SPLIT_K) * (PARTS * PART)  # columns a program sums
        begin = tl.program_id(1) * share
        for start in range(begin, tl.minimum(begin + share, K), PARTS * PART):
            packed = tl.load(rows + (start // 2 + part * (PART // 2) + pair)[None, :, :], mask=live[:, None, None],
                             other=0)
            # the input's even and odd columns, read apart: no reshuffling of a loaded tile between threads
            even = X + start + part * PART + 2 * pair
            x_even, x_odd = tl.load(even).to(tl.float32), tl.load(even + 1).to(tl.float32)
            # a code q as a float from its bits, with no conversion instruction: 0x4B000000 | q is 2^23 + q
            high = ((packed >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            low = ((packed & 15).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
            codes_x = tl.sum(high * x_even[None, :, :] + low * x_odd[None, :, :], axis=2)  # [BLOCK_N, PARTS]
            at = n[:, None] * groups + (start + tl.arange(0, PARTS) * PART)[None, :] // GROUP
            scale = tl.load(S + at, mask=live[:, None], other=0).to(tl.float32)
            zero = tl.load(Z + at, mask=live[:, None], other=0).to(tl.float32)
            x_sum = tl.sum(x_even + x_odd, axis=1)
            acc += tl.sum(scale * (codes_x - zero * x_sum[None, :]), axis=1)
        if SPLIT_K > 1:
            tl.store(SUMS + tl.program_id(1) * N + n, acc, mask=live)
            # acq_rel: the share stored above is visible to whoever arrives last, and it sees every other one
            if tl.atomic_add(ARRIVED + block, 1, sem="acq_rel") == SPLIT_K - 1:
                shares = tl.load(SUMS + tl.arange(0, SPLIT_K)[:, None] * N + n[None, :], mask=live[None, :],
                                 other=0.0, cache_modifier=".cg")  # from L2: other programs wrote them
                acc = tl.sum(shares, axis=0)
                if HAS_BIAS:
                    acc += tl.load(BIAS + n, mask=live, other=0).to(tl.float32)
                tl.store(OUT + n, acc.to(OUT.dtype.element_ty), mask=live)
                tl.atomic_xchg(ARRIVED + block, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(BIAS + n, mask=live, other=0).to(tl.float32)
            tl.store(OUT + n, acc.to(OUT.dtype.element_ty), mask=live)

    @triton.jit
    def product_few_rows(X, QW, S, Z, BIAS, OUT, SUMS, ARRIVED, M, N, K, row_bytes, groups, stride_x, stride_out,
                         HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, CODE_OFFSET: tl.constexpr,
                         SPLIT_K: tl.constexpr):
        """OUT[m, n] = Σ_k X[m, k] (q[n, k] − z) s (+ BIAS[n]) for BLOCK_M rows (the last block padded with
        zeros): per step of BLOCK_K ≤ GROUP columns, two tensor-core products of the even and odd input columns
        with the [BLOCK_K / 2, BLOCK_N] high and low codes (CODE_OFFSET + q in DOT_DTYPE), then the group's zero
        point and that offset, and its scale. The blocks of rows are the grid's first dimension, so the programs
        reading one block of codes run side by side and read it from L2 after the first. SPLIT_K: as in
        `product_one_row`, the grid's third dimension, SUMS [SPLIT_K, M, N]."""
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        live_n, live_m = n < N, m < M
        columns = QW + n.to(tl.int64)[None, :] * row_bytes  # the codes read transposed: [bytes, outputs]
        rows = X + m[:, None] * stride_x
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        share = tl.cdiv(K // BLOCK_K, SPLIT_K) * BLOCK_K  # columns a program sums
        begin = tl.program_id(2) * share
        for start in range(begin, tl.minimum(begin + share, K), BLOCK_K):
            packed = tl.load(columns + (start // 2 + tl.arange(0, BLOCK_K // 2))[:, None], mask=live_n[None, :],
                             other=0)
            even = rows + start + 2 * tl.arange(0, BLOCK_K // 2)[None, :]
            x_even = tl.load(even, mask=live_m[:, None], other=0)
            x_odd = tl.load(even + 1, mask=live_m[:, None], other=0)
            high, low = packed >> 4, packed & 15
            if DOT_DTYPE == tl.bfloat16:  # CODE_OFFSET + q from the bits: 0x4300 | q is 128 + q
                high = (high.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
                low = (low.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
            elif DOT_DTYPE == tl.float16:  # 0x6400 | q is 1024 + q
                high = (high.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
                low = (low.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
            else:
                high, low = high.to(tl.float32), low.to(tl.float32)
            codes_x = tl.dot(x_even.to(DOT_DTYPE), high)
            codes_x = tl.dot(x_odd.to(DOT_DTYPE), low, codes_x)
            at = n * groups + start // GROUP
            scale = tl.load(S + at, mask=live_n, other=0).to(tl.float32)
            zero = tl.load(Z + at, mask=live_n, other=0).to(tl.float32) + CODE_OFFSET
            x_sum = tl.sum(x_even.to(tl.float32) + x_odd.to(tl.float32), axis=1)
            acc += scale[None, :] * (codes_x - zero[None, :] * x_sum[:, None])
        live = live_m[:, None] & live_n[None, :]
        if SPLIT_K > 1:
            block = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            at = m[:, None] * N + n[None, :]
            tl.store(SUMS + tl.program_id(2) * M * N + at, acc, mask=live)
            if tl.atomic_add(ARRIVED + block, 1, sem="acq_rel") == SPLIT_K - 1:  # as in `product_one_row`
                shares = tl.load(SUMS + tl.arange(0, SPLIT_K)[:, None, None] * M * N + at[None, :, :],
                                 mask=live[None, :, :], other=0.0, cache_modifier=".cg")
                acc = tl.sum(shares, axis=0)
                if HAS_BIAS:
                    acc += tl.load(BIAS + n, mask=live_n, other=0).to(tl.float32)[None, :]
                tl.store(OUT + m[:, None] * stride_out + n[None, :], acc.to(OUT.dtype.element_ty), mask=live)
                tl.atomic_xchg(ARRIVED + block, 0)
        else:
            if HAS_BIAS:
                acc += tl.load(BIAS + n, mask=live_n, other=0).to(tl.float32)[None, :]
            tl.store(OUT + m[:, None] * stride_out + n[None, :], acc.to(OUT.dtype.element_ty), mask=live)

    @triton.jit
    def dequantize(QW, ORDER, S, Z, OUT, N, K, row_bytes, groups, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   TILE_K: tl.constexpr):
        """OUT[n, k] = ((q − z) · s in float32).to(OUT's dtype) for one group's columns of BLOCK_N rows: q − z and
        the product with a bf16/fp16 scale are exact in float32, so the one rounding is the cast's, as in
        `dequantize_groups(...).to(dtype)`. TILE_K 0: QW holds the stored form (uint8, two codes a byte); else
        tinygemm's int32 words, in tiles of 8 rows by TILE_K columns, ORDER[place in a tile] each code's nibble
        (`tile_order`)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        group = tl.program_id(1)
        live = n < N
        pair = group * (GROUP // 2) + tl.arange(0, GROUP // 2)
        if TILE_K == 0:
            packed = tl.load(QW + n.to(tl.int64)[:, None] * row_bytes + pair[None, :], mask=live[:, None], other=0)
            high, low = (packed >> 4).to(tl.int32), (packed & 15).to(tl.int32)
        else:
            column = 2 * pair[:, None] + tl.arange(0, 2)[None, :]  # [GROUP / 2, 2]: each pair's even and odd column
            nibble = tl.load(ORDER + (n % 8)[:, None, None] * TILE_K + (column % TILE_K)[None, :, :])
            tile = (n // 8).to(tl.int64)[:, None, None] * (K // TILE_K) + (column // TILE_K)[None, :, :]
            word = tl.load(QW + tile * TILE_K + nibble // 8, mask=live[:, None, None], other=0)
            high, low = tl.split((word >> (4 * (nibble % 8))) & 15)
        scale = tl.load(S + n * groups + group, mask=live, other=0).to(tl.float32)[:, None]
        zero = tl.load(Z + n * groups + group, mask=live, other=0).to(tl.float32)[:, None] + 8388608.0
        # 0x4B000000 | q is the float 2^23 + q: less 2^23 + z, q - z exactly
        high = ((high | 0x4B000000).to(tl.float32, bitcast=True) - zero) * scale
        low = ((low | 0x4B000000).to(tl.float32, bitcast=True) - zero) * scale
        weight = tl.interleave(high, low)
        if OUT.dtype.element_ty == tl.bfloat16:  # rounded to nearest even by hand: the interpreter truncates casts
            bits = weight.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            weight = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        column = group * GROUP + tl.arange(0, GROUP)
        tl.store(OUT + n.to(tl.int64)[:, None] * K + column[None, :], weight.to(OUT.dtype.element_ty),
                 mask=live[:, None])

    return product_one_row, product_few_rows, dequantize


def _dot_dtype(dtype: torch.dtype):
    """The tensor-core kernel's operand type and the offset its codes are read with: the input's,
    except in triton's interpreter, whose bf16 products are wrong (float32 holds bf16 inputs exactly)."""
    import triton.language as tl

    if dtype == torch.float16:
        return tl.float16, 1024.0
    if os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32, 0.0
    return tl.bfloat16, 128.0


def quantized_product(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      bias: torch.Tensor | None, group_size: int, config: ProductConfig | None = None) -> torch.Tensor:
    """`x` [rows, in] (contiguous) times the weight held as `qweight` [out, in/2], `scales` and
    `zeros` [out, in/group] (`packing`'s stored form), plus `bias`: [rows, out] in x's dtype, summed in float32.
    `config`: a launch (`product_config(...)` by default)."""
    rows, in_features = x.shape
    out_features = qweight.shape[0]
    if qweight.stride(1) != 1:
        raise ValueError("quantized_product reads qweight row by row: pass it contiguous (pack_codes makes it so)")
    config = (config or product_config(rows, out_features, in_features)).fitted(in_features, group_size)
    if rows > 1 and config.block_m == 1:
        raise ValueError(f"a one-row launch takes one row, not {rows}")
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    product_one_row, product_few_rows, _ = _kernels(os.environ.get("TRITON_INTERPRET"))
    blocks = -(-out_features // config.block_n)
    has_bias = bias is not None
    shared = (x, qweight, scales, zeros, bias if has_bias else scales, out)  # the bias is not read without one
    widths = (out_features, in_features, qweight.stride(0), in_features // group_size)
    launch = {"HAS_BIAS": has_bias, "GROUP": group_size, "BLOCK_N": config.block_n, "num_warps": config.num_warps,
              "num_stages": config.num_stages}
    row_blocks = -(-rows // config.block_m)
    split = split_sums(x.device, (config.split_k, rows, out_features), row_blocks * blocks) \
        if config.split_k > 1 else None
    sums, arrived = split or (out, out)  # without a split they are not read
    launch["SPLIT_K"] = config.split_k if split else 1
    if config.block_m == 1:
        part = min(config.block_k, group_size)
        product_one_row[(blocks, launch["SPLIT_K"])](*shared, sums, arrived, *widths, PARTS=config.block_k // part,
                                                     PART=part, **launch)
    else:
        dot_dtype, code_offset = _dot_dtype(x.dtype)
        product_few_rows[(row_blocks, blocks, launch["SPLIT_K"])](
            *shared, sums, arrived, rows, *widths, x.stride(0), out.stride(0), BLOCK_M=config.block_m,
            BLOCK_K=config.block_k, DOT_DTYPE=dot_dtype, CODE_OFFSET=code_offset, **launch)
    return out


_split_sums: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def split_sums(device: torch.device, shape: tuple[int, int, int], blocks: int):
    """The buffers of a split product, kept per device and shape: the shares' sums (float32 `shape`, `[split_k,
    rows, out_features]`) and each block's arrival count (int32 `[blocks]`, back at 0 after every product). They
    are made outside CUDA-graph capture (at the first, eager, product of a shape), so that a captured product
    reads buffers that outlive its graph; None for a product captured before its shape has them, which then runs
    unsplit. Kept for the process: split_k x rows x out_features x 4 bytes each (4.8 MB for 8 rows of Qwen2-7B's
    gate/up split 4 ways)."""
    key = (device, shape, blocks)
    if key not in _split_sums:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _split_sums[key] = (torch.empty(shape, dtype=torch.float32, device=device),
                            torch.zeros(blocks, dtype=torch.int32, device=device))
    return _split_sums[key]


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               tile_order: torch.Tensor | None = None) -> torch.Tensor:
    """The weight [out, in] in the scales' dtype, equal to `dequantize_groups(codes, scales, zeros).to(dtype)`, from
    `qweight` in the stored form or, with `tile_order` (`tinygemm_tile_order`), in tinygemm's layout."""
    out_features, groups = scales.shape
    in_features = groups * group_size
    out = torch.empty(out_features, in_features, dtype=scales.dtype, device=scales.device)
    kernel = _kernels(os.environ.get("TRITON_INTERPRET"))[2]
    tile_k = 0 if tile_order is None else tile_order.numel() // TILE_ROWS
    kernel[(-(-out_features // DEQUANTIZE_BLOCK_N), groups)](
        qweight, qweight if tile_order is None else tile_order, scales, zeros, out, out_features, in_features,
        qweight.stride(0), groups, GROUP=group_size, BLOCK_N=DEQUANTIZE_BLOCK_N, TILE_K=tile_k)
    return out


TILE_ROWS = 8  # tinygemm's tiles: 8 output rows by 16 x inner_k_tiles input columns


def tile_order(convert, inner_k_tiles: int) -> torch.Tensor | None:
    """Where `convert` (tinygemm's repacking: stored-form codes [out, in / 2] to int32 words) puts each code, read
    off a probe of 2 x 2 tiles whose codes spell their own place, 4 bits a probe: int32 [8 x tile columns], the
    nibble (8 a word, lowest first) that holds the code of each place (row x tile columns + column) of a tile,
    where every tile is laid out alike and the tiles follow each other row by row; None for any other layout."""
    from .packing import pack_codes  # `packing` imports this module

    tile_k = 16 * inner_k_tiles
    rows, columns = 2 * TILE_ROWS, 2 * tile_k
    places = torch.arange(rows * columns)
    found = torch.zeros_like(places)  # the place whose code each nibble holds
    for shift in range(0, (rows * columns - 1).bit_length(), 4):
        words = convert(pack_codes(((places >> shift) & 15).view(rows, columns))).reshape(-1).cpu().long()
        if words.numel() * 8 != places.numel():
            return None
        found |= ((words[:, None] >> torch.arange(0, 32, 4)) & 15).reshape(-1) << shift
    row, column = found[:TILE_ROWS * tile_k] // columns, found[:TILE_ROWS * tile_k] % columns  # the first tile
    if bool((row >= TILE_ROWS).any() or (column >= tile_k).any()):
        return None
    tile, inside = places // (TILE_ROWS * tile_k), places % (TILE_ROWS * tile_k)
    tiled = ((tile // 2) * TILE_ROWS + row[inside]) * columns + (tile % 2) * tile_k + column[inside]
    if not torch.equal(found, tiled):
        return None
    order = torch.empty(TILE_ROWS * tile_k, dtype=torch.int32)
    order[row * tile_k + column] = torch.arange(TILE_ROWS * tile_k, dtype=torch.int32)
    return order


def probe_layer(generator: torch.Generator, out_features: int, in_features: int, group_size: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes [out, in], zeros and scales [out, in / group] (CPU) of a layer the probes check kernels on."""
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator)
    zeros = torch.randint(0, 16, (out_features, in_features // group_size), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(out_features, in_features // group_size, generator=generator) / 64).to(dtype)
    return codes, zeros, scales


@functools.lru_cache(maxsize=None)
def tinygemm_tile_order(device: torch.device, inner_k_tiles: int) -> torch.Tensor | None:
    """`tile_order` of tinygemm's repacking on `device`, if triton's `dequantize` of a probe layer in that layout
    gives the stored form's weight bit for bit: probed once, with a warning if not (prompts of such layers then
    run on tinygemm itself, many times slower than cuBLAS)."""
    from torch.utils._triton import has_triton

    from .packing import pack_codes

    if not has_triton():
        return None
    instead = "prompts of tinygemm layers run on tinygemm (slow at many rows)"

    def convert(packed):
        return torch.ops.aten._convert_weight_to_int4pack(packed.to(device), inner_k_tiles)

    try:
        order = tile_order(convert, inner_k_tiles)
    except Exception as error:  # noqa: BLE001 - whatever a PyTorch without this repacking raises: tinygemm stays
        warnings.warn(f"vlmcompress: tinygemm's repacking could not be probed on {device} ({error!r}); {instead}")
        return None
    if order is None:
        warnings.warn(f"vlmcompress: tinygemm's layout on {device} is not the tiles `tile_order` reads; {instead}")
        return None
    group_size = 32
    codes, zeros, scales = probe_layer(torch.Generator().manual_seed(0), 3 * TILE_ROWS, 2 * 16 * inner_k_tiles,
                                       group_size, torch.bfloat16)
    order = order.to(device)
    agree = compilation.agrees_or_warns(
        lambda: dequantize(convert(pack_codes(codes)), scales.to(device), zeros.to(device), group_size, order).cpu(),
        lambda: dequantize_groups(codes, scales, zeros).to(torch.bfloat16), 0.0,
        "the triton dequantization of tinygemm's layout", "the stored form's", instead, device)
    return order if agree else None


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """`x @ dequant(W)^T + bias` for `x` [..., in]: the few-rows product up to `MAX_PRODUCT_ROWS` rows, else the
    dequantized weight through `F.linear` (cuBLAS)."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] > MAX_PRODUCT_ROWS:
        return F.linear(x, dequantize(qweight, scales, zeros, group_size), bias)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    return quantized_product(x2d, qweight, scales, zeros, bias, group_size).reshape(*x.shape[:-1], -1)


def takes(x: torch.Tensor, scales: torch.Tensor, group_size: int) -> bool:
    """Whether the kernels serve a layer with these `scales` and `group_size` on the input `x`: bf16/fp16 on
    CUDA, x of the layer's dtype, groups of a power of two from 32 (tensor-core steps of at least 16 pairs),
    and a probe on the device that passes."""
    return (x.is_cuda and scales.dtype in (torch.float16, torch.bfloat16) and x.dtype == scales.dtype
            and group_size >= 32 and group_size & (group_size - 1) == 0 and kernels_work(x.device, x.dtype))


@functools.lru_cache(maxsize=None)
def kernels_work(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether triton is there, the kernels build on `device` and agree with the product of the dequantized weight
    (in float32): probed once, with a warning if not (the layers then dequantize their weight for each product)."""
    from torch.utils._triton import has_triton

    from .packing import pack_codes  # `packing` imports this module

    if not has_triton():
        return False
    generator = torch.Generator().manual_seed(0)
    out_features, in_features, group_size = 40, 256, 64
    codes, zeros, scales = probe_layer(generator, out_features, in_features, group_size, dtype)
    x = torch.randn(MAX_PRODUCT_ROWS + 1, in_features, generator=generator).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    weight = dequantize_groups(codes, scales, zeros)
    qweight, zeros, scales, x_on_device, bias_on_device = (t.to(device) for t in (pack_codes(codes), zeros, scales,
                                                                                   x, bias))
    rows = (1, 3, MAX_PRODUCT_ROWS + 1)  # the one-row and tensor-core products, and dequantizing for cuBLAS
    return compilation.agrees_or_warns(
        lambda: torch.cat([dequantize(qweight, scales, zeros, group_size).cpu()] + [quantized_linear(
            x_on_device[:r], qweight, scales, zeros, bias_on_device, group_size).cpu().t() for r in rows], dim=1),
        lambda: torch.cat([weight.to(dtype)] + [(x[:r].float() @ weight.t() + bias.float()).t() for r in rows], dim=1),
        2e-2, "the int4 triton kernels", "the dequantized product", "quantized layers dequantize their weight for "
        "each product", device)
