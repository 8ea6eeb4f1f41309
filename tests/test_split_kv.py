"""Split-KV decoding attention (`vlmcompress/decoding/split_kv.py`): the softmax of the scores over every held slot,
whatever the chunks, checked against the literal formula in float64 (on the CPU through triton's interpreter,
which computes fp16 products; its bf16 products are wrong, so bf16 is checked on CUDA), and taken by
`vlmcompress_sdpa` only for masked bf16/fp16 decoding on CUDA. On a GPU: against SDPA at the real models'
shapes, inside a CUDA graph, and a graphed decoding against the same decoding through SDPA."""

from __future__ import annotations

import pytest
import torch
from conftest import image_inputs
from test_static_decoding import QUESTIONS, assert_path_decodes_like_without
from triton_interpreter import in_a_child_process, interpreted

import vlmcompress
from vlmcompress import DecodingOptions
from vlmcompress.decoding import split_kv
from vlmcompress.decoding.options import activated
from vlmcompress.decoding.grouped_sdpa import grouped_sdpa_attention_forward

pytest.importorskip("triton")


def literal_attention(query, key, value, mask, scale):
    """softmax(q·kᵀ·scale + mask)·v, in float64."""
    scores = query.double() @ key.double().transpose(-1, -2) * scale + mask.double()
    return torch.softmax(scores, dim=-1) @ value.double()


def random_case(batch, kv_heads, groups, slots, dim, dtype, device="cpu", per_row_mask=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads, groups, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, slots, dim, generator=generator) for _ in range(2))
    rows = groups if per_row_mask else 1
    mask = torch.zeros(batch, kv_heads, rows, slots)
    mask[0, :, :, slots // 2:] = torch.finfo(dtype).min  # a padded sample: its second half is not attended
    if per_row_mask:  # each query row of a group its own bias, as a per-head mask gives them
        mask[-1] += torch.randn(kv_heads, rows, slots, generator=generator)
    return [tensor.to(device, dtype) for tensor in (query, key, value, mask)]


test_triton_kernels_in_a_child_process = in_a_child_process(__file__)


@interpreted
@pytest.mark.parametrize("shape, splits", [
    ((2, 2, 7, 300, 64), 3),     # Qwen2's 7 query heads per KV head, chunks of 128 slots
    ((2, 2, 7, 300, 64), 1),     # one chunk: no merging
    ((1, 3, 4, 70, 32), 40),     # more chunks asked than slots allow: one per 64 slots
    ((2, 2, 7, 1300, 64), 40),   # 21 chunks: the merge loads them in two blocks
    ((2, 1, 16, 129, 16), 2),    # a last chunk of one slot
    ((1, 2, 1, 5, 64), None),    # one query head per KV head, fewer slots than one block
])
@pytest.mark.parametrize("per_row_mask", [False, True])
def test_interpreted_split_kv_attention_equals_the_softmax_over_all_slots(shape, splits, per_row_mask):
    query, key, value, mask = random_case(*shape, torch.float16, per_row_mask=per_row_mask)
    scale = shape[-1] ** -0.5
    ours = split_kv.split_kv_attention(query, key, value, mask, scale, splits=splits)
    assert ours.shape == query.shape and ours.dtype == torch.float16
    torch.testing.assert_close(ours.double(), literal_attention(query, key, value, mask, scale), rtol=2e-3,
                               atol=2e-3)


@interpreted
@pytest.mark.parametrize("launch", [split_kv.AttentionLaunch(block_slots=32, programs_per_multiprocessor=8),
                                    split_kv.AttentionLaunch(block_slots=128, num_warps=8, num_stages=1),
                                    split_kv.AttentionLaunch(block_slots=16, programs_per_multiprocessor=1)])
def test_interpreted_every_launch_computes_the_same_attention(launch, monkeypatch):
    """The launches `bench/decode_attention.py --tune` tries: other steps, chunk counts, warps and stages (on
    a device of 8 multiprocessors, so that the 4 rows split into 2 to 10 chunks)."""
    monkeypatch.setattr(split_kv, "_multiprocessors", lambda device: 8)
    query, key, value, mask = random_case(2, 2, 7, 300, 64, torch.float16, per_row_mask=True)
    ours = split_kv.split_kv_attention(query, key, value, mask, 0.125, launch=launch)
    torch.testing.assert_close(ours.double(), literal_attention(query, key, value, mask, 0.125), rtol=2e-3,
                               atol=2e-3)


@interpreted
def test_interpreted_a_chunk_with_every_slot_masked_adds_nothing():
    """The padded sample's second half is masked: with four chunks, two of them see no slot it may attend."""
    query, key, value, mask = random_case(2, 2, 7, 256, 64, torch.float16)
    value[0, :, 128:] = 1e3  # would show in the output if a masked chunk leaked into the merge
    ours = split_kv.split_kv_attention(query, key, value, mask, 0.125, splits=4)
    torch.testing.assert_close(ours.double(), literal_attention(query, key, value, mask, 0.125), rtol=2e-3,
                               atol=2e-3)
    assert ours[0].abs().max() < 10


def test_chunks_fill_the_multiprocessors_about_twice_unless_the_rows_alone_fill_them():
    launch = split_kv.AttentionLaunch()
    assert launch.chunks(rows=32, multiprocessors=132) == 9  # Qwen2-7B at batch 8: 288 programs
    assert launch.chunks(rows=131, multiprocessors=132) == 3
    assert launch.chunks(rows=132, multiprocessors=132) == 1
    assert launch.chunks(rows=256, multiprocessors=132) == 1  # InternLM2.5-7B at batch 32
    assert split_kv.AttentionLaunch(programs_per_multiprocessor=4).chunks(rows=32, multiprocessors=132) == 17


def test_decoding_on_the_cpu_goes_to_sdpa():
    query, key, value, mask = random_case(1, 2, 7, 40, 64, torch.float16)
    assert not split_kv.takes(query, key, value, mask)


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels need CUDA")


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(8, 4, 7, 2536, 128), (8, 4, 7, 369, 128), (32, 8, 4, 330, 128),
                                   (1, 4, 7, 7601, 128), (3, 2, 5, 77, 64)])
