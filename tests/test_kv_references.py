"""Literal references: each method's kept indices equal a slow, separate implementation of its
paper's formula, computed from the attention maps the upstream model's eager attention returns
(`output_attentions=True`), with plain Python loops."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import image_inputs, upstream_model

import vlmcompress

F64 = torch.float64
ARCHS = ["llava_onevision", "qwen2_vl"]


def attention_maps(path, inputs):
    model = upstream_model(path, attn_implementation="eager", dtype=F64)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    config = model.config.text_config
    return [a[0] for a in out.attentions], config.num_attention_heads // config.num_key_value_heads


def compressed_prefill(path, inputs, method, budget, **options):
    model = vlmcompress.load(path, kv=method, kv_budget=budget, dtype=F64, **options)
    cache = model.make_cache()
    with torch.no_grad():
        model(**inputs, past_key_values=cache)
    return [layer.kept_indices[0] for layer in cache.layers]  # [kv_heads, kept] per layer


def mean_over_group(per_query_head: list[list[float]], kv_head: int, groups: int) -> list[float]:
    rows = per_query_head[kv_head * groups : (kv_head + 1) * groups]
    return [sum(values) / groups for values in zip(*rows)]


def top(scores: dict[int, float], count: int) -> set[int]:
    return set(sorted(scores, key=lambda j: -scores[j])[:count])


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def assert_kept(kept_per_layer, expected_per_layer):
    for layer, (kept, expected) in enumerate(zip(kept_per_layer, expected_per_layer)):
        for head, positions in enumerate(kept):
            assert set(positions.tolist()) == expected[head], f"layer {layer} head {head}"


@pytest.mark.parametrize("arch", ARCHS)
def test_streamingllm_keeps_sinks_and_the_recent_window(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    kept = compressed_prefill(tiny_dirs[arch], inputs, "streamingllm", 0.25, sink_tokens=4)
    budget = round_half_up(0.25 * n)
    expected = set(range(4)) | set(range(n - (budget - 4), n))
    assert_kept(kept, [[expected] * k.shape[0] for k in kept])


@pytest.mark.parametrize("arch", ARCHS)
def test_h2o_keeps_heavy_hitters_and_recent_tokens(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    maps, groups = attention_maps(tiny_dirs[arch], inputs)
    kept = compressed_prefill(tiny_dirs[arch], inputs, "h2o", 0.3)
    budget = round_half_up(0.3 * n)
    recent = max(1, math.floor(budget * 0.5))
    expected = []
    for attention in maps:
        heads = []
        # accumulated attention of key j: the sum over every query i of A[i, j]
        accumulated = [[sum(float(attention[h, i, j]) for i in range(n)) for j in range(n)]
                       for h in range(attention.shape[0])]
        for kv_head in range(attention.shape[0] // groups):
            score = mean_over_group(accumulated, kv_head, groups)
            heavy = top({j: score[j] for j in range(n - recent)}, budget - recent)
            heads.append(heavy | set(range(n - recent, n)))
        expected.append(heads)
    assert_kept(kept, expected)


def snapkv_scores(attention, groups, n, window, kernel) -> list[dict[int, float]]:
    """Per KV head: prefix key j -> avg-pooled (zero-padded, width `kernel`) window votes."""
    out = []
    votes = [[sum(float(attention[h, i, j]) for i in range(n - window, n)) for j in range(n)]
             for h in range(attention.shape[0])]
    for kv_head in range(attention.shape[0] // groups):
        vote = mean_over_group(votes, kv_head, groups)[: n - window]
        half = kernel // 2
        pooled = {j: sum(vote[t] for t in range(j - half, j + half + 1) if 0 <= t < n - window) / kernel
                  for j in range(n - window)}
        out.append(pooled)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_snapkv_keeps_the_pooled_window_votes(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    maps, groups = attention_maps(tiny_dirs[arch], inputs)
    kept = compressed_prefill(tiny_dirs[arch], inputs, "snapkv", 0.3, window_size=6, kernel_size=5)
    budget = round_half_up(0.3 * n)
    expected = [[top(scores, budget - 6) | set(range(n - 6, n)) for scores in snapkv_scores(a, groups, n, 6, 5)]
                for a in maps]
    assert_kept(kept, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_pyramidkv_follows_the_pyramid(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    maps, groups = attention_maps(tiny_dirs[arch], inputs)
    window, beta = 6, 20.0
    kept = compressed_prefill(tiny_dirs[arch], inputs, "pyramidkv", 0.3, window_size=window, beta=beta)
    budget = round_half_up(0.3 * n)
    layers = len(maps)
    # PyramidKV: budget - window spread linearly from 2m - m/beta (first layer) to m/beta (last)
    m = budget - window
    low, high = m / beta, 2 * m - m / beta
    shares = [window + high - (high - low) * layer / (layers - 1) for layer in range(layers)]
    counts = [k.shape[-1] for k in kept]
    assert sum(counts) == budget * layers
    assert all(abs(c - s) < 1 for c, s in zip(counts, shares)), (counts, shares)
    expected = [[top(scores, count - window) | set(range(n - window, n))
                 for scores in snapkv_scores(a, groups, n, window, 5)] for a, count in zip(maps, counts)]
    assert_kept(kept, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_vlcache_scores_post_vision_attention_and_allocates_by_density(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    model_config = upstream_model(tiny_dirs[arch]).config
    ids = inputs["input_ids"][0].tolist()
    visual = {model_config.image_token_id, getattr(model_config, "video_token_id", None)}
    last_visual = max(i for i, t in enumerate(ids) if t in visual)
    post = list(range(last_visual + 1, n))
    maps, groups = attention_maps(tiny_dirs[arch], inputs)
    kept = compressed_prefill(tiny_dirs[arch], inputs, "vlcache", 0.3, threshold=0.01)
    budget = round_half_up(0.3 * n)
    densities = []
    for attention in maps:
        dense = visible = 0
        for h in range(attention.shape[0]):
            for i in post:
                row = [float(attention[h, i, j]) for j in range(i + 1)]
                peak = max(row)
                dense += sum(1 for value in row if value >= 0.01 * peak)
                visible += len(row)
        densities.append(dense / visible)
    assert max(densities) > 1.02 * min(densities), "the tiny model must give layers different densities"
    layers = len(maps)
    shares = [budget * layers * d / sum(densities) for d in densities]
    counts = [k.shape[-1] for k in kept]
    assert sum(counts) == budget * layers
    assert all(abs(c - s) < 1 for c, s in zip(counts, shares)), (counts, shares)
    assert len(set(counts)) > 1 and counts.index(max(counts)) == densities.index(max(densities))
    expected = []
    for attention, count in zip(maps, counts):
        received = [[sum(float(attention[h, i, j]) for i in post) for j in range(n)] for h in range(attention.shape[0])]
        expected.append([top(dict(enumerate(mean_over_group(received, kv, groups))), count)
                         for kv in range(attention.shape[0] // groups)])
    assert_kept(kept, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_keeps_the_window_and_a_seeded_uniform_sample_of_the_prefix(tiny_dirs, processors, arch):
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    budget = round_half_up(0.3 * n)
    kept = {seed: compressed_prefill(tiny_dirs[arch], inputs, "random", 0.3, window_size=6, seed=seed)
            for seed in (0, 7)}
    for seed, kept_per_layer in kept.items():
        expected = []
        for layer, layer_kept in enumerate(kept_per_layer):
            heads = layer_kept.shape[0]
            # token j's draw for each KV head: row j of an [n, heads] uniform draw seeded by (seed, layer)
            generator = torch.Generator().manual_seed(seed * 2**16 + layer)
            draws = torch.rand(n, heads, generator=generator, dtype=F64).tolist()
            expected.append([top({j: draws[j][h] for j in range(n - 6)}, budget - 6) | set(range(n - 6, n))
                             for h in range(heads)])
        assert_kept(kept_per_layer, expected)
    assert any(not torch.equal(a, b) for a, b in zip(kept[0], kept[7]))  # the seed decides the sample


@pytest.mark.parametrize("arch,share", [("llava_onevision", 0.3), ("llava_onevision", 0.6), ("qwen2_vl", 0.3),
                                        ("qwen2_vl", 0.97)])
def test_lookm_keeps_the_recent_window_then_text_then_visual_tokens(tiny_dirs, processors, arch, share):
    """LOOK-M's text-prior eviction: the last max(1, floor(budget / 10)) tokens, then the text tokens by
    accumulated attention over every prompt query, then the visual ones by the same score. The shares keep part of
    the text (0.3), or all of it and part of the visual tokens (0.6: 65 text and 70 visual tokens; 0.97: 67 and 4)."""
    inputs = image_inputs(processors[arch])
    n = inputs["input_ids"].shape[1]
    config = upstream_model(tiny_dirs[arch]).config
    visual_ids = {config.image_token_id, getattr(config, "video_token_id", None)}
    visual = {j for j, token in enumerate(inputs["input_ids"][0].tolist()) if token in visual_ids}
    maps, groups = attention_maps(tiny_dirs[arch], inputs)
    kept = compressed_prefill(tiny_dirs[arch], inputs, "lookm", share)
    budget = round_half_up(share * n)
    recent = max(1, math.floor(budget * 0.1))
    expected = []
    for attention in maps:
        accumulated = [[sum(float(attention[h, i, j]) for i in range(n)) for j in range(n)]
                       for h in range(attention.shape[0])]
        heads = []
        for kv_head in range(attention.shape[0] // groups):
            score = mean_over_group(accumulated, kv_head, groups)
            older = range(n - recent)
            # text first: ranked by (is text, score)
            order = sorted(older, key=lambda j: (j in visual, -score[j]))
            heads.append(set(order[: budget - recent]) | set(range(n - recent, n)))
        expected.append(heads)
    assert_kept(kept, expected)
    kept_visual = {len(head & visual) for layer in expected for head in layer}
    assert kept_visual == {0} if share == 0.3 else 0 < min(kept_visual) and max(kept_visual) < len(visual)
