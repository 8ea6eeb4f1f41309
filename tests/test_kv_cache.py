"""The KV eviction family through `vlmcompress.load`: every method on every architecture, against
the invariants of DESIGN.md (identity at full budget, eviction equals masking, batch equals single,
the budget is the budget) and the error contract."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import BATCHES, batch_inputs, generate_with_raw_logits, image_inputs, upstream_model

import vlmcompress
from vlmcompress.cache import KV_METHODS, CompressedCache, H2OCache, SnapKVCache
from vlmcompress.glue import passed_cache
from vlmcompress.testing import ARCHITECTURES

METHODS = sorted(KV_METHODS)
# The tiny prompts have 60-130 tokens: shrink the observation windows so budgets of 20-40% leave room.
OPTIONS = {"snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "vlcache": {"window_size": 4},
           "random": {"window_size": 4}}
F64 = torch.float64  # comparisons in float64, so that rankings never hinge on rounding


def expected_kept(budget, prompt: int) -> int:
    """The documented rule: a float budget keeps round-half-up(budget × prompt) tokens, an int budget that many."""
    kept = math.floor(prompt * budget + 0.5) if isinstance(budget, float) else budget
    return min(prompt, kept)


def load(path, method=None, budget=None, **kwargs):
    options = OPTIONS.get(method, {}) if method else {}
    return vlmcompress.load(path, kv=method, kv_budget=budget, **options, **kwargs)


def greedy(model, inputs, new_tokens=6, **kwargs):
    return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens, **kwargs)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_generates_with_an_image_and_shrinks_the_cache(tiny_dirs, processors, arch, method):
    inputs = image_inputs(processors[arch])
    model = load(tiny_dirs[arch], method, 0.3)
    assert isinstance(model, type(upstream_model(tiny_dirs[arch])))
    out = greedy(model, inputs)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6)
    stats = model.compression_stats
    prompt = inputs["input_ids"].shape[1]
    kept = stats["kept_tokens_per_layer"]
    assert sum(kept) == expected_kept(0.3, prompt) * len(kept)
    baseline = load(tiny_dirs[arch])
    greedy(baseline, inputs)
    assert stats["kv_bytes"] < 0.5 * baseline.compression_stats["kv_bytes"]
    assert stats["visual_tokens"] > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_full_budget(tiny_dirs, processors, arch, method):
    inputs = image_inputs(processors[arch])
    expected = greedy(upstream_model(tiny_dirs[arch]), inputs, new_tokens=8)
    assert torch.equal(greedy(load(tiny_dirs[arch], method, 1.0), inputs, new_tokens=8), expected)
    # An int budget covering prompt and generation keeps everything too.
    whole = inputs["input_ids"].shape[1] + 8
    assert torch.equal(greedy(load(tiny_dirs[arch], method, whole), inputs, new_tokens=8), expected)


def masked_reference_logits(path, inputs, kept_indices, new_tokens=2):
    """Greedy decoding of the *uncompressed* model (SDPA; eager computes its softmax in float32) whose decode-step attention masks out every
    prompt position a layer/KV head evicted: the definition of "eviction equals masking"."""
    model = upstream_model(path, attn_implementation="sdpa", dtype=F64)
    prompt = inputs["input_ids"].shape[1]
    handles = []
    for layer_idx, layer in enumerate(model.model.language_model.layers):
        attention = layer.self_attn
        kept = kept_indices[layer_idx]  # [b, h, k]

        def hook(module, args, kwargs, kept=kept):
            hidden = kwargs["hidden_states"]
            if hidden.shape[1] != 1:
                return None  # prefill runs unmasked, as in the compressed model
            total = passed_cache(kwargs).get_seq_length(module.layer_idx) + 1
            step_kept = kept[total - prompt - 1] if isinstance(kept, list) else kept
            b, h = step_kept.shape[:2]
            allowed = torch.zeros(b, h, total, dtype=torch.bool)
            allowed.scatter_(-1, step_kept, True)
            if not isinstance(kept, list):
                allowed[..., prompt:] = True  # generated tokens are never evicted by a prefill method
            allowed = allowed.repeat_interleave(module.num_key_value_groups, dim=1)[:, :, None, :]
            kwargs["attention_mask"] = torch.zeros(allowed.shape, dtype=F64).masked_fill(~allowed, torch.finfo(F64).min)
            return args, kwargs

        handles.append(attention.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        return generate_with_raw_logits(model, inputs, new_tokens)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
def test_eviction_equals_masking(tiny_dirs, processors, arch, method):
    """After a compressed prefill, the next-token logits equal those of the full model with the evicted
    positions masked out (|Δ| < 1e-9 in float64), so positions and rotary phases (M-RoPE on Qwen2-VL)
    stay the original ones."""
    inputs = image_inputs(processors[arch])
    # a merging method (LOOK-M) changes the kept entries, as test_kv_merge checks; here its eviction alone
    unmerged = {"merge": None} if KV_METHODS[method].merge_default else {}
    model = load(tiny_dirs[arch], method, 0.25, dtype=F64, **unmerged)
    cache = model.make_cache()
    sequences, logits = generate_with_raw_logits(model, inputs, past_key_values=cache)
    kept = [layer.kept_indices for layer in cache.layers]
    assert all(k.shape[-1] < inputs["input_ids"].shape[1] for k in kept)
    reference_sequences, reference_logits = masked_reference_logits(tiny_dirs[arch], inputs, kept)
    assert torch.equal(sequences, reference_sequences)
    torch.testing.assert_close(logits[0], reference_logits[0], rtol=0, atol=1e-9)
    torch.testing.assert_close(logits[1], reference_logits[1], rtol=0, atol=1e-9)
    # ...and evicting really changed the computation (the comparison is not vacuous).
    _, full_logits = generate_with_raw_logits(upstream_model(tiny_dirs[arch], dtype=F64), inputs)
    assert (logits[1] - full_logits[1]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize("method", ["h2o", "streamingllm"])
def test_decode_time_eviction_equals_masking_at_every_step(tiny_dirs, processors, arch, method):
    """Over several decoding steps with the cache at its budget (slots retired and overwritten in
    place), each step's logits equal the full model's with exactly the not-held positions masked."""
    inputs = image_inputs(processors[arch])
    model = load(tiny_dirs[arch], method, 0.2, dtype=F64)
    cache = model.make_cache()
    attended = {}  # layer -> list over decode steps of [b, h, live] positions attended

    def record(module, args, kwargs):
        if kwargs["hidden_states"].shape[1] != 1:
            return
        layer = cache.layers[module.layer_idx]
        positions = layer.positions.clone()
        if layer.free_slot is not None:  # about to be overwritten by this step's token
            positions.scatter_(-1, layer.free_slot[..., None], layer.seen_tokens)
            live = positions
        else:
            live = torch.cat([positions, torch.full_like(positions[..., :1], layer.seen_tokens)], dim=-1)
        attended.setdefault(module.layer_idx, []).append(live)

    handles = [layer.self_attn.register_forward_pre_hook(record, with_kwargs=True)
               for layer in model.model.language_model.layers]
    sequences, logits = generate_with_raw_logits(model, inputs, new_tokens=5, past_key_values=cache)
    for handle in handles:
        handle.remove()
    assert any(layer.free_slot is not None for layer in cache.layers), "the budget must bind while decoding"
    kept = [attended[i] for i in range(len(cache.layers))]
    reference_sequences, reference_logits = masked_reference_logits(tiny_dirs[arch], inputs, kept, new_tokens=5)
    assert torch.equal(sequences, reference_sequences)
    for step in range(5):
        torch.testing.assert_close(logits[step], reference_logits[step], rtol=0, atol=1e-9)


def assert_batch_equals_single(model, processor, samples, new_tokens):
    """Generate `samples` as one left-padded batch and each alone, and assert each sample's tokens and logits are
    its single-prompt ones; returns the batch's cache, each sample's left padding and each single run's cache."""
    inputs = batch_inputs(processor, samples)
    batch_cache = model.make_cache()
    batch_out, batch_logits = generate_with_raw_logits(model, inputs, new_tokens, past_key_values=batch_cache)
    pads = (inputs["attention_mask"] == 0).sum(-1)
    assert int(pads.max()) > 0, "the prompts must differ in length"
    single_caches = []
    for i, sample in enumerate(samples):
        single_caches.append(model.make_cache())
        single_out, single_logits = generate_with_raw_logits(model, batch_inputs(processor, [sample]), new_tokens,
                                                             past_key_values=single_caches[-1])
        assert torch.equal(batch_out[i, -new_tokens:], single_out[0, -new_tokens:])
        for batched, single in zip(batch_logits, single_logits):
            torch.testing.assert_close(batched[i], single[0], rtol=1e-9, atol=1e-9)
    return batch_cache, pads, single_caches


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [0.3, 16])  # 16 tokens: every row evicts all its padding at prefill
@pytest.mark.parametrize("batch", BATCHES)
def test_batch_equals_single(tiny_dirs, processors, arch, method, budget, batch):
    """A left-padded batch, mixing image and text-only prompts or image counts, gives every sample its
    single-prompt tokens, logits and kept positions."""
    model = load(tiny_dirs[arch], method, budget, dtype=F64)
    batch_cache, pads, single_caches = assert_batch_equals_single(model, processors[arch], BATCHES[batch], 6)
    if method in ("h2o", "streamingllm"):  # decode-time methods moved on since prefill
        return
    for i, single_cache in enumerate(single_caches):
        for batch_layer, single_layer in zip(batch_cache.layers, single_cache.layers):
            valid = batch_layer.slot_valid[i] if batch_layer.slot_valid is not None else None
            for head in range(single_layer.kept_indices.shape[1]):
                batch_kept = batch_layer.kept_indices[i, head]
                if valid is not None:
                    batch_kept = batch_kept[valid[head, : batch_kept.shape[0]]]
                assert torch.equal(batch_kept - pads[i], single_layer.kept_indices[0, head])


