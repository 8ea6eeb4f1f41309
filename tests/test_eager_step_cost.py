"""Eager decoding (`cuda_graphs=False`) costs what transformers' own does: a decoding step of an uncompressed
model, or of any method that evicts only the prompt (SnapKV, PyramidKV, VL-Cache, LOOK-M, random), runs no more
tensor operations than the upstream model's (each one a kernel launch on a GPU, where an eager step is
launch-bound) and no Python hook; only methods that evict while decoding (StreamingLLM, and H2O's scoring) add
their own work.

One transformers-side difference is counted apart: older releases (5.9) crop the 2-D padding mask to the
cache's length inside their mask preparation (`masking_utils`), which a compressed cache, holding fewer tokens
than the mask covers, makes them do (3 small operations a step); newer ones (5.25) do not."""

from __future__ import annotations

import collections
import traceback

import pytest
from conftest import image_inputs, upstream_model
from torch.utils._python_dispatch import TorchDispatchMode

import vlmcompress
from vlmcompress.testing import ARCHITECTURES

QUESTIONS = {"one prompt": ("What is in the picture? Describe it in detail.",),
             "padded batch": ("What is in the picture? Describe it in detail.", "Colour?")}


class OperationCount(TorchDispatchMode):
    """Tensor operations run, and how many of them transformers' mask preparation ran."""

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()
        self.in_mask_preparation = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[str(func.overloadpacket)] += 1
        if any(frame.filename.endswith("masking_utils.py") for frame in traceback.extract_stack(limit=8)):
            self.in_mask_preparation += 1
        return func(*args, **(kwargs or {}))


def operations_per_step(model, inputs) -> tuple[float, float]:
    """Tensor operations of one decoding step, and those of them in transformers' mask preparation: the
    difference between generating 12 and 2 tokens, over 10."""
    counts = {}
    for tokens in (2, 12):
        with OperationCount() as counter:
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        counts[tokens] = (sum(counter.count.values()), counter.in_mask_preparation)
    return tuple((counts[12][i] - counts[2][i]) / 10 for i in range(2))


@pytest.mark.parametrize("batch", QUESTIONS)
def test_eager_decoding_steps_run_upstreams_operations(tiny_dirs, processors, batch):
    path = tiny_dirs["qwen2_vl"]
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS[batch])
    upstream, upstream_masking = operations_per_step(upstream_model(path), inputs)
    for options in ({}, {"kv": "snapkv", "kv_budget": 0.3, "window_size": 4}):
        model = vlmcompress.load(path, cuda_graphs=False, **options)
        total, masking = operations_per_step(model, inputs)
        assert masking - upstream_masking <= 3, options  # the mask crop of older transformers (docstring)
        assert total - max(0.0, masking - upstream_masking) <= upstream, options
    h2o, _ = operations_per_step(vlmcompress.load(path, kv="h2o", kv_budget=0.3, cuda_graphs=False), inputs)
    assert h2o > upstream + 3  # the counter sees a method's own decode-time work


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_method_that_evicts_only_the_prompt_decodes_eagerly_with_upstreams_operations(tiny_dirs, processors,
                                                                                           arch):
    inputs = image_inputs(processors[arch], QUESTIONS["one prompt"])
    upstream, upstream_masking = operations_per_step(upstream_model(tiny_dirs[arch]), inputs)
    for kv in ("pyramidkv", "vlcache", "lookm", "random"):
        model = vlmcompress.load(tiny_dirs[arch], kv=kv, kv_budget=0.3, cuda_graphs=False)
        total, masking = operations_per_step(model, inputs)
        assert total - max(0.0, masking - upstream_masking) <= upstream, kv
    streaming, _ = operations_per_step(vlmcompress.load(tiny_dirs[arch], kv="streamingllm", kv_budget=0.3,
                                                        cuda_graphs=False), inputs)
    assert streaming > upstream  # it evicts at every step


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
