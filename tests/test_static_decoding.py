"""Static decoding (`cuda_graphs=True`): decoding at fixed shapes gives eager decoding's tokens and logits,
the decode-time methods (H2O, StreamingLLM) evict within fixed buffers and keep eager decoding's tokens, the
room grows when it runs out, bad values are refused, and on CUDA the replayed graph equals the same steps
run eagerly."""

from __future__ import annotations

import dataclasses
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
from vlmcompress.decoding.workspace import slot_bucket
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


def assert_path_decodes_like_without(model, inputs, monkeypatch, owner, name: str, without) -> None:
    """Greedy decoding through `owner.name` (called, counted) equals decoding with the decoding options
    `without` (which take it out: not called), tokens and finite scores within bf16/fp16 rounding."""
    calls, original = [], getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    ours = greedy(model, inputs)
    assert calls
    model.compression = dataclasses.replace(model.compression, decoding=without)
    calls.clear()
    reference = greedy(model, inputs)
    assert not calls
    assert torch.equal(ours.sequences, reference.sequences)
    for a, b in zip(ours.scores, reference.scores):
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite].float(), b[finite].float(), rtol=2e-2, atol=2e-2)


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
    width = slot_bucket(int(static_cache.layers[0].capacity.max()) + 1)  # the size the model's buffers round to
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
    assert static_steps == [slot_bucket(17)] * (NEW_TOKENS - 1)
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
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
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


# ----- buffers and graphs kept across generate calls (`decoding.workspace`) ---------------------------------
PROMPTS = [  # one batch size, prompts of other lengths and images: their compressed caches round to one size
    (("What is in the picture? Describe it in detail.", "Colour?"), [0, 1]),
    (("Shape?", "Which colours are in this image, and where?"), [2, 3]),
    (("Count the shapes in it.", "Is there any text written in the image here?"), [4, 5]),
]


def workspaces_of(model):
    return list(model.decoding_workspaces().entries.values())


@pytest.mark.parametrize("method", [None, "snapkv", "h2o", "streamingllm"])
def test_consecutive_generates_reuse_the_buffers_and_keep_eager_tokens(tiny_dirs, processors, method):
    """Three `generate`s with other prompts load their caches into the first one's buffers (same tensors), and
    each decodes to eager decoding's tokens and logits: nothing of an earlier prompt leaks into a later one."""
    arch = "qwen2_vl"
    budget = 16 if method in ("h2o", "streamingllm") else 0.3
    eager_model = load(tiny_dirs[arch], method, budget)
    static_model = load(tiny_dirs[arch], method, budget, cuda_graphs=True)
    buffers = []
    for questions, seeds in PROMPTS:
        inputs = image_inputs(processors[arch], questions, seeds)
        assert_same_decoding(greedy(static_model, inputs), greedy(eager_model, inputs))
        (workspace,) = workspaces_of(static_model)
        buffers.append([layer.keys.data_ptr() for layer in workspace.layers])
    assert buffers[0] == buffers[1] == buffers[2]


@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_a_smaller_batch_is_padded_into_the_kept_buffers(tiny_dirs, processors, method):
    """A batch of 3 after one of 4 decodes in the 4-row buffers (its padding row cut from the output) to the
    tokens eager decoding gives the 3 samples; a batch of 5 needs new ones, padded to 8 rows."""
    arch = "llava_onevision"
    budget = 16 if method == "h2o" else 0.3
    eager_model = load(tiny_dirs[arch], method, budget)
    static_model = load(tiny_dirs[arch], method, budget, cuda_graphs=True)
    questions = ("What is in the picture? Describe it in detail.", "Colour?", "Shape?", "Count them.", "Text?")
    for size in (4, 3, 5):
        inputs = image_inputs(processors[arch], questions[:size])
        assert_same_decoding(greedy(static_model, inputs), greedy(eager_model, inputs))
    assert sorted(workspace.batch for workspace in workspaces_of(static_model)) == [4, 8]


def test_a_prompt_of_another_size_gets_new_buffers_and_few_are_kept(tiny_dirs, processors):
    arch = "qwen2_vl"
    model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True, decoding=vlmcompress.DecodingOptions(kept_graphs=2))
    inputs = image_inputs(processors[arch])
    for room in (3, 5, 7):  # another max_new_tokens: another room, other buffers
        model.generate(**inputs, max_new_tokens=room, do_sample=False)
    assert [workspace.layers[0].keys.shape[-2] - workspace.layers[0].prompt_slots
            for workspace in workspaces_of(model)] == [5, 7]  # the least recently used one went
    model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert [workspace.layers[0].keys.shape[-2] - workspace.layers[0].prompt_slots
            for workspace in workspaces_of(model)] == [7, 5]