@pytest.mark.parametrize("arch", ["llava_onevision", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("questions", [("Colour?", "Colour?"), ("What is in the picture? Describe it.", "Colour?")])
def test_ragged_decoding_copies_no_keys_and_equals_transformers_sdpa(tiny_dirs, processors, monkeypatch, arch,
                                                                     questions):
    """VL-Cache's per-sample layer budgets (and left padding) leave a batch's layers ragged, so every decoding
    step passes a mask. The default attention (vlmcompress_sdpa) then never expands K/V to the query heads
    (`repeat_kv`), and gives the tokens and logits of transformers' SDPA."""
    from transformers.integrations import sdpa_attention

    inputs = image_inputs(processors[arch], questions, seeds=[3, 4])
    query_lengths, decode_copies = [], []
    repeat_kv = sdpa_attention.repeat_kv

    def spy(hidden_states, n_rep):
        if n_rep > 1 and query_lengths[-1] == 1:
            decode_copies.append(hidden_states.shape)
        return repeat_kv(hidden_states, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", spy)
    results = {}
    for attn in (None, "sdpa"):
        model = load(tiny_dirs[arch], "vlcache", 0.3, attn_implementation=attn, dtype=F64)
        model.get_input_embeddings().register_forward_pre_hook(lambda m, args: query_lengths.append(args[0].shape[1]))
        cache = model.make_cache()
        results[attn] = generate_with_raw_logits(model, inputs, new_tokens=4, past_key_values=cache)
        assert any(layer.slot_valid is not None for layer in cache.layers), "the layers must be ragged"
        if attn is None:
            assert model.config.text_config._attn_implementation == "vlmcompress_sdpa" and decode_copies == []
    # ...which copies K/V at each masked decoding step, unless it packs GQA itself for one query (5.24 does)
    assert decode_copies or hasattr(sdpa_attention, "pack_gqa")
    (sequences, logits), (reference_sequences, reference_logits) = results[None], results["sdpa"]
    assert torch.equal(sequences, reference_sequences)
    for step, reference in zip(logits, reference_logits):  # in float64, so the summation order cannot matter
        torch.testing.assert_close(step, reference, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [0.2, 0.5, 24])
def test_the_budget_is_the_budget(tiny_dirs, processors, method, budget):
    arch = "llava_onevision"
    inputs = image_inputs(processors[arch])
    prompt = inputs["input_ids"].shape[1]
    model = load(tiny_dirs[arch], method, budget)
    cache = model.make_cache()
    model(**inputs, past_key_values=cache)  # prefill only
    mean = expected_kept(budget, prompt)
    counts = [layer.kept_indices.shape[-1] for layer in cache.layers]
    assert sum(counts) == mean * len(counts)
    if method in ("streamingllm", "h2o", "snapkv", "random"):
        assert counts == [mean] * len(counts)
    if method == "pyramidkv":
        assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    expected_bytes = sum(2 * text.num_key_value_heads * c * head_dim * 4 for c in counts)
    assert cache.nbytes() == expected_bytes == cache.prefill_nbytes
    for layer, count in zip(cache.layers, counts):
        # Really freed: the stored tensors own storage of exactly the kept size, not views of the prompt's.
        assert layer.keys.shape[-2] == count
        assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()
        assert torch.equal(layer.kept_indices, layer.kept_indices.sort(dim=-1).values)
        assert layer.kept_indices.shape[:2] == (1, text.num_key_value_heads)


@pytest.mark.parametrize("method", ["h2o", "streamingllm"])
def test_decode_time_methods_stay_at_budget(tiny_dirs, processors, method):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch])
    model = load(tiny_dirs[arch], method, 16)
    cache = model.make_cache()
    greedy(model, inputs, new_tokens=10, past_key_values=cache)
    prompt = inputs["input_ids"].shape[1]
    seen = prompt + 9  # the last generated token is never fed back
    for layer, count in zip(cache.layers, cache.kept_counts()):
        assert layer.seen_tokens == seen and layer.slot_valid is None
        assert count.tolist() == [[16] * count.shape[1]]
        # At its budget the cache stops growing: the next token overwrites the retired slot in place.
        assert layer.keys.shape[-2] == 17 and layer.free_slot is not None
        live = torch.ones(layer.keys.shape[-2], dtype=torch.bool)
        for head in range(layer.positions.shape[1]):
            live[:] = True
            live[layer.free_slot[0, head]] = False
            positions = set(layer.positions[0, head][live].tolist())
            assert seen - 1 in positions  # the newest token
            if method == "streamingllm":
                assert positions == set(range(4)) | set(range(seen - 12, seen))


def test_standalone_cache_on_a_plain_transformers_model(tiny_dirs, processors):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch])
    plain = upstream_model(tiny_dirs[arch])
    cache = SnapKVCache(budget=0.3, window_size=4)
    out = greedy(plain, inputs, past_key_values=cache)
    assert cache.layers[0].kept_indices.shape[-1] == expected_kept(0.3, inputs["input_ids"].shape[1])
    ours = greedy(load(tiny_dirs[arch], "snapkv", 0.3), inputs)
    assert torch.equal(out, ours)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_right_padded_batch_is_refused_naming_left_padding(tiny_dirs, processors, arch):
    """Qwen2.5-VL's real tokenizer config sets no padding side, so the processor's default pads on the right;
    generation would then continue the shorter sample from its padding. Every loaded model refuses the batch
    in `generate`, and a cache on a plain transformers model refuses it at prefill."""
    right = batch_inputs(processors[arch], BATCHES["image and shorter text-only"], padding_side="right")
    assert not bool(right["attention_mask"][:, -1].all()), "the batch must be right-padded"
    for settings in ({}, {"kv": "snapkv", "kv_budget": 0.3, "window_size": 4}, {"prune": "fastv"}):
        with pytest.raises(ValueError, match='padding_side="left"'):
            greedy(vlmcompress.load(tiny_dirs[arch], **settings), right)
    for attention in ("sdpa", "eager"):
        plain = upstream_model(tiny_dirs[arch], attn_implementation=attention)
        for cache in (SnapKVCache(budget=0.3, window_size=4), H2OCache(budget=0.3)):
            with pytest.raises(ValueError, match='padding_side="left"'):
                greedy(plain, right, past_key_values=cache)
        left = batch_inputs(processors[arch], BATCHES["image and shorter text-only"])
        greedy(plain, left, past_key_values=SnapKVCache(budget=0.3, window_size=4))  # the same batch, left-padded


