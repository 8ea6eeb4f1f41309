"""Static decoding (`cuda_graphs=True`): decoding at fixed shapes gives eager decoding's tokens and logits,
the room grows when it runs out, the decode-time methods and bad values are refused, and on CUDA the
replayed graph equals the same steps run eagerly."""

from __future__ import annotations

import pytest
import torch
from conftest import image_inputs

import vlmcompress
from vlmcompress.cache import SnapKVCache
from vlmcompress.cache.base import language_model_of
from vlmcompress.cache.static_decoding import StaticDecoding
from vlmcompress.testing import ARCHITECTURES

OPTIONS = {"snapkv": {"window_size": 4}, "pyramidkv": {"window_size": 4}, "vlcache": {"window_size": 4}}
QUESTIONS = ("What is in the picture? Describe it in detail.", "Colour?")  # a left-padded batch
NEW_TOKENS = 7


def load(path, method, **kwargs):
    budget = 0.3 if method else None
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
@pytest.mark.parametrize("method", [None, "snapkv", "pyramidkv", "vlcache"])
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


@pytest.mark.parametrize("prune", ["fastv", "visionzip"])
def test_static_decoding_composes_with_token_pruning(tiny_dirs, processors, static_steps, prune):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS)
    options = dict(prune=prune, prune_budget=0.5)
    eager = greedy(load(tiny_dirs[arch], "snapkv", **options), inputs)
    static = greedy(load(tiny_dirs[arch], "snapkv", cuda_graphs=True, **options), inputs)
    assert_same_decoding(static, eager)
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


def test_decode_time_methods_and_bad_values_are_refused(tiny_dirs):
    path = tiny_dirs["qwen2_vl"]
    for method in ("h2o", "streamingllm"):
        with pytest.raises(ValueError, match="snapkv"):
            vlmcompress.load(path, kv=method, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        vlmcompress.load(path, kv="snapkv", cuda_graphs="yes")
    with pytest.raises(ValueError, match="room"):
        StaticDecoding(SnapKVCache(0.3), torch.nn.Linear(1, 1), room=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", [None, "snapkv", "vlcache"])
def test_cuda_graph_replays_equal_the_same_static_steps_run_eagerly(tiny_dirs, processors, monkeypatch, method):
    arch = "llava_onevision"
    inputs = image_inputs(processors[arch], QUESTIONS).to("cuda")
    model = load(tiny_dirs[arch], method, cuda_graphs=True, device_map="cuda")
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