def test_on_cuda_split_kv_attention_equals_the_literal_softmax(dtype, shape):
    assert split_kv.split_kv_works(torch.device("cuda"), dtype)
    query, key, value, mask = random_case(*shape, dtype, device="cuda", per_row_mask=True)
    ours = split_kv.split_kv_attention(query, key, value, mask, shape[-1] ** -0.5)
    torch.testing.assert_close(ours.double(), literal_attention(query, key, value, mask, shape[-1] ** -0.5),
                               rtol=2e-2, atol=2e-2)


@cuda_only
def test_on_cuda_only_masked_bf16_or_fp16_decoding_is_taken():
    query, key, value, mask = random_case(1, 2, 7, 40, 64, torch.bfloat16, device="cuda")
    assert split_kv.takes(query, key, value, mask)
    assert not split_kv.takes(query.float(), key.float(), value.float(), mask.float())  # fp32: SDPA
    assert not split_kv.takes(query, key, value, mask == 0)  # a boolean mask
    assert not split_kv.takes(query, key, value, None)
    with activated(DecodingOptions(split_kv=False)):
        assert not split_kv.takes(query, key, value, mask)


@cuda_only
def test_on_cuda_the_grouped_attention_takes_it_and_a_graph_replays_it(monkeypatch):
    query, key, value, mask = random_case(8, 4, 7, 369, 128, torch.bfloat16, device="cuda")
    heads_query = query.reshape(8, 28, 1, 128)  # [b, heads, 1, d]: each KV head's 7 query heads in a row
    calls = []
    original = split_kv.split_kv_attention
    monkeypatch.setattr(split_kv, "split_kv_attention", lambda *args, **kwargs: calls.append(1) or original(
        *args, **kwargs))
    expected, _ = grouped_sdpa_attention_forward(None, heads_query, key, value, mask, scaling=128 ** -0.5)
    assert calls == [1]
    reference = literal_attention(query, key, value, mask, 128 ** -0.5).reshape(8, 28, 1, 128).transpose(1, 2)
    torch.testing.assert_close(expected.double(), reference, rtol=2e-2, atol=2e-2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        split_kv.split_kv_attention(query, key, value, mask, 128 ** -0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = split_kv.split_kv_attention(query, key, value, mask, 128 ** -0.5)
    key.normal_()  # new keys: the replay reads them
    graph.replay()
    torch.testing.assert_close(captured.double(), literal_attention(query, key, value, mask, 128 ** -0.5),
                               rtol=2e-2, atol=2e-2)


@cuda_only
def test_on_cuda_graphed_decoding_with_split_kv_attention_decodes_like_sdpa(tiny_dirs, processors, monkeypatch):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS).to("cuda")
    model = vlmcompress.load(tiny_dirs[arch], kv="snapkv", kv_budget=0.3, window_size=4, dtype=torch.float16,
                             cuda_graphs=True, device_map="cuda")
    # called at the eager first step and in the capture
    assert_path_decodes_like_without(model, inputs, monkeypatch, split_kv, "split_kv_attention",
                                     DecodingOptions(split_kv=False))
