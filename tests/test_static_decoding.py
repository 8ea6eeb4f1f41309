"""Static decoding (`cuda_graphs=True`): decoding at fixed shapes gives eager decoding's tokens and logits,
the decode-time methods (H2O, StreamingLLM) evict within fixed buffers and keep eager decoding's tokens, the
room grows when it runs out, bad values are refused, and on CUDA the replayed graph equals the same steps
run eagerly."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import image_inputs

import vlmcompress
from vlmcompress.cache import SnapKVCache
from vlmcompress.glue import language_model_of
from vlmcompress.decoding import static_layer as static_layers
from vlmcompress.decoding.static import StaticDecoding
from vlmcompress.models import pruning_points
from vlmcompress.testing import ARCHITECTURES

OPTIONS = {"snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "vlcache": {"window_size": 4}}
QUESTIONS = ("What is in the picture? Describe it in detail.", "Colour?")  # a left-padded batch
NEW_TOKENS = 7


def load(path, method, budget=0.3, **kwargs):
    budget = budget if method else None
    return vlmcompress.load(path, kv=method, kv_budget=budget, dtype=torch.float32, **OPTIONS.get(method, {}),
                            **kwargs)


def greedy(model, inputs, **kwargs):
    return model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          output_scores=True, return_dict_in_generate=True, **kwargs)


def assert_same_decoding(ours, reference):
    assert torch.equal(ours.sequences, reference.sequences)
    for step, (a, b) in enumerate(zip(ours.scores, reference.scores)):
        finite = torch.isfinite(b)  # min_new_tokens sets EOS to -inf
        assert torch.equal(finite, torch.isfinite(a)), step
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


@pytest.fixture
def static_steps(monkeypatch):
    """Counts the decoding steps that went through the static path."""
    steps = []
    original = StaticDecoding.decode_step

    def counted(self, kwargs):
        output = original(self, kwargs)
        steps.append(self.cache.layers[0].keys.shape[-2])  # slots held after the step
        return output

    monkeypatch.setattr(StaticDecoding, "decode_step", counted)
    return steps


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", [None, "snapkv", "pyramidkv", "vlcache", "lookm"])
def test_static_decoding_equals_eager_decoding(tiny_dirs, processors, static_steps, arch, method):
    inputs = image_inputs(processors[arch], QUESTIONS)
    eager_model = load(tiny_dirs[arch], method)
    eager = greedy(eager_model, inputs)
    static_model = load(tiny_dirs[arch], method, cuda_graphs=True)
    static = greedy(static_model, inputs)
    assert_same_decoding(static, eager)
    # every token after the first came from the static path, and the buffers never changed shape
    assert len(static_steps) == NEW_TOKENS - 1 and len(set(static_steps)) == 1
    assert static_model.compression_stats["kv_bytes"] == eager_model.compression_stats["kv_bytes"]
    assert static_model.compression_stats["compression"]["cuda_graphs"] is True
    language_model = language_model_of(static_model)
    assert "forward" not in vars(language_model)  # the upstream forward is back after generate


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_static_decoding_under_per_query_head_masks_equals_eager_decoding(tiny_dirs, processors, static_steps,
                                                                          method):
    """Under plain SDPA the static mask is repeated per query head (the tiny models group 2 query heads per
    KV head); the steps keep that form up to date in place, for a written slot and for a retired one."""
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS)
    eager = greedy(load(tiny_dirs[arch], method, attn_implementation="sdpa"), inputs)
    static_model = load(tiny_dirs[arch], method, cuda_graphs=True, attn_implementation="sdpa")
    cache = static_model.make_cache()
    static = greedy(static_model, inputs, past_key_values=cache)
    assert_same_decoding(static, eager)
    assert len(static_steps) == NEW_TOKENS - 1


def live_positions(layer) -> list[list[list[int]]]:
    """Per sample and KV head, the sorted positions of the slots the next token will attend to."""
    valid = layer.slot_valid if layer.slot_valid is not None else torch.ones_like(layer.positions, dtype=torch.bool)
    if layer.slot_valid is None and layer.free_slot is not None:  # eager decoding's retired slot
        valid = valid.scatter(-1, layer.free_slot[..., None], False)
    return [[sorted(positions[live].tolist()) for positions, live in zip(*sample)]
            for sample in zip(layer.positions, valid)]


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", ["h2o", "streamingllm"])
@pytest.mark.parametrize("budget", [0.3, "longer prompt + 2", "shorter prompt + 2"])
def test_decode_time_eviction_in_static_buffers_equals_eager_decoding(tiny_dirs, processors, static_steps, arch,
                                                                      method, budget):
    """H2O and StreamingLLM retire slots within `capacity + 1` fixed slots. A budget above a sample's prompt
    first lets it grow: the longer sample into the empty slots after its prompt, the shorter one into its
    padding slots, before its attention sinks (then evicting must still find the sinks)."""
    inputs = image_inputs(processors[arch], QUESTIONS)
    prompt = inputs["input_ids"].shape[1]
    shorter = int(inputs["attention_mask"][1].sum())
    assert inputs["attention_mask"][0].all() and shorter < prompt
    budget = {"longer prompt + 2": prompt + 2, "shorter prompt + 2": shorter + 2}.get(budget, budget)
    eager_model, static_model = load(tiny_dirs[arch], method, budget), load(tiny_dirs[arch], method, budget,
                                                                             cuda_graphs=True)
    eager_cache, static_cache = eager_model.make_cache(), static_model.make_cache()
    eager = greedy(eager_model, inputs, past_key_values=eager_cache)
    static = greedy(static_model, inputs, past_key_values=static_cache)
    assert_same_decoding(static, eager)
    width = int(static_cache.layers[0].capacity.max()) + 1
    assert static_steps == [width] * (NEW_TOKENS - 1)  # the buffers never grew
    for static_layer, eager_layer, count in zip(static_cache.layers, eager_cache.layers, static_cache.kept_counts()):
        assert live_positions(static_layer) == live_positions(eager_layer)
        assert static_layer.keys.shape[-2] == int(static_layer.capacity.max()) + 1
        # The unpadded sample retired prompt tokens while decoding, and holds its capacity.
        capacity = int(static_layer.capacity[0])
        live_prompt = (static_layer.positions[0] < prompt) & static_layer.slot_valid[0]
        assert (live_prompt.sum(-1) < min(capacity, prompt)).all() and (count[0] == capacity).all()
    for static_count, eager_count in zip(static_cache.kept_counts(), eager_cache.kept_counts()):
        assert torch.equal(static_count, eager_count)
    assert static_cache.prefill_nbytes == eager_cache.prefill_nbytes


@pytest.mark.parametrize("method", ["h2o", "streamingllm"])
def test_decode_time_eviction_of_one_prompt_equals_eager_decoding_in_place(tiny_dirs, processors, static_steps,
                                                                           method):
    """Without padding, eager decoding at the budget overwrites the retired slot in place (`free_slot`); the
    static buffers do the same."""
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch])
    eager_model, static_model = (load(tiny_dirs[arch], method, 16, cuda_graphs=graphs) for graphs in (False, True))
    eager_cache, static_cache = eager_model.make_cache(), static_model.make_cache()
    eager = greedy(eager_model, inputs, past_key_values=eager_cache)
    static = greedy(static_model, inputs, past_key_values=static_cache)
    assert_same_decoding(static, eager)
    assert static_steps == [17] * (NEW_TOKENS - 1)
    assert all(layer.free_slot is not None and layer.slot_valid is None for layer in eager_cache.layers)
    for static_layer, eager_layer in zip(static_cache.layers, eager_cache.layers):
        assert live_positions(static_layer) == live_positions(eager_layer)


@pytest.mark.parametrize("budget", [3, 16])  # 3 tokens: fewer than the 4 attention sinks, so new tokens become sinks
def test_streamingllm_sinks_in_static_buffers(tiny_dirs, processors, monkeypatch, budget):
    """Static StreamingLLM fixes each layer's sink slots at its first step (`StaticLayer.earliest_valid`); a
    layer holding no more tokens than sinks finds them by position every step instead. Both keep eager
    decoding's tokens and windows."""
    searches = []  # static steps that looked for the sinks by position
    original = static_layers.lowest_positions

    def counted(positions, valid, count):
        searches.append(count)
        return original(positions, valid, count)

    monkeypatch.setattr(static_layers, "lowest_positions", counted)
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS)
    eager_model, static_model = (load(tiny_dirs["qwen2_vl"], "streamingllm", budget, cuda_graphs=graphs)
                                 for graphs in (False, True))
    eager_cache, static_cache = eager_model.make_cache(), static_model.make_cache()
    assert_same_decoding(greedy(static_model, inputs, past_key_values=static_cache),
                         greedy(eager_model, inputs, past_key_values=eager_cache))
    searched = len(searches)  # every layer and static step, or none
    assert searched == (len(static_cache.layers) * (NEW_TOKENS - 1) if budget <= 4 else 0)
    for static_layer, eager_layer in zip(static_cache.layers, eager_cache.layers):
        assert live_positions(static_layer) == live_positions(eager_layer)


