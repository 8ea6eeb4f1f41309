"""Static decoding steps run the language model's RMSNorms, SiLU-gated MLPs and rotary embedding with fewer
kernels (`StepKernels`): the same values as transformers' modules, only within decoding steps, only for
classes whose forward agrees; compiled where torch.compile works, and given back after each step."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from conftest import image_inputs
from test_static_decoding import QUESTIONS, assert_same_decoding, greedy, load

import vlmcompress
from vlmcompress import DecodingOptions, compilation
from vlmcompress.decoding import static as static_decoding
from vlmcompress.decoding.step_kernels import (FusedProducts, StepKernels, add_rms_norm, decoder_layer, fuse_linears,
                                               gated_mlp, rms_norm, silu_gate)
from vlmcompress.glue import language_model_of
from vlmcompress.glue import rotary_function_name
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
    """Compiles with aot_eager (no C compiler or GPU needed) and counts the calls of each compiled function (keyed
    by the function itself: transformers >= 5.25 wraps the rotary function in an `nn.Module`, which has no name)."""
    calls = {}

    def counting_compile(function, backend, combo_kernels=False):
        compiled = torch.compile(function, backend="aot_eager")

        def counted(*args, **kwargs):
            calls[function] = calls.get(function, 0) + 1
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
        torch.testing.assert_close(gated_mlp(silu_gate, mlp, None, hidden), mlp(hidden), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_norm_and_mlp_of_the_language_model_is_replaced_and_others_are_not(tiny_dirs, arch, compiled_calls):
    model = vlmcompress.load(tiny_dirs[arch], dtype=torch.float32)
    language_model = language_model_of(model)
    kernels = StepKernels(language_model, compile=True)
    assert len(kernels.norms) == 2 * len(language_model.layers) + 1  # two per layer and the final one
    assert len(kernels.mlps) == len(language_model.layers)
    assert len(kernels.projections) == len(language_model.layers)  # each attention's q/k/v as one product
    assert kernels.layers == list(language_model.layers)  # each one's first residual add joins its norm
    attention = type(language_model.layers[0].self_attn)
    assert [(modeling.__name__, name) for modeling, name in kernels.rotary_functions] == [
        (attention.__module__, rotary_function_name(attention))]
    assert not StepKernels(OnePlusWeightRMSNorm(16)).norms
    assert not StepKernels(gelu_mlp(), compile=True).mlps
    uncompiled = StepKernels(language_model, compile=False)  # the gate and up products are still fused
    assert all(products is not None for products in uncompiled.mlps.values()) and len(uncompiled.mlps) == len(
        language_model.layers)


def qwen2_layer(layer_class=None, size: int = 64):
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    config = Qwen2Config(hidden_size=size, intermediate_size=2 * size, num_attention_heads=4, num_key_value_heads=2,
                         hidden_act="silu", rms_norm_eps=1e-6)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = (layer_class or Qwen2DecoderLayer)(config, layer_idx=0).eval()
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.normal_()
    return layer, Qwen2RotaryEmbedding(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_with_fused_residual_adds_computes_transformers_layer(dtype):
    layer, rotary = qwen2_layer()
    layer = layer.to(dtype)
    hidden = (torch.randn(2, 5, 64) * 3).to(dtype)
    positions = torch.arange(5).expand(2, 5)
    kwargs = dict(position_embeddings=rotary(hidden, positions), position_ids=positions, attention_mask=None)
    with torch.no_grad():
        expected = layer(hidden, **kwargs)
        fused = decoder_layer(add_rms_norm, silu_gate, None, layer, hidden, **kwargs)
    torch.testing.assert_close(fused, expected, rtol=0, atol=0)
    assert StepKernels(layer).layers == [layer]
    assert not StepKernels(layer, fuse_products=False).layers


def test_inductor_rounds_the_residual_sum_before_the_norm_as_eager_does():
    """Fused into one kernel, the bf16 sum would reach the norm unrounded (a quarter of the outputs differ)."""
    if not compilation.compiler_works(torch.device("cpu"), torch.bfloat16):
        pytest.skip("inductor compiles nothing on this machine")
    torch.manual_seed(0)
    hidden, residual = ((torch.randn(8, 1, 512) * 3).bfloat16() for _ in range(2))
    weight = torch.randn(512).bfloat16()
    compiled = compilation.compiled(add_rms_norm, compilation.COMPILE_BACKEND, combo_kernels=True)(
        hidden, residual, weight, 1e-6)  # as the decoding step compiles it
    for ours, eager in zip(compiled, add_rms_norm(hidden, residual, weight, 1e-6)):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


def test_layers_that_are_not_pre_norm_keep_their_forward():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    class PostNormLayer(Qwen2DecoderLayer):
        """`norm(x + attn(x))`: the residual add before the norm, not after it."""

        def forward(self, hidden_states, **kwargs):
            attended, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
            hidden_states = self.input_layernorm(hidden_states + attended)
            return self.post_attention_layernorm(hidden_states + self.mlp(hidden_states))

    layer, _ = qwen2_layer(PostNormLayer)
    kernels = StepKernels(layer)
    assert not kernels.layers and len(kernels.norms) == 2  # its norms and MLP are still replaced
    with kernels:
        assert "forward" not in vars(layer)


def storages(module: torch.nn.Module) -> dict[int, int]:
    """Bytes of each distinct storage the module's parameters live in."""
    return {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}


