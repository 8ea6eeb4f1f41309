"""Visual-token pruning through `vlmcompress.load`: FastV, VisionZip, PruMerge, PruMerge+ on every architecture,
against literal references of each paper's rule, the budget, identity at full budget, FastV = masking,
composition with the KV caches, and the error contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import BATCHES, batch_inputs, generate_with_raw_logits, upstream_model
from PIL import Image

import vlmcompress
from vlmcompress.glue import passed_cache, visual_token_ids
from vlmcompress.pruning import (
    PRUNE_METHODS, allocate, fastv_keep, iqr_outlier_count, keep_count, prefill_flops, prumerge_plus_select,
    prumerge_select, validate_prune_args, visionzip_select,
)
from vlmcompress.testing import ARCHITECTURES, chat_prompt, random_image

METHODS = sorted(PRUNE_METHODS)
VIDEO_ARCHS = ("llava_onevision", "qwen2_vl")


def greedy(model, inputs, new_tokens=5):
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def images_inputs(processor, count=1, question="What is in the picture?"):
    images = [random_image(i, size=(64, 48) if i % 2 == 0 else (48, 80)) for i in range(count)]
    return processor(text=[chat_prompt(processor, question, count)], images=images, return_tensors="pt")


def video_inputs(processor, arch):
    frames = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (56, 56, 3), dtype=np.uint8))
              for i in range(4)]
    placeholder = "<video>" if arch == "llava_onevision" else "<|vision_start|><|video_pad|><|vision_end|>"
    prompt = f"<|im_start|>user\n{placeholder}What happens?<|im_end|>\n<|im_start|>assistant\n"
    return processor(text=[prompt], videos=[frames], return_tensors="pt")


def visual_count(config, input_ids):
    return int(torch.isin(input_ids, torch.tensor(visual_token_ids(config))).sum())


# ----- literal references (slow, written from the papers' rules, independent of the library) -----------
def ref_topk(scores, k):
    return sorted(sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:k])


def ref_visionzip(features, scores, keys, keep, ratio=10 / 64):
    n = len(scores)
    if keep >= n:
        return list(range(n)), features.clone()
    contextual = min(math.floor(keep * ratio + 0.5), keep - 1)
    dominant = ref_topk(scores, keep - contextual)
    rest = [i for i in range(n) if i not in dominant]
    if contextual == 0:
        return dominant, features[dominant]
    step = max(1, len(rest) // contextual)
    targets = list(range(0, len(rest), step))[:contextual]
    metric = [keys[rest[j]].double().mean(0) / keys[rest[j]].double().mean(0).norm() for j in range(len(rest))]
    groups = {t: [] for t in targets}
    for j in range(len(rest)):
        if j in targets:
            continue
        best = max(targets, key=lambda t: float(metric[j] @ metric[t]))
        groups[best].append(rest[j])
    out = {i: features[i].double() for i in dominant}
    for t in targets:
        merged = features[rest[t]].double()
        if groups[t]:
            merged = merged + torch.stack([features[i].double() for i in groups[t]]).mean(0)
        out[rest[t]] = merged
    order = sorted(out)
    return order, torch.stack([out[i] for i in order])


def ref_iqr(scores):
    values = np.asarray(scores, dtype=np.float64)
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return max(1, int((values > q3 + 1.5 * (q3 - q1)).sum()))


def ref_merge(features, scores, keys, kept, k=32):
    n = len(scores)
    if len(kept) == n:
        return features[kept].double()
    flat = [keys[i].flatten().double() / keys[i].flatten().double().norm() for i in range(n)]
    out = []
    for p in kept:
        others = [j for j in range(n) if j != p]
        nearest = sorted(others, key=lambda j: -float(flat[p] @ flat[j]))[:min(k, n - 1)]
        out.append(features[p].double() + sum(float(scores[j]) * features[j].double() for j in nearest))
    return torch.stack(out)


def random_segment(n=60, d=8, heads=2, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=g) ** 4  # heavy-tailed, so IQR finds outliers
    return torch.randn(n, d, generator=g, dtype=torch.float64), scores.double(), torch.randn(
        n, heads, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("keep", [1, 7, 20, 60])
def test_visionzip_equals_literal_reference(keep):
    features, scores, keys = random_segment()
    got = visionzip_select(features, scores, keys, keep)
    want_idx, want = ref_visionzip(features, scores, keys, keep)
    assert got.indices.tolist() == want_idx
    torch.testing.assert_close(got.features.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prumerge_iqr_count_and_merge_equal_literal_reference(seed):
    features, scores, keys = random_segment(seed=seed)
    assert iqr_outlier_count(scores) == ref_iqr(scores.tolist())
    for keep in (None, 9):
        got = prumerge_select(features, scores, keys, keep=keep, merge_k=5)
        expected_idx = ref_topk(scores, ref_iqr(scores.tolist()) if keep is None else keep)
        assert got.indices.tolist() == expected_idx
        torch.testing.assert_close(got.features.double(), ref_merge(features, scores, keys, expected_idx, k=5),
                                   rtol=1e-5, atol=1e-5)


def test_prumerge_plus_adaptive_and_budgeted_selection_equal_literal_reference():
    features, scores, keys = random_segment(n=96, seed=3)
    n, outliers = 96, ref_iqr(scores.tolist())
    top = ref_topk(scores, outliers)
    step = int(1 / (outliers / n))
    uniform = [x for x in range(int(step / 6), n - 1, max(1, int(step / 3))) if x not in top]  # released code
    got = prumerge_plus_select(features, scores, keys, keep=None, merge_k=4)
    assert got.indices.tolist() == sorted(top + uniform)
    torch.testing.assert_close(got.features.double(), ref_merge(features, scores, keys, sorted(top + uniform), k=4),
                               rtol=1e-5, atol=1e-5)
    keep = outliers + 10
    rest = [i for i in range(n) if i not in top]
    fill = [rest[int((i + 0.5) * len(rest) / 10)] for i in range(10)]
    assert prumerge_plus_select(features, scores, keys, keep=keep).indices.tolist() == sorted(top + fill)


def test_fastv_keep_and_budget_rules():
    attention = torch.rand(50, dtype=torch.float64)
    assert fastv_keep(attention, 12).tolist() == ref_topk(attention, 12)
    assert keep_count(0.25, 50) == 13 and keep_count(0.001, 50) == 1 and keep_count(7, 5) == 5
    assert allocate(10, [5, 20, 1]) == [2, 7, 1] and sum(allocate(33, [16, 17, 40])) == 33


# ----- through load(): every method x architecture ------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_generates_with_images_and_keeps_exactly_the_budget(tiny_dirs, processors, arch, method):
    model = vlmcompress.load(tiny_dirs[arch], prune=method, prune_budget=0.4)
    for count in (1, 3):
        inputs = images_inputs(processors[arch], count)
        out = greedy(model, inputs)
        prompt = inputs["input_ids"].shape[1]
        assert out.shape == (1, prompt + 5)
        assert torch.equal(out[:, :prompt], inputs["input_ids"])  # text tokens never dropped from the output
        stats = model.compression_stats
        n_in = visual_count(model.config, inputs["input_ids"])
        assert stats["visual_tokens_in"] == n_in
        protected = n_in - _prunable(model, inputs)
        expected = keep_count(0.4, n_in - protected) + protected
        assert stats["visual_tokens_kept_per_sample"] == [expected]
        if method == "fastv":
            assert stats["visual_tokens"] == n_in
            assert stats["visual_tokens_per_layer"] == [n_in] * 2 + [expected] * 2
        else:
            assert stats["visual_tokens"] == expected


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", BATCHES)
def test_batch_equals_single(tiny_dirs, processors, arch, method, batch):
    """A left-padded batch, mixing image and text-only prompts or image counts, gives every sample its
    single-prompt tokens, logits and kept visual tokens."""
    model = vlmcompress.load(tiny_dirs[arch], prune=method, prune_budget=0.4, dtype=torch.float64)
    assert_batch_equals_single(model, processors[arch], BATCHES[batch])


@pytest.mark.parametrize("method", ["fastv", "visionzip"])
@pytest.mark.parametrize("kv", ["vlcache", "snapkv"])
@pytest.mark.parametrize("batch", ["image and longer text-only", "one and two images"])
def test_batch_equals_single_composed_with_kv_eviction(tiny_dirs, processors, method, kv, batch):
    """The eviction cache sees each sample's pruned prompt (VL-Cache its visual tokens) as it would alone."""
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], prune=method, prune_budget=0.4, kv=kv, kv_budget=0.3,
                             window_size=4, dtype=torch.float64)
    assert_batch_equals_single(model, processors["qwen2_vl"], BATCHES[batch])