def test_unattached_cache_fails_loudly(tiny_dirs, processors):
    arch = "internvl"
    inputs = image_inputs(processors[arch])
    plain = upstream_model(tiny_dirs[arch])
    cache = SnapKVCache(budget=0.3, window_size=4)
    cache.detach()  # as if the cache never saw this model's forward
    with pytest.raises(RuntimeError, match="attach"):
        greedy(plain, inputs, past_key_values=cache)


@pytest.mark.parametrize("budget", [0, -1, -0.5, 1.5, 0.0, float("nan"), "0.1", True, None, [0.1]])
def test_bad_budgets(tiny_dirs, budget):
    if budget is None:  # None means "the default", which is valid
        assert load(tiny_dirs["qwen2_vl"], "snapkv", None).compression.kv.budget == 0.1
        return
    with pytest.raises(ValueError, match="kv_budget"):
        load(tiny_dirs["qwen2_vl"], "snapkv", budget)
    with pytest.raises(ValueError, match="kv_budget"):
        SnapKVCache(budget=budget)


def test_a_share_below_one_token_raises_and_names_the_smallest_share_that_keeps_one(tiny_dirs, processors):
    """0.001 of a ~100-token prompt rounds to no token: a ValueError (once the prompt length is known), whose
    suggested share then keeps exactly one token per layer."""
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch])
    prompt = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match=f"kv_budget=0.001 keeps no token of a {prompt}-token prompt") as error:
        greedy(load(tiny_dirs[arch], "streamingllm", 0.001), inputs)
    smallest = float(str(error.value).split("a share of at least ")[1].split()[0])
    model = load(tiny_dirs[arch], "streamingllm", smallest)
    greedy(model, inputs, new_tokens=1)
    assert set(model.compression_stats["kept_tokens_per_layer"]) == {1}


