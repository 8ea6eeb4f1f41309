"""Static decoding runs the language model's RMSNorms as one `torch.rms_norm` kernel and a multiply
(`FusedRMSNorms`): the same values as transformers' formula, only in decoding steps, only for norm classes
whose forward agrees with it."""

from __future__ import annotations

import pytest
import torch
from conftest import image_inputs

import vlmcompress
from vlmcompress.cache import static_decoding
from vlmcompress.cache.base import language_model_of
from vlmcompress.cache.static_decoding import FusedRMSNorms, fused_rms_norm
from vlmcompress.testing import ARCHITECTURES


class OnePlusWeightRMSNorm(torch.nn.Module):
    """Gemma's variant: scales by `1 + weight`, which `fused_rms_norm` does not compute."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(size))
        self.variance_epsilon = 1e-6

    def forward(self, hidden):
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        return (hidden.float() * torch.rsqrt(variance + self.variance_epsilon) * (1 + self.weight)).to(hidden.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_equals_transformers_formula(dtype):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    norm = Qwen2RMSNorm(96, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        hidden = (torch.randn(4, 3, 96) * 5).to(dtype)
        torch.testing.assert_close(fused_rms_norm(norm, hidden), norm(hidden), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_norm_of_the_language_model_is_fused_and_others_are_not(tiny_dirs, arch):
    model = vlmcompress.load(tiny_dirs[arch], dtype=torch.float32)
    language_model = language_model_of(model)
    fused = FusedRMSNorms(language_model)
    assert len(fused.norms) == 2 * len(language_model.layers) + 1  # two per layer and the final one
    assert not FusedRMSNorms(OnePlusWeightRMSNorm(16)).norms


def test_decoding_steps_use_the_fused_norms_and_give_them_back(tiny_dirs, processors, monkeypatch):
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], kv="snapkv", kv_budget=0.3, window_size=4, dtype=torch.float32,
                             cuda_graphs=True)
    norms = FusedRMSNorms(language_model_of(model)).norms  # checks each norm class once, before counting
    calls = []
    monkeypatch.setattr(static_decoding, "fused_rms_norm", lambda norm, hidden: calls.append(norm) or
                        fused_rms_norm(norm, hidden))
    model.generate(**image_inputs(processors["qwen2_vl"]), do_sample=False, max_new_tokens=4, min_new_tokens=4)
    assert len(calls) == 3 * len(norms)  # three decoding steps (the first token comes from the prompt)
    assert all("forward" not in vars(norm) for norm in norms)