def assert_batch_equals_single(model, processor, samples, new_tokens=5):
    batch_out, batch_logits = generate_with_raw_logits(model, batch_inputs(processor, samples), new_tokens)
    batch_kept = model.compression_stats.get("visual_tokens_kept_per_sample")
    for i, sample in enumerate(samples):
        single_out, single_logits = generate_with_raw_logits(model, batch_inputs(processor, [sample]), new_tokens)
        assert torch.equal(batch_out[i, -new_tokens:], single_out[0, -new_tokens:])
        for batched, single in zip(batch_logits, single_logits):
            torch.testing.assert_close(batched[i], single[0], rtol=1e-9, atol=1e-9)
        # a text-only prompt alone is left alone: it keeps no visual token
        assert batch_kept[i] == model.compression_stats.get("visual_tokens_kept_per_sample", [0])[0]


def _prunable(model, inputs):
    """Prunable visual tokens of a prompt: all, except LLaVA-OneVision's newline tokens (one per row)."""
    st = model._pruning_runtime.state
    return int((st.visual & ~st.protected).sum())


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_generates_with_a_video(tiny_dirs, processors, arch, method):
    inputs = video_inputs(processors[arch], arch)
    model = vlmcompress.load(tiny_dirs[arch], prune=method, prune_budget=0.5)
    out = greedy(model, inputs)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    stats = model.compression_stats
    assert stats["visual_tokens_in"] == visual_count(model.config, inputs["input_ids"]) > 0
    assert min(stats["visual_tokens_kept_per_sample"]) < stats["visual_tokens_in"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_full_budget(tiny_dirs, processors, arch, method):
    inputs = images_inputs(processors[arch], 2)
    expected = greedy(upstream_model(tiny_dirs[arch]), inputs, 6)
    assert torch.equal(greedy(vlmcompress.load(tiny_dirs[arch], prune=method, prune_budget=1.0), inputs, 6), expected)


def test_llava_onevision_newline_tokens_are_never_dropped(tiny_dirs, processors):
    inputs = images_inputs(processors["llava_onevision"], 1)
    model = vlmcompress.load(tiny_dirs["llava_onevision"], prune="visionzip", prune_budget=1)
    greedy(model, inputs, 1)
    st = model._pruning_runtime.state
    assert int(st.protected.sum()) > 0  # the anyres rows end in newline tokens
    kept_positions = st.index[st.valid]
    assert bool(torch.isin(st.protected.nonzero()[:, 1], kept_positions).all())
    assert model.compression_stats["visual_tokens"] == 1 + int(st.protected.sum())


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_survivors_keep_their_original_mrope_positions(tiny_dirs, processors, arch):
    inputs = images_inputs(processors[arch], 2)
    model = vlmcompress.load(tiny_dirs[arch], prune="prumerge+", prune_budget=0.3)
    seen, ref = {}, {}
    greedy(model, inputs, 1)  # installs the pruning hooks; the next call's hooks run before ours
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: seen.update(pos=seen.get("pos", k["position_embeddings"][0])), with_kwargs=True)
    greedy(model, inputs, 2)
    handle.remove()
    full = upstream_model(tiny_dirs[arch])
    handle = full.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: ref.update(pos=ref.get("pos", k["position_embeddings"][0])), with_kwargs=True)
    greedy(full, inputs, 2)
    handle.remove()
    st = model._pruning_runtime.state
    # the rotary phases (from the 3-D M-RoPE positions) of the survivors are the original ones
    assert seen["pos"].shape[-2] == st.index.shape[1] < ref["pos"].shape[-2]
    assert torch.equal(seen["pos"], ref["pos"][..., st.index[0], :])


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "internvl"])
def test_fastv_equals_masking_the_dropped_tokens_in_layers_from_k(tiny_dirs, processors, arch):
    """The pruned model's logits equal those of the full (eager, float64) model whose layers >= K mask out
    exactly the tokens FastV dropped (queries of dropped tokens do not matter: they are not read).
    Tolerance: eager attention takes its softmax in float32, so sums over a masked vs a shorter row differ
    at float32 rounding (observed <= 2e-6 on these logits); 1e-4 relative / 1e-5 absolute."""
    inputs = images_inputs(processors[arch], 2)
    model = vlmcompress.load(tiny_dirs[arch], prune="fastv", prune_budget=0.3, layer=2,
                             attn_implementation="eager", dtype=torch.float64)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    st = model._pruning_runtime.state
    length = inputs["input_ids"].shape[1]
    dropped = torch.ones(length, dtype=torch.bool)
    dropped[st.index[0][st.valid[0]]] = False
    assert int(dropped.sum()) > 0 and not bool((dropped & ~st.visual[0]).any())

    full = upstream_model(tiny_dirs[arch], attn_implementation="eager", dtype=torch.float64)
    layers = full.model.language_model.layers

    def mask_hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        query = (args[0] if args else kwargs["hidden_states"]).shape[1]
        if mask is None:  # decoding without padding: build the (all-visible) mask to edit
            past = passed_cache(kwargs).layers[module.layer_idx].get_seq_length()
            mask = torch.zeros(1, 1, query, past + query, dtype=torch.float64)
        keys = mask.shape[-1]
        drop = torch.zeros(keys, dtype=torch.bool)
        drop[: min(keys, length)] = dropped[: min(keys, length)]
        kwargs["attention_mask"] = mask.masked_fill(drop[None, None, None, :].expand(-1, -1, query, -1),
                                                    torch.finfo(mask.dtype).min)
        return args, kwargs

    for layer in layers[2:]:
        layer.self_attn.register_forward_pre_hook(mask_hook, with_kwargs=True)
    ref = full.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.scores, ref.scores):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fastv_layer_k_sees_exactly_the_kept_tokens(tiny_dirs, processors):
    inputs = images_inputs(processors["qwen2_vl"], 2)
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], prune="fastv", prune_budget=3, layer=1)
    lengths = []
    for layer in model.model.language_model.layers:  # the attention sees what its layer's pre-hook left
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, k: lengths.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True)
    greedy(model, inputs, 1)
    n_in = visual_count(model.config, inputs["input_ids"])
    prompt = inputs["input_ids"].shape[1]
    assert lengths[:4] == [prompt] + [prompt - n_in + 3] * 3