def test_bad_methods_and_options(tiny_dirs, processors, tmp_path):
    path = tiny_dirs["qwen2_vl"]
    with pytest.raises(ValueError, match="snapkv") as error:
        vlmcompress.load(path, kv="snapkvv")
    assert "streamingllm" in str(error.value)  # names every valid choice
    with pytest.raises(ValueError, match="window_size"):
        vlmcompress.load(path, kv="h2o", window_size=8)  # H2O has no observation window
    with pytest.raises(ValueError, match="without kv"):
        vlmcompress.load(path, kv_budget=0.2)
    with pytest.raises(ValueError, match="kernel_size"):
        vlmcompress.load(path, kv="snapkv", kernel_size=4)
    config = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "intermediate_size": 32, "vocab_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="qwen2_vl"):
        vlmcompress.load(str(tmp_path), kv="snapkv")
    inputs = image_inputs(processors["qwen2_vl"])
    too_wide = vlmcompress.load(path, kv="snapkv", kv_budget=0.5, window_size=10_000)
    with pytest.raises(ValueError, match="window_size=10000 is larger than the prompt"):
        greedy(too_wide, inputs)


def test_cache_is_a_transformers_cache():
    from transformers import Cache, DynamicCache

    for cls in KV_METHODS.values():
        cache = cls(budget=0.5)
        assert isinstance(cache, DynamicCache) and isinstance(cache, Cache) and isinstance(cache, CompressedCache)


