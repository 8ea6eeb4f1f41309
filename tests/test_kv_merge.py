"""KV merging (`merge=`, `vlmcompress.cache.merge`) on every architecture: the merged keys and values equal a slow,
literal implementation of each strategy's formula (this replaces "eviction equals masking" for merging methods),
and DESIGN.md's other invariants hold with merging on: identity at full budget, batch equals single, the budget is
the budget. Also the errors of bad `merge=` values."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BATCHES, batch_inputs, image_inputs, upstream_model

import vlmcompress
from vlmcompress.cache import KV_METHODS
from vlmcompress.testing import ARCHITECTURES

F64 = torch.float64
OPTIONS = {"snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "vlcache": {"window_size": 4}}


def load(path, method, budget, **kwargs):
    return vlmcompress.load(path, kv=method, kv_budget=budget, dtype=F64, **OPTIONS.get(method, {}), **kwargs)


def prefill(model, inputs):
    """The cache after the prompt: one `generate` step (which gives a left-padded row its real positions)."""
    cache = model.make_cache()
    model.generate(**inputs, max_new_tokens=1, do_sample=False, past_key_values=cache)
    return cache


def prompt_keys_and_values(path, inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's rotated prompt keys and its values `[b, kv_heads, n, d]` in the uncompressed model."""
    with torch.no_grad():
        cache = upstream_model(path, dtype=F64)(**inputs, use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))


def literal_merge(strategy: str, keys: torch.Tensor, values: torch.Tensor, kept: list[int]):
    """One (sample, KV head): each evicted token joins the kept token of most cosine-similar key (the first on a
    tie), and each kept x_p (key and value) becomes (x_p + Σ c_e) / (1 + #joined), c_e = x_e (average),
    (x_e + x_p) / 2 (pivotal), cos(k_e, k_p)·x_e (weighted)."""
    joined = {p: [] for p in kept}
    for e in range(keys.shape[0]):
        if e in joined:
            continue
        best, best_similarity = None, -math.inf
        for p in kept:
            similarity = cosine(keys[e], keys[p])
            if similarity > best_similarity:
                best, best_similarity = p, similarity
        joined[best].append((e, best_similarity))
    merged = []
    for x in (keys, values):
        rows = []
        for p in kept:
            total = x[p].clone()
            for e, similarity in joined[p]:
                total += {"average": x[e], "pivotal": (x[e] + x[p]) / 2, "weighted": similarity * x[e]}[strategy]
            rows.append(total / (1 + len(joined[p])))
        merged.append(torch.stack(rows))
    return merged