@pytest.mark.parametrize("kv", ["snapkv", "vlcache"])
@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_composes_with_kv_eviction_and_the_cache_sees_the_pruned_prompt(tiny_dirs, processors, kv, method):
    inputs = images_inputs(processors["qwen2_vl"], 2)
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], prune=method, prune_budget=0.5, kv=kv, kv_budget=0.5,
                             window_size=2)
    cache = model.make_cache()
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, past_key_values=cache)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    st = model._pruning_runtime.state
    full, pruned = inputs["input_ids"].shape[1], st.index.shape[1]
    half = [math.floor(n * 0.5 + 0.5) for n in (full, pruned)]
    expected = [half[1]] * 4 if method == "visionzip" else [half[0]] * 2 + [half[1]] * 2
    kept = model.compression_stats["kept_tokens_per_layer"]
    if kv == "snapkv":
        assert kept == expected
    else:  # VL-Cache moves budget between layers; each layer still holds at most its (pruned) prompt
        assert all(k <= (full if method == "fastv" and i < 2 else pruned) for i, k in enumerate(kept))
    # VL-Cache's modality map describes the pruned sequence
    assert cache.visual_mask.shape == (1, pruned)
    assert int(cache.visual_mask.sum()) == model.compression_stats["visual_tokens_kept_per_sample"][0]


