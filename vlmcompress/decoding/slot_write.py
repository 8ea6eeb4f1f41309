"""A static decoding step's cache write in one kernel (`StaticLayer.update`, a layer that does not evict).

Each step writes its token's key and value into their slot and marks the slot attended, in `slot_valid` and in
the additive mask (0 there). As PyTorch operations those are four kernels per layer (two `index_copy_`, two
`index_fill_`), 112 per step of a 28-layer model, each moving a few kilobytes: launch-bound work that a
profile of Qwen2-VL-7B's step at batch 8 puts at 0.22 ms (docs/benchmarks.md, "Where a step's time goes").
`write_step` does all four in one triton kernel, one program per (sample, KV head), on CUDA where a probe
against the PyTorch operations passes (`slot_write_works`); elsewhere it runs those operations.
"""

from __future__ import annotations

import functools
import os

import torch

from .. import compilation
from .split_kv import next_power_of_2


@functools.lru_cache(maxsize=None)
def _kernel(interpret: str | None):
    """Built on first use (a machine without triton never asks for it), and again under `TRITON_INTERPRET`,
    which `triton.jit` reads when it decorates."""
    import triton
    import triton.language as tl

    @triton.jit
    def write_slot(KEY, VALUE, KEYS, VALUES, VALID, MASK, SLOT, heads, groups,
                   snk_b, snk_h, snv_b, snv_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sa_b, sa_h, sm_b, sm_h, sm_g,
                   HAS_MASK: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr):
        row = tl.program_id(0)
        b, h = (row // heads).to(tl.int64), row % heads  # int64: a long cache's offsets pass 2**31
        slot = tl.load(SLOT)
        d = tl.arange(0, DIM)
        key = tl.load(KEY + b * snk_b + h * snk_h + d)
        value = tl.load(VALUE + b * snv_b + h * snv_h + d)
        tl.store(KEYS + b * sk_b + h * sk_h + slot * sk_n + d, key)
        tl.store(VALUES + b * sv_b + h * sv_h + slot * sv_n + d, value)
        tl.store(VALID + b * sa_b + h * sa_h + slot, 1)
        if HAS_MASK:
            g = tl.arange(0, BLOCK_G)
            zero = tl.zeros([BLOCK_G], MASK.dtype.element_ty)
            tl.store(MASK + b * sm_b + h * sm_h + g * sm_g + slot, zero, mask=g < groups)

    return write_slot


def write_step(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               slot: torch.Tensor, slot_valid: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Write `key`/`value` `[b, h, 1, d]` into slot `slot` (`[1]`, on the device) of `keys`/`values`
    `[b, h, slots, d]`, and mark it attended: True in `slot_valid` `[b, h, slots]`, 0 in the additive `mask`
    `[b, h, groups, 1, slots]` (None: no mask yet)."""
    if _takes(keys, values, key, value, slot_valid, mask):
        _launch(keys, values, key, value, slot, slot_valid, mask)
    else:
        write_step_reference(keys, values, key, value, slot, slot_valid, mask)


def _launch(keys, values, key, value, slot, slot_valid, mask) -> None:
    batch, heads, _, dim = keys.shape
    groups = mask.shape[2] if mask is not None else 1
    mask_strides = (mask.stride(0), mask.stride(1), mask.stride(2)) if mask is not None else (0, 0, 0)
    _kernel(os.environ.get("TRITON_INTERPRET"))[(batch * heads,)](
        key, value, keys, values, slot_valid, mask if mask is not None else keys, slot, heads, groups,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), *keys.stride()[:3], *values.stride()[:3],
        slot_valid.stride(0), slot_valid.stride(1), *mask_strides,
        HAS_MASK=mask is not None, BLOCK_G=next_power_of_2(groups), DIM=dim)


def write_step_reference(keys, values, key, value, slot, slot_valid, mask) -> None:
    """`write_step` as PyTorch operations."""
    keys.index_copy_(2, slot, key)
    values.index_copy_(2, slot, value)
    slot_valid.index_fill_(-1, slot, True)
    if mask is not None:
        mask.index_fill_(-1, slot, 0.0)


def _takes(keys, values, key, value, slot_valid, mask) -> bool:
    dim = keys.shape[-1]
    inner_contiguous = all(t.stride(-1) == 1 for t in (keys, values, key, value, slot_valid)) and (
        mask is None or (mask.stride(-1) == 1 and mask.shape[3] == 1))
    return (keys.is_cuda and inner_contiguous and dim >= 16 and dim & (dim - 1) == 0
            and key.shape[0] == keys.shape[0] and key.shape[2] == 1 and key.dtype == value.dtype == keys.dtype
            and slot_write_works(keys.device, keys.dtype))


@functools.lru_cache(maxsize=None)
def slot_write_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernel builds on `device` and writes what the PyTorch operations write: probed once, with a
    warning if not (the writes then run as those operations)."""
    generator = torch.Generator().manual_seed(0)
    # a step's key and value come as views of the projections, [b, 1, h, d] transposed
    state = ([torch.randn(3, 2, 9, 64, generator=generator).to(device, dtype) for _ in range(2)]
             + [torch.randn(3, 1, 2, 64, generator=generator).to(device, dtype).transpose(1, 2) for _ in range(2)]
             + [torch.tensor([5], device=device), torch.zeros(3, 2, 9, dtype=torch.bool, device=device),
                torch.full((3, 2, 7, 1, 9), -1.0, dtype=dtype, device=device)])
    copy = [t.clone() for t in state]

    def written(write, keys, values, key, value, slot, valid, mask):
        write(keys, values, key, value, slot, valid, mask)
        return torch.cat([keys.flatten(), values.flatten(), valid.flatten().to(dtype), mask.flatten()])

    return compilation.agrees_or_warns(
        lambda: written(_launch, *state), lambda: written(write_step_reference, *copy),
        0.0, "the one-kernel cache write", "index_copy_ and index_fill_", "the writes run as those", device)
