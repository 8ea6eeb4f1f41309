"""`vlmcompress_sdpa` (vlmcompress.decoding.grouped_sdpa) is transformers' SDPA without the `repeat_kv` copy of the keys
and values for masked grouped-query attention, and the decode masks a compressed cache builds for it (per KV
head) and for transformers' SDPA (per query head) give the same attention."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations import sdpa_attention
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from vlmcompress.cache import SnapKVCache
from vlmcompress.cache.layer import CompressedLayer
from vlmcompress.decoding.grouped_sdpa import GROUPED_SDPA, grouped_sdpa_attention_forward

BATCH, HEADS, KV_HEADS, DIM, HELD = 3, 8, 2, 16, 20
GROUPS = HEADS // KV_HEADS


def module(implementation="sdpa"):
    """What the attention functions read off an attention module."""
    return SimpleNamespace(num_key_value_groups=GROUPS, is_causal=True,
                           config=SimpleNamespace(_attn_implementation=implementation))


def qkv(q_len: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # queries as the models make them: [b, q, heads, d] transposed, so not contiguous
    query = torch.randn(BATCH, q_len, HEADS, DIM, generator=generator).transpose(1, 2)
    key = torch.randn(BATCH, KV_HEADS, HELD + q_len, DIM, generator=generator)
    value = torch.randn(BATCH, KV_HEADS, HELD + q_len, DIM, generator=generator)
    return query, key, value


def ragged_slots(seed: int = 0) -> torch.Tensor:
    """`[b, kv_heads, held]` slot validity that differs between samples and KV heads (never a whole row)."""
    valid = torch.rand(BATCH, KV_HEADS, HELD, generator=torch.Generator().manual_seed(seed)) > 0.4
    valid[..., -1] = True
    return valid


@pytest.fixture
def repeat_kv_calls(monkeypatch):
    """The `n_rep` of every `repeat_kv` call transformers' SDPA makes."""
    calls = []
    original = sdpa_attention.repeat_kv

    def spy(hidden_states, n_rep):
        calls.append(n_rep)
        return original(hidden_states, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", spy)
    return calls


def test_registered_with_transformers():
    assert AttentionInterface()[GROUPED_SDPA] is grouped_sdpa_attention_forward
    assert AttentionMaskInterface()[GROUPED_SDPA] is sdpa_mask


@pytest.mark.parametrize("q_len", [1, 3])
def test_per_kv_head_mask_equals_sdpa_without_repeat_kv(q_len, repeat_kv_calls):
    query, key, value = qkv(q_len)
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    allowed = torch.cat([ragged_slots()[:, :, None].expand(-1, -1, q_len, -1),
                         causal.expand(BATCH, KV_HEADS, -1, -1)], dim=-1)  # [b, kv_heads, q, held + q]
    per_head = allowed.repeat_interleave(GROUPS, dim=1)
    expected, _ = sdpa_attention_forward(module(), query, key, value, per_head, scaling=0.3)
    repeat_kv_calls.clear()
    for mask in [allowed, per_head] if q_len == 1 else [allowed]:  # one query: a per-head mask views as well
        out, _ = grouped_sdpa_attention_forward(module(), query, key, value, mask, scaling=0.3)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert repeat_kv_calls == []
    assert out.shape == (BATCH, q_len, HEADS, DIM) and out.is_contiguous()


def test_one_query_with_a_shared_mask_and_everything_else_is_transformers_sdpa(repeat_kv_calls):
    query, key, value = qkv(1)
    shared = torch.cat([ragged_slots()[:, :1], torch.ones(BATCH, 1, 1, dtype=torch.bool)], dim=-1)[:, :, None]
    additive = torch.zeros(shared.shape).masked_fill(~shared, torch.finfo(torch.float32).min)
    expected, _ = sdpa_attention_forward(module(), query, key, value, additive)
    repeat_kv_calls.clear()
    out, _ = grouped_sdpa_attention_forward(module(), query, key, value, additive)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert repeat_kv_calls == []
    # A prompt (several queries, a mask shared by all heads) and no mask at all: transformers' SDPA as is.
    query, key, value = qkv(4)
    prompt_mask = torch.ones(BATCH, 1, 4, HELD + 4, dtype=torch.bool).tril(diagonal=HELD)
    for mask, copies in ((prompt_mask, [GROUPS, GROUPS]), (None, [])):
        repeat_kv_calls.clear()
        expected, _ = sdpa_attention_forward(module(), query, key, value, mask)
        out, _ = grouped_sdpa_attention_forward(module(), query, key, value, mask)
        assert torch.equal(out, expected) and repeat_kv_calls == copies * 2


@pytest.mark.parametrize("q_len", [1, 3])
def test_decode_masks_of_both_implementations_give_the_same_attention(q_len):
    """`CompressedCache.decode_attention_mask` per KV head (vlmcompress_sdpa) and per query head (sdpa)."""
    cache, layer = SnapKVCache(budget=0.5), CompressedLayer()
    layer.keys, layer.slot_valid = torch.zeros(BATCH, KV_HEADS, HELD, DIM), ragged_slots(1)
    query, key, value = qkv(q_len, seed=1)
    outputs = []
    for implementation, attention in (("sdpa", sdpa_attention_forward),
                                      (GROUPED_SDPA, grouped_sdpa_attention_forward)):
        mask = cache.decode_attention_mask(module(implementation), layer, q_len, torch.float32)
        assert mask.shape == (BATCH, HEADS if implementation == "sdpa" else KV_HEADS, q_len, HELD + q_len)
        outputs.append(attention(module(implementation), query, key, value, mask, scaling=0.25)[0])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-6, atol=1e-6)


