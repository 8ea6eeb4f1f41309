"""Eager decoding (`cuda_graphs=False`) costs what transformers' own does: a decoding step of an uncompressed or
SnapKV model runs no more tensor operations than the upstream model's (each one a kernel launch on a GPU, where
an eager step is launch-bound) and no Python hook; only a method that scores while decoding (H2O) adds its
scoring."""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import image_inputs, upstream_model
from torch.utils._python_dispatch import TorchDispatchMode

import vlmcompress

QUESTIONS = {"one prompt": ("What is in the picture? Describe it in detail.",),
             "padded batch": ("What is in the picture? Describe it in detail.", "Colour?")}


class OperationCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def operations_per_step(model, inputs) -> float:
    """Tensor operations of one decoding step: the difference between generating 12 and 2 tokens, over 10."""
    counts = {}
    for tokens in (2, 12):
        with OperationCount() as counter:
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        counts[tokens] = sum(counter.count.values())
    return (counts[12] - counts[2]) / 10


@pytest.mark.parametrize("batch", QUESTIONS)
def test_eager_decoding_steps_run_upstreams_operations(tiny_dirs, processors, batch):
    path = tiny_dirs["qwen2_vl"]
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS[batch])
    upstream = operations_per_step(upstream_model(path), inputs)
    for options in ({}, {"kv": "snapkv", "kv_budget": 0.3, "window_size": 4}):
        model = vlmcompress.load(path, cuda_graphs=False, **options)
        assert operations_per_step(model, inputs) <= upstream, options
    h2o = operations_per_step(vlmcompress.load(path, kv="h2o", kv_budget=0.3, cuda_graphs=False), inputs)
    assert h2o > upstream  # the counter sees a method's own decode-time work


def test_an_unpadded_prompt_decodes_without_hooks(tiny_dirs, processors):
    """Once SnapKV's prompt is compressed, no hook of the cache runs while decoding a prompt without padding."""
    from vlmcompress.cache import hooks

    model = vlmcompress.load(tiny_dirs["qwen2_vl"], kv="snapkv", kv_budget=0.3, window_size=4, cuda_graphs=False)
    inputs = image_inputs(processors["qwen2_vl"])
    calls = collections.Counter()
    originals = {name: getattr(hooks, name) for name in ("attention_pre_hook", "attention_post_hook",
                                                         "embedding_pre_hook")}
    for name, function in originals.items():
        setattr(hooks, name, lambda *args, _name=name, _function=function: (calls.update([_name]),
                                                                            _function(*args))[1])
    try:
        for tokens in (1, 9):
            calls.clear()
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            counted = dict(calls)
            if tokens == 1:
                prefill_only = counted
    finally:
        for name, function in originals.items():
            setattr(hooks, name, function)
    assert counted == prefill_only  # 8 more decoding steps, not one more hook call
