"""A KV method written in one small class, here, runs through `load()` and keeps every invariant of the design:
identity at full budget, eviction equals masking, batch equals single, the budget is the budget, and its
`kept_indices` equal a literal reference; composed with the pyramid allocation, its budgets fall over the layers.
No other file knows it (docs/design.md, "Add a KV method")."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import image_inputs, upstream_model
from test_kv_cache import F64, expected_kept, generate_with_raw_logits, greedy, masked_reference_logits

import vlmcompress
from vlmcompress.cache import KV_METHODS, CompressedCache, Policy, Pyramid, register_policy


@dataclass(frozen=True)
class KeyNorm(Policy):
    """Keep the prompt keys of largest p-norm: score_j = ||k_j||_p, per KV head."""

    order: float = 2.0  # p of the p-norm

    def __post_init__(self):
        if isinstance(self.order, bool) or not isinstance(self.order, (int, float)) or self.order <= 0:
            raise ValueError(f"order must be a number > 0, got {self.order!r}")

    def score(self, ctx):
        return torch.linalg.vector_norm(ctx.keys.double(), ord=self.order, dim=-1)


@pytest.fixture
def keynorm():
    register_policy(KeyNorm, "keynorm")
    yield "keynorm"
    del KV_METHODS["keynorm"]


def prompt_keys(path, inputs) -> list[torch.Tensor]:
    """Each layer's rotated prompt keys `[b, kv_heads, n, d]` in the uncompressed model."""
    model = upstream_model(path, dtype=F64)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    return [layer.keys for layer in cache.layers]


def literal_kept(keys: torch.Tensor, count: int, order: float) -> torch.Tensor:
    """The `count` positions of largest ||k||_p in each row, ascending, by a loop over rows and positions."""
    rows = []
    for sample in keys:
        heads = []
        for head in sample:
            norms = [float(sum(abs(x) ** order for x in key.tolist()) ** (1 / order)) for key in head]
            best = sorted(range(len(norms)), key=lambda j: (-norms[j], j))[:count]
            heads.append(sorted(best))
        rows.append(heads)
    return torch.tensor(rows)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_kept_indices_equal_the_literal_rule(tiny_dirs, processors, keynorm, arch):
    inputs = image_inputs(processors[arch])
    model = vlmcompress.load(tiny_dirs[arch], kv=keynorm, kv_budget=0.3, order=1.0, dtype=F64)
    cache = model.make_cache()
    assert isinstance(cache.policy, KeyNorm) and cache.policy.order == 1.0
    greedy(model, inputs, new_tokens=2, past_key_values=cache)
    count = expected_kept(0.3, inputs["input_ids"].shape[1])
    for layer, keys in zip(cache.layers, prompt_keys(tiny_dirs[arch], inputs)):
        assert torch.equal(layer.kept_indices, literal_kept(keys, count, 1.0))
    assert model.compression_stats["compression"]["kv"] == {"method": "keynorm", "budget": 0.3, "order": 1.0}


def test_identity_at_full_budget(tiny_dirs, processors, keynorm):
    inputs = image_inputs(processors["qwen2_vl"])
    expected = greedy(upstream_model(tiny_dirs["qwen2_vl"]), inputs, new_tokens=8)
    assert torch.equal(greedy(vlmcompress.load(tiny_dirs["qwen2_vl"], kv=keynorm, kv_budget=1.0), inputs,
                              new_tokens=8), expected)


def test_eviction_equals_masking(tiny_dirs, processors, keynorm):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch])
    model = vlmcompress.load(tiny_dirs[arch], kv=keynorm, kv_budget=0.25, dtype=F64)
    cache = model.make_cache()
    sequences, logits = generate_with_raw_logits(model, inputs, past_key_values=cache)
    reference_sequences, reference_logits = masked_reference_logits(
        tiny_dirs[arch], inputs, [layer.kept_indices for layer in cache.layers])
    assert torch.equal(sequences, reference_sequences)
    for ours, reference in zip(logits, reference_logits):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-9)
    _, full_logits = generate_with_raw_logits(upstream_model(tiny_dirs[arch], dtype=F64), inputs)
    assert (logits[1] - full_logits[1]).abs().max() > 1e-6  # evicting changed the computation


