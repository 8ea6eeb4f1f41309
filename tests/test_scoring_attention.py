"""`attention_chunks`, the scoring attention every eviction and pruning method reads, equals a literal
softmax(q k^T * scaling) with causal, key-padding and left-out-query masks, whatever the key count (the
keys are padded to an aligned length inside) and however the queries are chunked; scoring a prompt with
compiled statistics (as on CUDA) keeps the same tokens."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import image_inputs

import vlmcompress
from vlmcompress import compilation
from vlmcompress.scoring import attention_chunks

BATCH, KV_HEADS, GROUPS, DIM, Q_LEN = 2, 2, 3, 8, 5
SCALING = DIM ** -0.5


def literal_attention(queries, keys, key_valid, query_valid):
    """`[b, kv_heads, groups, q, n]` probabilities, one query head at a time; a row that sees no key is 0."""
    b, heads, q_len, _ = queries.shape
    n = keys.shape[2]
    out = torch.zeros(b, KV_HEADS, GROUPS, q_len, n, dtype=torch.float64)
    for sample in range(b):
        for head in range(heads):
            kv_head = head // GROUPS
            for row in range(q_len):
                position = n - q_len + row
                seen = [j for j in range(position + 1)
                        if key_valid[sample, j] and query_valid[sample, row]]
                if not seen:
                    continue
                logits = torch.stack([queries[sample, head, row].double() @ keys[sample, kv_head, j].double()
                                      for j in seen]) * SCALING
                out[sample, kv_head, head % GROUPS, row, seen] = torch.softmax(logits, dim=0)
    return out


@pytest.mark.parametrize("n", [13, 16, 21])
@pytest.mark.parametrize("max_elements", [1, 1 << 26])
def test_chunks_equal_the_literal_softmax(n, max_elements):
    generator = torch.Generator().manual_seed(n)
    queries = torch.randn(BATCH, KV_HEADS * GROUPS, Q_LEN, DIM, generator=generator)
    keys = torch.randn(BATCH, KV_HEADS, n, DIM, generator=generator)
    key_valid = torch.ones(BATCH, n, dtype=torch.bool)
    key_valid[1, :4] = False  # left padding of the second sample
    query_valid = torch.ones(BATCH, Q_LEN, dtype=torch.bool)
    query_valid[0, 1] = False

    chunks = list(attention_chunks(queries, keys, SCALING, key_valid, max_elements, query_valid))
    probs = torch.cat([chunk for _, chunk in chunks], dim=3)

    assert [rows.start for rows, _ in chunks] == list(range(0, Q_LEN, Q_LEN if max_elements > 1 else 1))
    assert probs.shape == (BATCH, KV_HEADS, GROUPS, Q_LEN, n)
    torch.testing.assert_close(probs.double(), literal_attention(queries, keys, key_valid, query_valid),
                               rtol=1e-5, atol=1e-6)


def compile_on_the_cpu(monkeypatch) -> list[str]:
    """Compile the scoring statistics on the CPU as on CUDA, with aot_eager (no C compiler needed) in place of
    inductor; returns the names of the functions compiled from now on."""
    monkeypatch.setattr(compilation, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(compilation, "compile_by_default", lambda device: True)
    names = []
    compiled = compilation.compiled
    monkeypatch.setattr(compilation, "compiled", lambda function, backend: names.append(function.__name__) or
                        compiled(function, backend))
    return names


@pytest.mark.parametrize("method, compiled_function", [("snapkv", "received_from_logits"),
                                                       ("vlcache", "post_vision_statistics"),
                                                       ("h2o", "received_from_logits")])
def test_compiled_prompt_scoring_keeps_the_same_tokens(tiny_dirs, processors, monkeypatch, method,
                                                       compiled_function):
    inputs = image_inputs(processors["qwen2_vl"], ("What is in the picture? Describe it in detail.", "Colour?"))
    options = {"window_size": 4} if method != "h2o" else {}
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], kv=method, kv_budget=0.3, dtype=torch.float32, **options)

    def kept_keys():
        cache = model.make_cache()
        model.generate(**inputs, past_key_values=cache, do_sample=False, max_new_tokens=1)
        return [layer.keys for layer in cache.layers]

    eager = kept_keys()
    compiled_names = compile_on_the_cpu(monkeypatch)
    compiled = kept_keys()
    assert compiled_function in compiled_names
    for layer_eager, layer_compiled in zip(eager, compiled):
        torch.testing.assert_close(layer_compiled, layer_eager, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor compiles by default on CUDA")
def test_on_cuda_the_compiled_statistics_equal_eager_ones():
    from vlmcompress.scoring import received_from_logits
    from vlmcompress.cache.vlcache import post_vision_statistics

    generator = torch.Generator(device="cuda").manual_seed(0)
    queries = torch.randn(2, 8, 6, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    keys = torch.randn(2, 2, 301, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    for function in (received_from_logits, functools.partial(post_vision_statistics, threshold=0.01)):
        plain = function.func if isinstance(function, functools.partial) else function
        compiled = compilation.compiled_where_it_works(plain, keys.device, keys.dtype)
        assert compiled is not plain
        if isinstance(function, functools.partial):
            compiled = functools.partial(compiled, **function.keywords)
        for (_, ours), (_, eager) in zip(attention_chunks(queries, keys, 0.125, statistics=compiled),
                                         attention_chunks(queries, keys, 0.125, statistics=function)):
            torch.testing.assert_close(ours, eager, rtol=1e-4, atol=1e-6)