@pytest.mark.parametrize("bias", [True, False])
def test_fused_linears_are_views_of_one_buffer_and_compute_each_linear(bias):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(24, out, bias=bias) for out in (16, 8, 8)]
    holder = torch.nn.ModuleList(linears)
    before = [(linear.weight.clone(), linear.bias.clone() if bias else None) for linear in linears]
    hidden = torch.randn(3, 1, 24)
    expected = [linear(hidden) for linear in linears]
    weight, fused_bias = fuse_linears(linears)
    assert weight.shape == (32, 24) and (fused_bias is not None) == bias
    # the parameters now live in the fused buffers (one for the weights, one for the biases): no second copy
    assert len(storages(holder)) == (2 if bias else 1)
    assert sum(storages(holder).values()) == sum(p.numel() * 4 for p in holder.parameters())
    for linear, (old_weight, old_bias) in zip(linears, before):
        assert torch.equal(linear.weight, old_weight) and (not bias or torch.equal(linear.bias, old_bias))
    assert fuse_linears(linears)[0].data_ptr() == weight.data_ptr()  # found in place the second time
    products = FusedProducts(linears, weight, fused_bias)
    shares = [products.part(index, hidden) for index in range(3)]
    for share, reference in zip(shares, expected):
        torch.testing.assert_close(share, reference, rtol=1e-6, atol=1e-6)
    assert shares[0].untyped_storage().data_ptr() == shares[2].untyped_storage().data_ptr()  # one product
    # a weight replaced since is moved into a new buffer, and the products follow it
    linears[1].weight = torch.nn.Parameter(torch.randn(8, 24))
    moved, _ = fuse_linears(linears)
    assert moved.data_ptr() != weight.data_ptr() and torch.equal(moved[16:24], linears[1].weight)


def test_linears_that_cannot_share_a_product_are_left_alone():
    biased, unbiased = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)
    assert fuse_linears([biased, unbiased]) is None
    assert fuse_linears([torch.nn.Linear(8, 4), torch.nn.Linear(6, 4)]) is None  # different inputs
    assert fuse_linears([torch.nn.Linear(8, 4), torch.nn.Linear(8, 4).to(torch.bfloat16)]) is None
    weight = biased.weight
    assert fuse_linears([biased]) is not None and biased.weight is weight  # alone, nothing to move