def test_other_decoding_options_get_their_own_buffers(tiny_dirs, processors):
    """A step is built with the model's decoding options (fused products, compiled kernels): a generate under
    other options gets its own workspace, and the first one's is taken again when they come back."""
    model = load(tiny_dirs["qwen2_vl"], "snapkv", cuda_graphs=True)
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS)
    first = greedy(model, inputs)
    (kept,) = workspaces_of(model)
    unfused = vlmcompress.DecodingOptions(fuse_products=False)
    model.compression = dataclasses.replace(model.compression, decoding=unfused)
    assert_same_decoding(greedy(model, inputs), first)
    assert len(workspaces_of(model)) == 2 and workspaces_of(model)[0] is kept
    model.compression = dataclasses.replace(model.compression, decoding=vlmcompress.DecodingOptions())
    greedy(model, inputs)
    assert len(workspaces_of(model)) == 2 and workspaces_of(model)[-1] is kept  # used last


def test_kept_buffers_go_with_the_model_or_on_request(tiny_dirs, processors):
    model = load(tiny_dirs["qwen2_vl"], "snapkv", cuda_graphs=True)
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS)
    greedy(model, inputs)
    (workspace,) = workspaces_of(model)
    kept = weakref.ref(workspace.layers[0].keys)
    del workspace
    model.release_decoding_buffers()
    gc.collect()
    assert kept() is None and workspaces_of(model) == []
    greedy(model, inputs)
    kept = weakref.ref(workspaces_of(model)[0].layers[0].keys)
    del model
    gc.collect()
    assert kept() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", [None, "snapkv", "h2o", "streamingllm"])
def test_a_kept_graph_replays_for_later_prompts(tiny_dirs, processors, monkeypatch, method):
    """The first `generate` captures its step; the next ones, whose caches fit its buffers, replay it at once,
    and decode to eager decoding's tokens."""
    arch = "qwen2_vl"
    budget = 16 if method in ("h2o", "streamingllm") else 0.3
    eager_model = load(tiny_dirs[arch], method, budget, cuda_graphs=False, device_map="cuda")
    static_model = load(tiny_dirs[arch], method, budget, cuda_graphs=True, device_map="cuda")
    runners = []
    original_install = StaticDecoding.install
    monkeypatch.setattr(StaticDecoding, "install", lambda self: (runners.append(self), original_install(self))[1])
    for questions, seeds in PROMPTS:
        inputs = image_inputs(processors[arch], questions, seeds).to("cuda")
        assert_same_decoding(greedy(static_model, inputs), greedy(eager_model, inputs))
    assert [(runner.captures, runner.reused) for runner in runners] == [(1, False), (0, True), (0, True)]


def test_static_decoding_is_the_default_on_cuda_only(tiny_dirs, processors):
    inputs = image_inputs(processors["qwen2_vl"])
    for cuda_graphs, expected in ((None, torch.cuda.is_available()), (True, True), (False, False)):
        model = vlmcompress.load(tiny_dirs["qwen2_vl"], kv="snapkv", window_size=4, cuda_graphs=cuda_graphs,
                                 device_map="cuda" if torch.cuda.is_available() else None)
        model.generate(**inputs.to(model.device), max_new_tokens=3, do_sample=False)
        assert model.compression_stats["static_decoding"] is expected, cuda_graphs


def test_beam_search_and_assisted_decoding_turn_the_default_off(tiny_dirs, processors, monkeypatch):
    """Static buffers cannot reorder beams: where the default would decode statically, a beam search (or an
    assistant) decodes eagerly, and generates as with `cuda_graphs=False`."""
    inputs = image_inputs(processors["qwen2_vl"])
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], kv="snapkv", window_size=4)
    monkeypatch.setattr(type(model), "_on_cuda", lambda self: True)  # as on a GPU
    assert model.static_decoding({}) and model.static_decoding({"num_beams": 1})
    assert not model.static_decoding({"num_beams": 2}) and not model.static_decoding({"assistant_model": model})
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False)
    assert model.compression_stats["static_decoding"] is False
    eager = vlmcompress.load(tiny_dirs["qwen2_vl"], kv="snapkv", window_size=4, cuda_graphs=False)
    assert torch.equal(beams, eager.generate(**inputs, max_new_tokens=4, num_beams=2, do_sample=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the default decodes statically only on CUDA")
def test_flash_attention_turns_the_default_off(tiny_dirs):
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], kv="snapkv", device_map="cuda")
    language_model_of(model).config._attn_implementation = "flash_attention_2"  # what load picks where installed
    assert not model.static_decoding()


def test_replaced_weights_get_new_buffers(tiny_dirs, processors):
    """A graph reads the weights where they were when it was captured: after a layer's weight is replaced (as
    quantizing or sparsifying a loaded model does), the next `generate` does not take the kept workspace, and it
    decodes with the new weight, as eager decoding does."""
    arch = "qwen2_vl"
    static_model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True)
    eager_model = load(tiny_dirs[arch], "snapkv")
    inputs = image_inputs(processors[arch], QUESTIONS)
    greedy(static_model, inputs)
    (kept,) = workspaces_of(static_model)
    for model in (static_model, eager_model):
        projection = model.model.language_model.layers[0].mlp.down_proj
        projection.weight = torch.nn.Parameter(projection.weight.detach() * 3)
    assert_same_decoding(greedy(static_model, inputs), greedy(eager_model, inputs))
    assert len(workspaces_of(static_model)) == 2 and workspaces_of(static_model)[0] is kept
