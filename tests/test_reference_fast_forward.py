"""The batched training forward of the reference models (evaluation/reference/fast_forward.py).

It must give the plain upstream model's loss and gradients, leave the model itself as upstream, and
remove the aten calls the upstream code spends per image (torch.profiler on CPU, forward + backward).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.reference import fast_forward, models, synthvqa  # noqa: E402
from evaluation.reference.batching import Batcher  # noqa: E402
from evaluation.reference.fast_forward import FastForward  # noqa: E402

# Measured at batch 2 -> 6 (CPU, transformers 5.17 and 5.24): Qwen2-VL 490-520 aten calls per image
# plain, 4 fast (the split of the image features); LLaVA-OneVision ~120 plain, 0 fast.
PER_IMAGE_FACTOR = 20


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    model, processor = models.build_model(arch)
    return model.train(), Batcher(processor)


def _batch(batcher: Batcher, n: int) -> dict:
    """`n` training samples of mixed types (so, left padding) with two follow-up turns each."""
    types = synthvqa.TRAINING_TYPES
    samples = [synthvqa.make_training_sample(i, types[i % len(types)], follow_ups=2) for i in range(n)]
    return batcher.to_device(batcher.cpu_batch(samples), "cpu")


def _loss_and_grads(forward, model, batch):
    model.zero_grad(set_to_none=True)
    loss = forward(**batch).loss
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _aten_calls(forward, model, batch) -> int:
    from torch.profiler import ProfilerActivity, profile

    forward(**batch).loss.backward()  # warm-up: upstream installs some hooks on the first call
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(e.name.startswith("aten::") for e in prof.events())


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_fast_forward_gives_the_plain_loss_and_gradients(arch):
    model, batcher = _model(arch)
    batch = _batch(batcher, 4)
    fast = FastForward(model)
    plain_loss, plain = _loss_and_grads(model, model, batch)
    fast_loss, grads = _loss_and_grads(fast, model, batch)
    # float32 on CPU, the same operations batched: differences are rounding only (seen: <= 1e-7 relative)
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-6, atol=0)
    assert [n for n, g in grads.items() if g is None] == [n for n, g in plain.items() if g is None]
    for name, g in plain.items():
        if g is not None:
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-6 * g.abs().max().item(), msg=name)
    assert fast.verify(batch) is None
    # the model is left as upstream built it (what evaluation and save_pretrained see)
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert "get_image_features" not in vars(model.model)


def test_verify_catches_wrong_positions(monkeypatch):
    model, batcher = _model("qwen2_vl")
    right = fast_forward.mrope_position_ids
    monkeypatch.setattr(fast_forward, "mrope_position_ids", lambda *a: right(*a)[[0, 2, 1]])  # rows <-> columns
    assert "gradient differs" in FastForward(model).verify(_batch(batcher, 4))


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_fast_forward_drops_the_per_image_aten_calls(arch):
    model, batcher = _model(arch)
    fast = FastForward(model)
    small, large = _batch(batcher, 2), _batch(batcher, 6)
    calls = {name: (_aten_calls(f, model, small), _aten_calls(f, model, large)) for name, f in
             (("plain", model), ("fast", fast))}
    per_image = {name: (b - a) / 4 for name, (a, b) in calls.items()}
    assert per_image["plain"] >= PER_IMAGE_FACTOR * max(per_image["fast"], 1), calls
    assert calls["fast"][1] < calls["plain"][1], calls