@pytest.mark.parametrize("prune", ["fastv", "visionzip"])
def test_static_decoding_composes_with_token_pruning(tiny_dirs, processors, static_steps, monkeypatch, prune):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS)
    options = dict(prune=prune, prune_budget=0.5)
    eager = greedy(load(tiny_dirs[arch], "snapkv", **options), inputs)
    # FastV's layers build their own mask while decoding eagerly; a captured step may not (it reads the mask
    # on the host), and needs not: the cache masks them
    masks_built = []
    original = pruning_points.attention_mask_for
    monkeypatch.setattr(pruning_points, "attention_mask_for",
                        lambda config, key_valid, query_length, dtype: masks_built.append(query_length) or
                        original(config, key_valid, query_length, dtype))
    static = greedy(load(tiny_dirs[arch], "snapkv", cuda_graphs=True, **options), inputs)
    assert_same_decoding(static, eager)
    assert 1 not in masks_built  # none for a decoding step
    assert len(static_steps) == NEW_TOKENS - 1


def test_room_grows_when_it_runs_out(tiny_dirs, processors, static_steps):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS)
    model = load(tiny_dirs[arch], "snapkv")
    eager_cache = SnapKVCache(budget=0.3, window_size=4).attach(model)
    eager = greedy(model, inputs, past_key_values=eager_cache)
    cache = SnapKVCache(budget=0.3, window_size=4).attach(model)
    static = StaticDecoding(cache, language_model_of(model), room=2).install()
    try:
        ours = greedy(model, inputs, past_key_values=cache)
    finally:
        static.close()
    assert_same_decoding(ours, eager)
    kept = cache.layers[0].kept_indices.shape[-1]
    # 6 steps in rooms of 2: the slots grow by 2 every second step, keeping what was written
    assert static_steps == [kept + 2, kept + 2, kept + 4, kept + 4, kept + 6, kept + 6]
    # the same live slots as eager decoding: the prompt's kept tokens less padding, and the 6 fed-back tokens
    for static_count, eager_count in zip(cache.kept_counts(), eager_cache.kept_counts()):
        assert torch.equal(static_count, eager_count)


