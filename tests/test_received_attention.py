"""The attention each key receives from every prompt query, from on-chip tiles (`vlmcompress/received_attention.py`):
equal to the literal formula Σ_i softmax(q_i·K/√d)_j (causal, padding masked, averaged over a KV head's query
heads) in float64, on the CPU through triton's interpreter (fp32 and fp16 products; its bf16 products are wrong,
so bf16 is checked on CUDA), and on a GPU equal to the chunked scores H2O used before, with H2O keeping the same
tokens either way."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import in_a_child_process, interpreted

from vlmcompress import received_attention as fused
from vlmcompress.scoring import accumulated_attention

pytest.importorskip("triton")


def literal_received(queries, keys, scaling, key_valid=None):
    """Loop over query heads: softmax of each row over the keys it sees (its position and before, not padding),
    summed over rows, averaged over the query heads of each KV head; a row seeing no key adds nothing."""
    b, heads, q_len, _ = queries.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    out = torch.zeros(b, kv_heads, n, dtype=torch.float64)
    for sample in range(b):
        for head in range(heads):
            scores = queries[sample, head].double() @ keys[sample, head // groups].double().T * scaling
            for row in range(q_len):
                seen = torch.arange(n) <= n - q_len + row
                if key_valid is not None:
                    seen &= key_valid[sample].cpu()
                if seen.any():
                    probs = torch.softmax(scores[row].masked_fill(~seen, float("-inf")), dim=-1)
                    out[sample, head // groups] += probs / groups
    return out


def case(b, heads, kv_heads, q_len, n, dim, dtype, padding=False, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(b, heads, q_len, dim, generator=generator).to(device, dtype)
    keys = torch.randn(b, kv_heads, n, dim, generator=generator).to(device, dtype)
    key_valid = None
    if padding:
        key_valid = torch.ones(b, n, dtype=torch.bool, device=device)
        key_valid[0, : n // 3] = False  # a left-padded sample
    return queries, keys, key_valid


test_triton_kernels_in_a_child_process = in_a_child_process(__file__)


@interpreted
@pytest.mark.parametrize("shape", [
    (1, 7, 1, 150, 150, 32),   # every query (H2O), 7 query heads per KV head, n not a multiple of the blocks
    (2, 4, 2, 70, 70, 16),     # a batch, one key block and a few rows more
    (2, 4, 2, 40, 200, 32),    # the last 40 queries only (a window)
    (1, 2, 2, 64, 64, 64),     # exactly one block each way
])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("padding", [False, True])
def test_interpreted_received_attention_equals_the_literal_formula(shape, dtype, tolerance, padding):
    queries, keys, key_valid = case(*shape, dtype=dtype, padding=padding)
    got = fused.received_attention(queries, keys, 0.2, key_valid)
    expected = literal_received(queries, keys, 0.2, key_valid)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
    if key_valid is not None:
        assert (got[0, :, : shape[4] // 3] == 0).all()  # padding receives nothing


def test_the_cpu_takes_the_chunked_scores():
    queries, keys, _ = case(1, 4, 2, 30, 30, 16, torch.float16)
    assert not fused.takes(queries, keys, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels serve CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_received_attention_equals_the_chunked_scores(dtype):
    queries, keys, key_valid = case(2, 28, 4, 2408, 2408, 128, dtype, padding=True, device="cuda")
    assert fused.takes(queries, keys, key_valid)
    got = fused.received_attention(queries, keys, 128 ** -0.5, key_valid)
    torch.testing.assert_close(got, accumulated_attention(queries, keys, 128 ** -0.5, key_valid), rtol=2e-2,
                               atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernels serve CUDA only")
def test_on_cuda_h2o_keeps_the_same_tokens_either_way(tiny_dirs, processors):
    from conftest import image_inputs

    import vlmcompress

    inputs = image_inputs(processors["qwen2_vl"], ("What is in the picture? Describe it in detail.", "Colour?"))
    kept = {}
    for fused_scoring in (True, False):
        model = vlmcompress.load(tiny_dirs["qwen2_vl"], kv="h2o", kv_budget=0.3, dtype=torch.float16,
                                 device_map="cuda", decoding=vlmcompress.DecodingOptions(fused_scoring=fused_scoring))
        cache = model.make_cache()
        model.generate(**inputs.to("cuda"), past_key_values=cache, max_new_tokens=1)
        kept[fused_scoring] = [layer.kept_indices for layer in cache.layers]
    assert all(torch.equal(a, b) for a, b in zip(kept[True], kept[False]))