CASES = [("snapkv", "average"), ("snapkv", "pivotal"), ("snapkv", "weighted"), ("pyramidkv", "weighted"),
         ("h2o", "pivotal"), ("lookm", None)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method,strategy", CASES)
def test_merged_keys_and_values_follow_the_formula(tiny_dirs, processors, arch, method, strategy):
    inputs = image_inputs(processors[arch])
    options = {"merge": strategy} if strategy else {}  # LOOK-M merges by default: pivotal
    cache = prefill(load(tiny_dirs[arch], method, 0.3, **options), inputs)
    strategy = strategy or "pivotal"
    for layer, (keys, values) in zip(cache.layers, prompt_keys_and_values(tiny_dirs[arch], inputs)):
        for head in range(keys.shape[1]):
            kept = layer.kept_indices[0, head].tolist()
            expected_keys, expected_values = literal_merge(strategy, keys[0, head], values[0, head], kept)
            torch.testing.assert_close(layer.keys[0, head], expected_keys, rtol=0, atol=1e-10)
            torch.testing.assert_close(layer.values[0, head], expected_values, rtol=0, atol=1e-10)
            # not vacuous: the evicted tokens changed the kept entries
            assert not torch.allclose(layer.values[0, head], values[0, head, kept], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_identity_at_full_budget(tiny_dirs, processors, arch):
    """Nothing evicted, nothing merged: the upstream model's tokens."""
    inputs = image_inputs(processors[arch])
    expected = upstream_model(tiny_dirs[arch]).generate(**inputs, max_new_tokens=8, do_sample=False)
    for method, budget in (("snapkv", 1.0), ("h2o", inputs["input_ids"].shape[1] + 8)):
        model = vlmcompress.load(tiny_dirs[arch], kv=method, kv_budget=budget, merge="weighted",
                                 **OPTIONS.get(method, {}))
        assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), expected)


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("method,strategy", [("vlcache", "weighted"), ("h2o", "average"), ("lookm", "pivotal")])
@pytest.mark.parametrize("budget", [0.3, 16])
def test_batch_equals_single(tiny_dirs, processors, arch, method, strategy, budget):
    """A left-padded batch (VL-Cache: per-sample layer budgets, so some kept slots are beyond a sample's budget)
    merges each sample's entries as its single prompt does: padding is neither merged nor merged into."""
    samples = BATCHES["image and shorter text-only"]
    model = load(tiny_dirs[arch], method, budget, merge=strategy)
    batch = batch_inputs(processors[arch], samples)
    pads = (batch["attention_mask"] == 0).sum(-1)
    batch_cache = prefill(model, batch)
    batch_tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
    for i, sample in enumerate(samples):
        single = batch_inputs(processors[arch], [sample])
        single_cache = prefill(model, single)
        for batch_layer, single_layer in zip(batch_cache.layers, single_cache.layers):
            valid = batch_layer.slot_valid
            for head in range(single_layer.keys.shape[1]):
                live = valid[i, head] if valid is not None else slice(None)
                assert torch.equal(batch_layer.kept_indices[i, head][live] - pads[i],
                                   single_layer.kept_indices[0, head])
                for name in ("keys", "values"):
                    torch.testing.assert_close(getattr(batch_layer, name)[i, head][live],
                                               getattr(single_layer, name)[0, head], rtol=0, atol=1e-10)
        single_tokens = model.generate(**single, max_new_tokens=4, do_sample=False)
        assert torch.equal(batch_tokens[i, -4:], single_tokens[0, -4:])


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "lookm"])
def test_the_budget_is_the_budget(tiny_dirs, processors, method):
    """Merging keeps the counts and bytes of the same method without it, in tensors of exactly that size."""
    arch = "llava_onevision"
    inputs = image_inputs(processors[arch])
    merged = prefill(load(tiny_dirs[arch], method, 0.25, merge="average"), inputs)
    evicted = prefill(load(tiny_dirs[arch], method, 0.25, merge=None), inputs)
    assert [layer.kept_indices.shape[-1] for layer in merged.layers] == [
        layer.kept_indices.shape[-1] for layer in evicted.layers]
    assert all(torch.equal(a.kept_indices, b.kept_indices) for a, b in zip(merged.layers, evicted.layers))
    assert merged.nbytes() == evicted.nbytes() == merged.prefill_nbytes
    for layer in merged.layers:
        assert layer.keys.shape[-2] == layer.kept_indices.shape[-1]
        for tensor in (layer.keys, layer.values):
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_bad_merge_options(tiny_dirs):
    path = tiny_dirs["qwen2_vl"]
    with pytest.raises(ValueError, match=r"unknown KV-merge method 'pivo'; choose one of \['average', 'pivotal', "
                                         r"'weighted'\]"):
        vlmcompress.load(path, kv="snapkv", merge="pivo")
    with pytest.raises(ValueError, match=r"merge must be a strategy's name, one of \['average', 'pivotal'"):
        vlmcompress.load(path, kv="lookm", merge=1)
    # no KV method to take it: refused, naming the options of the methods chosen
    with pytest.raises(ValueError, match=r"unknown option merge='pivotal' .*valid options: \["):
        vlmcompress.load(path, prune="visionzip", merge="pivotal")
    assert KV_METHODS["snapkv"](0.1, merge="pivot").merge == KV_METHODS["lookm"](0.1).merge  # EffiVLM's spelling
    assert KV_METHODS["lookm"](0.1, merge="none").merge is None
