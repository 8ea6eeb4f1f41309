"""`attention_chunks`, the scoring attention every eviction and pruning method reads, equals a literal
softmax(q k^T * scaling) with causal, key-padding and left-out-query masks, whatever the key count (the
keys are padded to an aligned length inside) and however the queries are chunked."""

from __future__ import annotations

import pytest
import torch

from vlmcompress.cache.attention import attention_chunks

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