def test_batch_equals_single(tiny_dirs, processors, keynorm):
    arch = "qwen2_vl"
    questions = ("What is in the picture? Describe it in detail please.", "Colour?")
    batch_inputs = image_inputs(processors[arch], questions, seeds=[3, 4])
    model = vlmcompress.load(tiny_dirs[arch], kv=keynorm, kv_budget=0.3, dtype=F64)
    batch_cache = model.make_cache()
    batch_out = greedy(model, batch_inputs, past_key_values=batch_cache)
    pads = (batch_inputs["attention_mask"] == 0).sum(-1)
    assert int(pads.max()) > 0
    for i, question in enumerate(questions):
        single_cache = model.make_cache()
        single_out = greedy(model, image_inputs(processors[arch], (question,), seeds=[3 + i]),
                            past_key_values=single_cache)
        assert torch.equal(batch_out[i, -6:], single_out[0, -6:])
        for batch_layer, single_layer in zip(batch_cache.layers, single_cache.layers):
            valid = batch_layer.slot_valid[i] if batch_layer.slot_valid is not None else None
            for head in range(single_layer.kept_indices.shape[1]):
                batch_kept = batch_layer.kept_indices[i, head]
                if valid is not None:  # the shorter prompt keeps fewer: the rest of its row is padding
                    batch_kept = batch_kept[valid[head, : batch_kept.shape[0]]]
                assert torch.equal(batch_kept - pads[i], single_layer.kept_indices[0, head])


@pytest.mark.parametrize("budget", [0.2, 24])
def test_the_budget_is_the_budget(tiny_dirs, processors, keynorm, budget):
    arch = "llava_onevision"
    inputs = image_inputs(processors[arch])
    model = vlmcompress.load(tiny_dirs[arch], kv=keynorm, kv_budget=budget)
    cache = model.make_cache()
    model(**inputs, past_key_values=cache)  # prefill only
    count = expected_kept(budget, inputs["input_ids"].shape[1])
    assert [layer.kept_indices.shape[-1] for layer in cache.layers] == [count] * len(cache.layers)
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert cache.nbytes() == len(cache.layers) * 2 * text.num_key_value_heads * count * head_dim * 4


def test_its_options_are_checked_by_load(tiny_dirs, keynorm):
    with pytest.raises(ValueError, match="order must be a number > 0"):
        vlmcompress.load(tiny_dirs["qwen2_vl"], kv=keynorm, order=0)
    with pytest.raises(ValueError, match=r"unknown option ord=2 .*valid options: "
                                         r"\['head_adaptive', 'head_adaptive_floor', 'merge', 'order'\]"):
        vlmcompress.load(tiny_dirs["qwen2_vl"], kv=keynorm, ord=2)


def test_an_allocation_wraps_it(tiny_dirs, processors):
    """The pyramid allocation over this policy: per-layer budgets fall over the layers, mean exactly the budget,
    each layer keeping its top key norms."""
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch])
    model = vlmcompress.load(tiny_dirs[arch], dtype=F64)
    cache = CompressedCache(0.3, policy=KeyNorm(), allocation=Pyramid(beta=4)).attach(model)
    model(**inputs, past_key_values=cache)  # prefill only
    counts = [layer.kept_indices.shape[-1] for layer in cache.layers]
    mean = expected_kept(0.3, inputs["input_ids"].shape[1])
    assert sum(counts) == mean * len(counts) and counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    for layer, keys, count in zip(cache.layers, prompt_keys(tiny_dirs[arch], inputs), counts):
        assert torch.equal(layer.kept_indices, literal_kept(keys, count, 2.0))