def test_text_only_prompt_is_a_no_op(tiny_dirs, processors):
    processor = processors["internvl"]
    prompt = processor.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
    inputs = processor(text=[prompt], return_tensors="pt")
    expected = greedy(upstream_model(tiny_dirs["internvl"]), inputs)
    for method in METHODS:
        model = vlmcompress.load(tiny_dirs["internvl"], prune=method, prune_budget=0.2)
        assert torch.equal(greedy(model, inputs), expected)
        assert model.compression_stats["visual_tokens"] == 0


def test_bad_arguments_raise_clear_errors(tiny_dirs, processors):
    with pytest.raises(ValueError, match="choose one of"):
        vlmcompress.load(tiny_dirs["qwen2_vl"], prune="tome")
    for budget in (0.0, 1.5, -3, 0, float("nan"), "half", True):
        with pytest.raises(ValueError, match="prune_budget"):
            validate_prune_args("visionzip", budget)
    with pytest.raises(ValueError, match="prune_budget"):
        vlmcompress.load(tiny_dirs["qwen2_vl"], prune="fastv", prune_budget=2.0)
    with pytest.raises(ValueError, match="valid options"):
        vlmcompress.load(tiny_dirs["qwen2_vl"], prune="visionzip", layer=3)
    with pytest.raises(ValueError, match="layer"):
        vlmcompress.load(tiny_dirs["qwen2_vl"], prune="fastv", layer=0)
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], prune="fastv", layer=4)
    with pytest.raises(ValueError, match=r"K must be in \[1, 3\]"):
        greedy(model, images_inputs(processors["qwen2_vl"]))
    assert validate_prune_args("PruMerge_Plus") == ("prumerge+", None)
    assert validate_prune_args("fastv") == ("fastv", 0.5)


def test_prefill_flops_are_counted_not_guessed(tiny_dirs):
    config = upstream_model(tiny_dirs["qwen2_vl"]).config
    full = prefill_flops(config, 40, 100)
    assert prefill_flops(config, 40, 100, "visionzip", 1.0) == full
    projector = prefill_flops(config, 40, 100, "visionzip", 0.25)
    fastv = prefill_flops(config, 40, 100, "fastv", 0.25, layer=2)
    assert projector < fastv < full
    assert fastv - projector == 2 * (prefill_flops(config, 40, 100) - prefill_flops(config, 40, 25)) // 4