def test_a_cache_keeping_every_token_is_not_copied(tiny_dirs, processors, monkeypatch):
    """FullCache (and any budget covering the prompt) keeps each layer's prefill tensors as they are."""
    from vlmcompress.cache import CompressedLayer

    gathers = []
    keep = CompressedLayer.keep
    monkeypatch.setattr(CompressedLayer, "keep", lambda self, slots: (gathers.append(slots.shape), keep(self, slots)))
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS)
    greedy(load(tiny_dirs["qwen2_vl"], None, cuda_graphs=True), inputs)
    assert gathers == []
    greedy(load(tiny_dirs["qwen2_vl"], "snapkv"), inputs)
    assert len(gathers) > 0


def test_bad_values_are_refused(tiny_dirs):
    path = tiny_dirs["qwen2_vl"]
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        vlmcompress.load(path, kv="snapkv", cuda_graphs="yes")
    with pytest.raises(ValueError, match="room"):
        StaticDecoding(SnapKVCache(0.3), torch.nn.Linear(1, 1), room=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method, prune", [(None, None), ("snapkv", None), ("vlcache", None), ("h2o", None),
                                           ("streamingllm", None), ("snapkv", "fastv"), ("snapkv", "visionzip")])
def test_cuda_graph_replays_equal_the_same_static_steps_run_eagerly(tiny_dirs, processors, monkeypatch, method,
                                                                     prune):
    arch = "llava_onevision"
    inputs = image_inputs(processors[arch], QUESTIONS).to("cuda")
    pruning = dict(prune=prune, prune_budget=0.5) if prune else {}
    model = load(tiny_dirs[arch], method, cuda_graphs=True, device_map="cuda", **pruning)
    runners = []
    original_install = StaticDecoding.install

    def recorded(self):
        runners.append(self)
        return original_install(self)

    monkeypatch.setattr(StaticDecoding, "install", recorded)
    graphed = greedy(model, inputs)
    assert runners[-1].captures == 1
    monkeypatch.setattr(StaticDecoding, "_run", lambda self, constants: self._step(constants))  # no graph
    eager = greedy(model, inputs)
    assert_same_decoding(graphed, eager)  # cuBLAS may pick other kernels under capture: equal to rounding


@pytest.mark.parametrize("method", [None, "snapkv", "h2o"])
def test_the_cache_is_freed_when_generate_returns(tiny_dirs, processors, method):
    """Nothing static decoding leaves behind (its graph, the deferred stop check) holds the cache: its KV is
    freed by reference counting, not when the cycle collector happens to run."""
    model = load(tiny_dirs["qwen2_vl"], method, cuda_graphs=True)
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS)
    gc.collect()
    gc.disable()
    try:
        cache = model.make_cache()
        freed = weakref.ref(cache)
        model.generate(**inputs, past_key_values=cache, do_sample=False, max_new_tokens=3)
        del cache
        assert freed() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("method", [None, "snapkv", "vlcache", "h2o", "streamingllm"])
def test_a_cache_decoded_statically_serves_a_next_turn(tiny_dirs, processors, method):
    """After `generate`, the cache is back in its dynamic form: a follow-up turn passed the same cache appends
    to it and decodes (statically again) to eager decoding's tokens."""
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS)
    follow_up = torch.tensor([[65, 66, 67]] * len(QUESTIONS))
    turns = {}
    for graphs in (False, True):
        model = load(tiny_dirs["qwen2_vl"], method, cuda_graphs=graphs)
        cache = model.make_cache()
        first = greedy(model, inputs, past_key_values=cache).sequences
        ids = torch.cat([first, follow_up], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, inputs["attention_mask"].shape[1]:])], 1)
        turns[graphs] = greedy(model, {"input_ids": ids, "attention_mask": mask}, past_key_values=cache)
        if graphs:
            assert not any(isinstance(layer, static_layers.StaticLayer) for layer in cache.layers)
    assert_same_decoding(turns[True], turns[False])
