"""Static decoding steps run the language model's RMSNorms, SiLU-gated MLPs and rotary embedding with fewer
kernels (`StepKernels`): the same values as transformers' modules, only within decoding steps, only for
classes whose forward agrees; compiled where torch.compile works, and given back after each step."""

from __future__ import annotations

import pytest
import torch
from conftest import image_inputs
from test_static_decoding import QUESTIONS, assert_same_decoding, greedy, load

import vlmcompress
from vlmcompress import compilation
from vlmcompress.cache import static_decoding
from vlmcompress.cache.base import language_model_of
from vlmcompress.cache.step_kernels import StepKernels, gated_mlp, rms_norm, silu_gate
from vlmcompress.testing import ARCHITECTURES


class OnePlusWeightRMSNorm(torch.nn.Module):
    """Gemma's variant: scales by `1 + weight`, which `rms_norm` does not compute."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(size))
        self.variance_epsilon = 1e-6

    def forward(self, hidden):
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        return (hidden.float() * torch.rsqrt(variance + self.variance_epsilon) * (1 + self.weight)).to(hidden.dtype)


def gelu_mlp(size: int = 16):
    """A gated MLP whose activation is not SiLU (`silu_gate` does not compute it)."""
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    return Qwen2MLP(Qwen2Config(hidden_size=size, intermediate_size=2 * size, hidden_act="gelu"))


@pytest.fixture
def compiled_calls(monkeypatch):
    """Compiles with aot_eager (no C compiler or GPU needed) and counts the calls of each compiled function."""
    calls = {}

    def counting_compile(function, backend):
        compiled = torch.compile(function, backend="aot_eager")

        def counted(*args, **kwargs):
            calls[function.__name__] = calls.get(function.__name__, 0) + 1
            return compiled(*args, **kwargs)
        return counted

    monkeypatch.setattr(compilation, "compiled", counting_compile)
    monkeypatch.setattr(compilation, "compiler_works", lambda *args: True)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replacements_equal_transformers_modules(dtype):
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

    norm = Qwen2RMSNorm(96, eps=1e-6).to(dtype)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=96, intermediate_size=160, hidden_act="silu")).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
        hidden = (torch.randn(4, 3, 96) * 5).to(dtype)
        torch.testing.assert_close(rms_norm(hidden, norm.weight, norm.variance_epsilon), norm(hidden), rtol=0, atol=0)
        torch.testing.assert_close(gated_mlp(silu_gate, mlp, hidden), mlp(hidden), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_norm_and_mlp_of_the_language_model_is_replaced_and_others_are_not(tiny_dirs, arch, compiled_calls):
    model = vlmcompress.load(tiny_dirs[arch], dtype=torch.float32)
    language_model = language_model_of(model)
    kernels = StepKernels(language_model, compile=True)
    assert len(kernels.norms) == 2 * len(language_model.layers) + 1  # two per layer and the final one
    assert len(kernels.mlps) == len(language_model.layers)
    assert [modeling.__name__ for modeling in kernels.rotary_modules] == [
        type(language_model.layers[0].self_attn).__module__]
    assert not StepKernels(OnePlusWeightRMSNorm(16)).norms
    assert not StepKernels(gelu_mlp(), compile=True).mlps
    assert not StepKernels(language_model, compile=False).mlps  # uncompiled, an MLP is the same kernels


def test_compiled_steps_decode_like_eager_steps_and_give_the_modules_back(tiny_dirs, processors, monkeypatch,
                                                                         compiled_calls):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS)
    model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True)
    language_model = language_model_of(model)
    modeling = __import__(type(language_model.layers[0].self_attn).__module__, fromlist=["_"])
    upstream_rotary = modeling.apply_rotary_pos_emb
    reference = greedy(model, inputs)
    assert compiled_calls == {}

    original = static_decoding.StaticDecoding.__init__
    monkeypatch.setattr(static_decoding.StaticDecoding, "__init__",
                        lambda self, *args, **kwargs: original(self, *args, **kwargs, compile_kernels=True))
    compiled = greedy(model, inputs)

    assert_same_decoding(compiled, reference)
    steps, layers = len(compiled.scores) - 1, len(language_model.layers)  # the first token comes from the prompt
    assert compiled_calls == {"rms_norm": steps * (2 * layers + 1), "silu_gate": steps * layers,
                              "apply_rotary_pos_emb": steps * layers}
    assert modeling.apply_rotary_pos_emb is upstream_rotary
    assert all("forward" not in vars(module) for module in language_model.modules())


def test_a_compiler_that_fails_leaves_the_steps_uncompiled(tiny_dirs):
    def failing_backend(graph, example_inputs):
        raise RuntimeError("no compiler here")

    language_model = language_model_of(vlmcompress.load(tiny_dirs["qwen2_vl"], dtype=torch.float32))
    monkeypatch_backend = pytest.MonkeyPatch()
    monkeypatch_backend.setattr(compilation, "COMPILE_BACKEND", failing_backend)
    try:
        with pytest.warns(UserWarning, match="does not work"):
            kernels = StepKernels(language_model, compile=True)
    finally:
        monkeypatch_backend.undo()
    assert not kernels.compile and not kernels.mlps and not kernels.rotary_modules
    assert len(kernels.norms) == 2 * len(language_model.layers) + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU kernels need CUDA")
def test_on_cuda_graphed_steps_are_compiled_and_decode_like_uncompiled_ones(tiny_dirs, processors, monkeypatch):
    arch = "llava_onevision"
    inputs = image_inputs(processors[arch], QUESTIONS).to("cuda")
    model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True, device_map="cuda")
    runners = []
    original_install = static_decoding.StaticDecoding.install
    monkeypatch.setattr(static_decoding.StaticDecoding, "install",
                        lambda self: runners.append(self) or original_install(self))
    compiled = greedy(model, inputs)
    assert runners[-1].step_kernels.compile and runners[-1].captures == 1
    monkeypatch.setattr(compilation, "COMPILE", False)
    uncompiled = greedy(model, inputs)
    assert not runners[-1].step_kernels.compile
    assert_same_decoding(compiled, uncompiled)