def test_static_steps_run_one_product_for_q_k_v_and_one_for_gate_and_up(tiny_dirs, processors, monkeypatch):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS)
    model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True)
    language_model = language_model_of(model)
    parameter_bytes = sum(storages(language_model).values())
    calls = []
    original = FusedProducts.__call__
    monkeypatch.setattr(FusedProducts, "__call__", lambda self, hidden: calls.append(self.sizes) or original(
        self, hidden))
    output = greedy(model, inputs)
    steps, layers, config = len(output.scores) - 1, len(language_model.layers), language_model.config
    kv_size = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert calls.count([config.hidden_size, kv_size, kv_size]) == steps * layers
    assert calls.count([config.intermediate_size] * 2) == steps * layers and len(calls) == 2 * steps * layers
    assert sum(storages(language_model).values()) == parameter_bytes  # the weights moved, not copied
    assert all("forward" not in vars(module) for module in language_model.modules())


def test_a_model_whose_products_were_fused_saves_and_loads_its_weights(tiny_dirs, processors, tmp_path):
    arch = "qwen2_vl"
    model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True)
    greedy(model, image_inputs(processors[arch], QUESTIONS))
    model.save_pretrained(tmp_path)
    reloaded = vlmcompress.load(tmp_path, dtype=torch.float32)
    for (name, saved), (_, loaded) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(saved, loaded), name


def test_compiled_steps_decode_like_eager_steps_and_give_the_modules_back(tiny_dirs, processors, monkeypatch,
                                                                         compiled_calls):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS)
    model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True)
    language_model = language_model_of(model)
    attention = type(language_model.layers[0].self_attn)
    modeling, rotary_name = sys.modules[attention.__module__], rotary_function_name(attention)
    upstream_rotary = getattr(modeling, rotary_name)
    reference = greedy(model, inputs)
    assert compiled_calls == {}

    original = static_decoding.StaticDecoding.__init__
    monkeypatch.setattr(static_decoding.StaticDecoding, "__init__",
                        lambda self, *args, **kwargs: original(self, *args, **kwargs, compile_kernels=True))
    compiled = greedy(model, inputs)

    assert_same_decoding(compiled, reference)
    steps, layers = len(compiled.scores) - 1, len(language_model.layers)  # the first token comes from the prompt
    # each layer's post-attention norm runs with its residual add; the final norm alone
    assert compiled_calls == {rms_norm: steps * (layers + 1), add_rms_norm: steps * layers,
                              silu_gate: steps * layers, upstream_rotary: steps * layers}
    assert getattr(modeling, rotary_name) is upstream_rotary
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
    assert not kernels.compile and not kernels.rotary_functions
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
    model.compression = dataclasses.replace(model.compression, decoding=DecodingOptions(compile=False))
    uncompiled = greedy(model, inputs)
    assert not runners[-1].step_kernels.compile
    assert_same_decoding(compiled, uncompiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLAS's products need CUDA")
def test_on_cuda_graphed_steps_with_fused_products_decode_like_separate_ones(tiny_dirs, processors, monkeypatch):
    arch = "qwen2_vl"
    inputs = image_inputs(processors[arch], QUESTIONS).to("cuda")
    model = load(tiny_dirs[arch], "snapkv", cuda_graphs=True, device_map="cuda")
    calls = []
    original = FusedProducts.__call__
    monkeypatch.setattr(FusedProducts, "__call__", lambda self, hidden: calls.append(1) or original(self, hidden))
    libraries = []
    original_enter = StepKernels.__enter__
    monkeypatch.setattr(StepKernels, "__enter__", lambda self: original_enter(self) or libraries.append(
        torch.backends.cuda.preferred_blas_library()))
    before = torch.backends.cuda.preferred_blas_library()
    fused = greedy(model, inputs)
    assert calls  # captured once, so counted in the eager run and the capture only
    # the step's products went through cuBLASLt, and the process's preference is back as it was
    assert libraries and set(libraries) == {torch._C._BlasBackend.Cublaslt}
    assert torch.backends.cuda.preferred_blas_library() == before
    model.compression = dataclasses.replace(model.compression, decoding=DecodingOptions(fuse_products=False))
    calls.clear()
    separate = greedy(model, inputs)
    assert not calls
    assert_same_decoding(fused, separate)