def test_padded_layer_decodes_from_views_of_one_buffer():
    """Decoding is launch-bound, so a padded layer's validity and its vlmcompress_sdpa mask are views of
    buffers with room ahead: one allocation for many steps, each step's mask the literal one."""
    from vlmcompress.cache.layer import ROOM

    cache, layer = SnapKVCache(budget=0.5), CompressedLayer()
    valid = ragged_slots(2)
    layer.keys, layer.values = torch.zeros(BATCH, KV_HEADS, HELD, DIM), torch.zeros(BATCH, KV_HEADS, HELD, DIM)
    layer.slot_valid, layer.compressed, layer.is_initialized = valid.clone(), True, True
    buffers = set()
    for step in range(5):
        mask = cache.decode_attention_mask(module(GROUPED_SDPA), layer, 1, torch.float32)
        expected = torch.cat([valid, torch.ones(BATCH, KV_HEADS, step + 1, dtype=torch.bool)], dim=-1)[:, :, None]
        assert mask.shape == (BATCH, KV_HEADS, 1, HELD + step + 1)
        assert torch.equal(mask == 0, expected) and bool((mask[~expected] == torch.finfo(torch.float32).min).all())
        layer.update(torch.randn(BATCH, KV_HEADS, 1, DIM), torch.randn(BATCH, KV_HEADS, 1, DIM))
        assert torch.equal(layer.slot_valid, expected[:, :, 0]) and layer.keys.shape[-2] == HELD + step + 1
        buffers.add((layer.slot_valid.data_ptr(), mask.data_ptr()))
    assert len(buffers) == 1 and layer._validity_room.shape[-1] == HELD + 1 + ROOM
    # eviction replacing the validity (a decode-time method) gets a fresh buffer with its own content
    layer.slot_valid = layer.slot_valid & (torch.arange(HELD + 5) != 0)
    mask = cache.decode_attention_mask(module(GROUPED_SDPA), layer, 1, torch.float32)
    assert bool((mask[..., 0] < 0).all()) and mask.data_ptr() not in {m for _, m in buffers}
