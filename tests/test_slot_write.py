"""A static decoding step's cache write (`vlmcompress/decoding/slot_write.py`): its token's key and value land in
their slot, the slot becomes attended in `slot_valid` and the additive mask, and nothing else changes; the
triton kernel (on the CPU through triton's interpreter, and on CUDA) against the PyTorch operations."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import in_a_child_process, interpreted

from vlmcompress.decoding import slot_write

pytest.importorskip("triton")


def cache_state(batch, heads, slots, dim, groups, dtype, device="cpu", with_mask=True, seed=0):
    """A layer's buffers mid-decoding and a step's key and value, as the projections give them (`[b, 1, h, d]`
    transposed)."""
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(batch, heads, slots, dim, generator=generator).to(device, dtype) for _ in range(2))
    key, value = (torch.randn(batch, 1, heads, dim, generator=generator).to(device, dtype).transpose(1, 2)
                  for _ in range(2))
    valid = torch.rand(batch, heads, slots, generator=generator).to(device) < 0.5
    mask = torch.where(valid, 0.0, torch.finfo(dtype).min).to(dtype)[:, :, None, None].expand(
        -1, -1, groups, -1, -1).contiguous() if with_mask else None
    return keys, values, key, value, valid, mask


def assert_written(write, device, dtype, with_mask, slot_index=3):
    before = cache_state(2, 3, 8, 64, 7, dtype, device, with_mask)
    keys, values, key, value, valid, mask = (t.clone() if t is not None else None for t in before)
    slot = torch.tensor([slot_index], device=device)
    write(keys, values, key, value, slot, valid, mask)
    others = [s for s in range(8) if s != slot_index]
    assert torch.equal(keys[:, :, slot_index], key[:, :, 0]) and torch.equal(values[:, :, slot_index], value[:, :, 0])
    assert torch.equal(keys[:, :, others], before[0][:, :, others])
    assert torch.equal(values[:, :, others], before[1][:, :, others])
    assert bool(valid[..., slot_index].all()) and torch.equal(valid[..., others], before[4][..., others])
    if with_mask:
        assert bool((mask[..., slot_index] == 0).all()) and torch.equal(mask[..., others], before[5][..., others])


def test_the_pytorch_write_marks_only_the_step_slot():
    for with_mask in (True, False):
        assert_written(slot_write.write_step, "cpu", torch.float32, with_mask)


test_triton_kernels_in_a_child_process = in_a_child_process(__file__)


@interpreted
@pytest.mark.parametrize("with_mask", [True, False])
def test_interpreted_kernel_marks_only_the_step_slot(with_mask):
    assert_written(slot_write._launch, "cpu", torch.float16, with_mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel serves CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_the_kernel_is_taken_and_marks_only_the_step_slot(dtype):
    assert slot_write.slot_write_works(torch.device("cuda", torch.cuda.current_device()), dtype)
    for with_mask in (True, False):
        assert_written(slot_write.write_step, "cuda", dtype, with_mask)
