"""Static decoding reads generate's "every sequence finished" flag one step late (`deferred_stop_check`):
when the batch stops on EOS, the one step run too many is undone, so the tokens, the scores and the
cache equal those of eager decoding, which checks the flag every step."""

from __future__ import annotations

import pytest
import torch
from conftest import image_inputs
from transformers.generation import utils as generation_utils

import vlmcompress
from vlmcompress.decoding import static as static_decoding
from vlmcompress.decoding.static import StaticDecoding

QUESTIONS = ("What is in the picture? Describe it in detail.", "Colour?")
MAX_NEW_TOKENS = 8


class HostEvent:
    """A stand-in for `torch.Event`, which the CPU backend lacks: CPU work is done when it is queued."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def deferred_on_cpu(monkeypatch):
    """Runs transformers' DeferredStopCheck on the CPU, and counts the steps static decoding undoes."""
    monkeypatch.setattr(static_decoding, "DEFERRED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(torch, "Event", HostEvent)
    undone = []
    original = StaticDecoding.undo_steps

    def counted(self, steps):
        undone.append(steps)
        return original(self, steps)

    monkeypatch.setattr(StaticDecoding, "undo_steps", counted)
    return undone


def greedy(model, inputs, eos):
    return model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos,
                          output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("method", [None, "snapkv"])
@pytest.mark.parametrize("defer", [True, False])
def test_an_early_stop_is_undone_to_eager_decodings_result(tiny_dirs, processors, deferred_on_cpu,
                                                            method, defer):
    path = tiny_dirs["qwen2_vl"]
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS)
    budget = {"kv_budget": 0.3, "window_size": 4} if method else {}
    eager_model = vlmcompress.load(path, kv=method, dtype=torch.float32, **budget)
    prompt = inputs["input_ids"].shape[1]
    # EOS: each row's third generated token, so that the whole batch stops before MAX_NEW_TOKENS
    free = eager_model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None)
    eos = sorted(set(free[:, prompt + 2].tolist()))
    eager = greedy(eager_model, inputs, eos)
    assert eager.sequences.shape[1] - prompt < MAX_NEW_TOKENS  # the batch did stop early

    static_model = vlmcompress.load(path, kv=method, dtype=torch.float32, cuda_graphs=True,
                                    decoding=vlmcompress.DecodingOptions(defer_stop_check=defer), **budget)
    static = greedy(static_model, inputs, eos)
    # the step run past the stop was undone (a transformers without DeferredStopCheck checks every step)
    deferring = defer and hasattr(generation_utils, "DeferredStopCheck")
    assert deferred_on_cpu == ([1] if deferring else [])
    assert torch.equal(static.sequences, eager.sequences)
    assert len(static.scores) == len(eager.scores)
    for ours, reference in zip(static.scores, eager.scores):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # the returned cache saw exactly the tokens fed back, and holds as many slots as eager decoding's
    assert static.past_key_values.get_seq_length() == eager.past_key_values.get_seq_length()
    for ours, reference in zip(static.past_key_values.layers, eager.past_key_values.layers):
        assert ours.keys.shape == reference.keys.shape



@pytest.mark.skipif(not torch.cuda.is_available(), reason="deferring the stop check needs CUDA events")
def test_deferred_stop_on_cuda_equals_eager_decoding(tiny_dirs, processors):
    path = tiny_dirs["qwen2_vl"]
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS).to("cuda")
    options = dict(kv="snapkv", kv_budget=0.3, window_size=4, dtype=torch.float32, device_map="cuda")
    eager_model = vlmcompress.load(path, cuda_graphs=False, **options)
    prompt = inputs["input_ids"].shape[1]
    free = eager_model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=None)
    eos = sorted(set(free[:, prompt + 2].tolist()))
    eager = greedy(eager_model, inputs, eos)
    static = greedy(vlmcompress.load(path, cuda_graphs=True, **options), inputs, eos)
    assert eager.sequences.shape[1] - prompt < MAX_NEW_TOKENS
    assert torch.equal(static.sequences, eager.sequences)
    assert static.past_key_values.get_seq_length() == eager.past_key_values.get_seq_length()