@pytest.mark.parametrize("method", METHODS)
def test_the_prompt_masks_are_read_once_per_prompt_not_per_layer(tiny_dirs, processors, monkeypatch, method):
    """Reading a mask off the device makes the host wait for the layer to finish before it queues the next one
    (at batch 1 that was most of the compression's prefill overhead): the padding mask and VL-Cache's
    post-vision rows are read once per prompt, and budgets live on the CPU."""
    from vlmcompress.cache import base, vlcache

    reads = []
    for module, name in ((base, "key_validity_from_mask"), (vlcache.VLCache, "post_vision_queries")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _original=original, _name=name, **kwargs:
                            reads.append(_name) or _original(*args, **kwargs))
    contexts = []
    on_prompt = CompressedCache._evict_prompt
    monkeypatch.setattr(CompressedCache, "_evict_prompt", lambda self, layer, ctx, scores, kept:
                        contexts.append((ctx, kept)) or on_prompt(self, layer, ctx, scores, kept))
    model = load(tiny_dirs["qwen2_vl"], method, 0.3, dtype=torch.float32)
    inputs = image_inputs(processors["qwen2_vl"], ("What is in the picture? Describe it in detail.", "Colour?"))
    greedy(model, inputs, new_tokens=2)  # a left-padded batch: the attention receives a padding mask
    assert reads.count("key_validity_from_mask") == 1
    assert reads.count("post_vision_queries") == (1 if method == "vlcache" else 0)
    assert len(contexts) == model.config.text_config.num_hidden_layers
    assert all(t.device.type == "cpu" for ctx, kept in contexts for t in (ctx.budget, ctx.real_length, kept))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations")
@pytest.mark.parametrize("method", METHODS)
def test_on_cuda_no_layer_but_the_first_and_last_waits_for_the_device(tiny_dirs, processors, monkeypatch, method):
    import warnings

    syncs = []
    on_prompt = CompressedCache._on_prompt

    def counted(self, module, layer, arguments):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            on_prompt(self, module, layer, arguments)
        syncs.append(sum("synchronizing" in str(w.message) for w in caught))

    monkeypatch.setattr(CompressedCache, "_on_prompt", counted)
    model = load(tiny_dirs["qwen2_vl"], method, 0.3, dtype=torch.float32, device_map="cuda")
    inputs = image_inputs(processors["qwen2_vl"]).to("cuda")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        greedy(model, inputs, new_tokens=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(syncs) == model.config.text_config.num_hidden_layers
    assert syncs[1:-1] == [0] * (len(syncs) - 2), syncs
