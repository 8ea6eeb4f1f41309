"""The int4 triton kernels of `QuantizedLinear` (`vlmcompress/quantization/kernels.py`) and the fused quantized
products of static decoding.

On the CPU the kernels run in triton's interpreter (a child process, `triton_interpreter.py`): the few-rows
product against the float64 product of the dequantized weight, the dequantization bit for bit against
`dequantize_groups(...).to(dtype)`. The fused q/k/v and gate/up products of `QuantizedLinear`s are checked on
the CPU (they dequantize there), and on a GPU the layer's products, their replay inside a CUDA graph, and
that the codes stay in their stored form.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from triton_interpreter import in_a_child_process, interpreted

import vlmcompress
from vlmcompress.decoding.step_kernels import FusedProducts, FusedQuantizedProducts, StepKernels
from vlmcompress.glue import language_model_of
from vlmcompress.quantization import QuantizedLinear, dequantize_groups, kernels, pack_codes, unpack_codes
from vlmcompress.quantization.kernels import ProductConfig
from vlmcompress.quantization.packing import fuse_quantized_linears

# A cast to bf16/fp16 that rounds (or truncates, as triton's interpreter does to bf16) is off by less than one
# unit in the last place: at most 2^-7 (bf16) or 2^-10 (fp16) of the value.
LAST_PLACE = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


def random_layer(out_features, in_features, group_size, dtype, device="cpu", bias=True, seed=0):
    """Codes, scales, zeros and bias of a random quantized layer, and its packed codes."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator)
    zeros = torch.randint(0, 16, (out_features, in_features // group_size), dtype=torch.uint8, generator=generator)
    scales = torch.rand(out_features, in_features // group_size, generator=generator) / 16 + 1e-3
    layer_bias = torch.randn(out_features, generator=generator).to(device, dtype) if bias else None
    codes, scales, zeros = codes.to(device), scales.to(device, dtype), zeros.to(device)
    return codes, scales, zeros, layer_bias, pack_codes(codes)


def assert_product_close(out, x, codes, scales, zeros, bias):
    """`out` against the float64 product with the dequantized weight, off by the output's rounding and by the
    kernels' float32 sums: within a step, at most a group's products of inputs with codes and zero points (each
    at most 15, plus the tensor-core kernel's code offset, at most 1024); across steps, at most `in` scaled step
    sums. A float32 sum of n terms is off by at most n · 2^-24 times the sum of their magnitudes."""
    weight = dequantize_groups(codes, scales, zeros).double()
    reference = x.double() @ weight.t() + (bias.double() if bias is not None else 0)
    in_features, group_size = codes.shape[1], codes.shape[1] // scales.shape[1]
    magnitudes = x.double().abs() @ scales.double().abs().repeat_interleave(group_size, dim=1).t()
    accumulation = (group_size * (30 + 1024) + 30 * in_features) * 2**-24 * magnitudes
    tolerance = LAST_PLACE[out.dtype] * reference.abs() + accumulation
    assert tolerance.max() < 0.05 * reference.abs().max()  # tight enough that a wrong code or group shows
    error = (out.double() - reference).abs()
    assert out.dtype == x.dtype and out.shape == reference.shape
    worst = error.argmax()
    assert bool((error <= tolerance).all()), f"error {error.max():.3g}, tolerance {tolerance.flatten()[worst]:.3g}"


test_triton_kernels_in_a_child_process = in_a_child_process(__file__)

ONE_ROW_CONFIGS = [None, ProductConfig(1, 16, 256), ProductConfig(1, 8, 32),  # steps of 2+ groups, of part of one
                   ProductConfig(1, 16, 32, split_k=2), ProductConfig(1, 8, 32, split_k=8)]  # 8: some shares empty
FEW_ROWS_CONFIGS = [None, ProductConfig(16, 16, 32, num_warps=2), ProductConfig(16, 16, 32, num_warps=2, split_k=4)]


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("groups, out_features", [(2, 40), (3, 24)])  # widths no block of outputs divides
def test_interpreted_few_rows_product_equals_the_dequantized_product(dtype, group_size, groups, out_features):
    in_features = groups * group_size
    codes, scales, zeros, bias, qweight = random_layer(out_features, in_features, group_size, dtype,
                                                       bias=groups == 2)
    generator = torch.Generator().manual_seed(1)
    for rows in (1, 3, 8, 16, 33):  # 33: three blocks of 16 rows, the last one padded
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        for config in (ONE_ROW_CONFIGS if rows == 1 else []) + FEW_ROWS_CONFIGS:
            out = kernels.quantized_product(x, qweight, scales, zeros, bias, group_size, config)
            assert_product_close(out, x, codes, scales, zeros, bias)


@interpreted
def test_interpreted_product_steps_are_fitted_to_the_input_and_its_groups():
    # 3 groups of 128: a step of 2 groups does not divide the input, nor do tensor-core steps span two groups
    assert ProductConfig(1, 16, 256).fitted(384, 128).block_k == 128
    assert ProductConfig(1, 16, 1024).fitted(2048, 128).block_k == 1024
    assert ProductConfig(16, 32, 128).fitted(384, 64).block_k == 64
    with pytest.raises(ValueError, match="one-row launch takes one row"):
        kernels.quantized_product(torch.zeros(2, 64), torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 2),
                                  torch.zeros(8, 2, dtype=torch.uint8), None, 32, ProductConfig(1, 8, 64))


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_interpreted_dequantization_is_bit_exact(dtype, group_size):
    codes, scales, zeros, _, qweight = random_layer(70, 2 * group_size, group_size, dtype)  # 70: a partial block
    scales[:5] = (scales[:5].float() * 1e-3).to(dtype)  # fp16: weights below 2^-14, rounded as subnormals
    scales[5:10] = (scales[5:10].float() * 1e3).to(dtype)
    weight = kernels.dequantize(qweight, scales, zeros, group_size)
    assert weight.dtype == dtype and torch.equal(weight, dequantize_groups(codes, scales, zeros).to(dtype))


def tinygemm_like(packed, inner_k_tiles, scramble, tiles_by_column=False):
    """A repacking laid out as `tile_order` expects tinygemm's (tiles of 8 rows by 16 x inner_k_tiles columns, row
    by row; 8 codes an int32 word, the lowest nibble first), nibble t of each tile holding its place scramble[t];
    `tiles_by_column`: the tiles column by column instead."""
    codes = unpack_codes(packed).long()
    (out_features, in_features), tile_k = codes.shape, 16 * inner_k_tiles
    tiles = codes.view(out_features // 8, 8, in_features // tile_k, tile_k)
    tiles = tiles.permute(2, 0, 1, 3) if tiles_by_column else tiles.transpose(1, 2)
    words = (tiles.reshape(-1, 8 * tile_k)[:, scramble].reshape(-1, 8) << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@interpreted
@pytest.mark.parametrize("inner_k_tiles, group_size", [(2, 32), (8, 128), (8, 32)])
def test_interpreted_dequantization_of_tinygemms_tiles_is_bit_exact(inner_k_tiles, group_size):
    scramble = torch.randperm(8 * 16 * inner_k_tiles, generator=torch.Generator().manual_seed(inner_k_tiles))
    order = kernels.tile_order(lambda packed: tinygemm_like(packed, inner_k_tiles, scramble), inner_k_tiles)
    assert torch.equal(order, torch.argsort(scramble).to(torch.int32))
    codes, scales, zeros, _, qweight = random_layer(72, 512, group_size, torch.bfloat16)  # 72: a partial block
    weight = kernels.dequantize(tinygemm_like(qweight, inner_k_tiles, scramble), scales, zeros, group_size, order)
    assert torch.equal(weight, dequantize_groups(codes, scales, zeros).to(torch.bfloat16))


def test_tile_order_is_none_for_a_layout_of_other_tiles():
    scramble = torch.randperm(8 * 32, generator=torch.Generator().manual_seed(0))
    assert kernels.tile_order(lambda packed: tinygemm_like(packed, 2, scramble), 2) is not None
    assert kernels.tile_order(lambda packed: tinygemm_like(packed, 2, scramble, tiles_by_column=True), 2) is None
    shuffled = torch.randperm(16 * 64, generator=torch.Generator().manual_seed(1))  # not tile by tile
    assert kernels.tile_order(lambda packed: tinygemm_like(pack_codes(unpack_codes(packed).view(-1)[shuffled]
                                                                       .view(16, 64)), 2, scramble), 2) is None
    assert kernels.tile_order(lambda packed: tinygemm_like(packed, 2, scramble)[:-1], 2) is None  # fewer codes


@interpreted
@pytest.mark.parametrize("rows, config", [(1, ProductConfig(1, 16, 64, split_k=4)),
                                          (20, ProductConfig(16, 16, 64, split_k=4))])
def test_interpreted_split_products_leave_their_counts_at_zero_for_the_next_product(rows, config):
    """The last program of a block to finish resets its arrival count: products after it, of the same shape and
    other inputs, add up their own shares only."""
    codes, scales, zeros, bias, qweight = random_layer(40, 256, 64, torch.bfloat16)
    for seed in range(3):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        assert_product_close(kernels.quantized_product(x, qweight, scales, zeros, bias, 64, config), x, codes,
                             scales, zeros, bias)
        row_blocks = -(-rows // config.block_m)
        _, arrived = kernels.split_sums(x.device, (4, rows, 40), row_blocks * 3)
        assert arrived.tolist() == [0] * (row_blocks * 3)


def test_split_launches_are_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        ProductConfig(1, 16, 64, split_k=3).fitted(256, 64)
    with pytest.raises(ValueError, match="power of two"):
        ProductConfig(16, 16, 64, split_k=6).fitted(256, 64)
    assert ProductConfig(16, 16, 64, split_k=2).fitted(256, 64).split_k == 2


def test_the_product_refuses_codes_not_laid_out_row_by_row():
    """The kernels step through each output row's bytes: a transposed view of the codes would be read as other
    codes (as once happened to codes read back from tinygemm's layout), so it is refused before any launch."""
    codes, scales, zeros, bias, packed = random_layer(16, 64, 32, torch.bfloat16)
    column_major = packed.t().contiguous().t()
    assert torch.equal(column_major, packed)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.quantized_product(torch.randn(1, 64, dtype=torch.bfloat16), column_major, scales, zeros, bias, 32)


@interpreted
@pytest.mark.parametrize("rows", [4, 65])
def test_interpreted_quantized_linear_takes_few_rows_to_the_product_and_more_to_dequantizing(rows, monkeypatch):
    dtype = torch.float16
    codes, scales, zeros, bias, qweight = random_layer(24, 128, 64, dtype)
    x = torch.randn(rows, 1, 128).to(dtype)
    calls, dequantize = [], kernels.dequantize
    monkeypatch.setattr(kernels, "dequantize", lambda *args: calls.append(args) or dequantize(*args))
    out = kernels.quantized_linear(x, qweight, scales, zeros, bias, 64)
    assert out.shape == (rows, 1, 24) and len(calls) == (rows > kernels.MAX_PRODUCT_ROWS)
    if rows > kernels.MAX_PRODUCT_ROWS:
        assert torch.equal(out, nn.functional.linear(x, dequantize_groups(codes, scales, zeros).to(dtype), bias))
    else:
        assert_product_close(out.reshape(rows, 24), x.reshape(rows, 128), codes, scales, zeros, bias)


# ----- fused products of QuantizedLinears (CPU: they dequantize, in float32) ----------------------------------
def quantized_layers(out_sizes, in_features=64, group_size=32, bias=True, input_scale=False,
                     dtype=torch.float32, device="cpu"):
    layers = []
    for seed, out_features in enumerate(out_sizes):
        linear = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
        codes, scales, zeros, _, _ = random_layer(out_features, in_features, group_size, dtype, device, seed=seed)
        scale = torch.rand(in_features, device=device, dtype=dtype) + 0.5 if input_scale else None
        layers.append(QuantizedLinear.from_codes(linear, codes, scales, zeros, 4, scale))
    return layers


def storage_bytes(modules) -> dict[int, int]:
    """Bytes of each distinct storage the modules' parameters and buffers live in."""
    tensors = itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules)
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("bias", [True, False])
def test_fused_quantized_layers_are_views_of_one_buffer_each_and_compute_each_layer(bias):
    layers = quantized_layers((16, 8, 8), bias=bias)
    stored = [{name: tensor.clone() for name, tensor in layer.state_dict().items()} for layer in layers]
    held = sum(storage_bytes(layers).values())
    hidden = torch.randn(3, 1, 64)
    expected = [layer(hidden) for layer in layers]
    fused = fuse_quantized_linears(layers)
    assert fused.qweight.shape == (32, 32) and fused.scales.shape == fused.zeros.shape == (32, 2)
    assert (fused.bias is not None) == bias
    # each layer's codes, scales, zeros (and bias) are views of the fused buffers: no second copy
    for name in ("qweight", "scales", "zeros") + (("bias",) if bias else ()):
        buffer = getattr(fused, name)
        offsets = [getattr(layer, name).data_ptr() - buffer.data_ptr() for layer in layers]
        assert offsets == [0, 16 * buffer[0].nbytes, 24 * buffer[0].nbytes], name
    assert len(storage_bytes(layers)) == (4 if bias else 3) and sum(storage_bytes(layers).values()) == held
    assert all(torch.equal(layer.state_dict()[name], tensor)
               for layer, before in zip(layers, stored) for name, tensor in before.items())
    assert fuse_quantized_linears(layers).qweight.data_ptr() == fused.qweight.data_ptr()  # found in place
    products = FusedProducts.of(nn.ModuleDict(dict(zip("qkv", layers))), ("q", "k", "v"))
    assert isinstance(products, FusedQuantizedProducts)
    shares = [products.part(index, hidden) for index in range(3)]
    for share, reference in zip(shares, expected):
        torch.testing.assert_close(share, reference, rtol=1e-6, atol=1e-6)
    assert shares[0].untyped_storage().data_ptr() == shares[2].untyped_storage().data_ptr()  # one product


def test_layers_in_a_kernels_layout_fuse_their_packed_codes_and_compute_each_layer():
    """bf16 on the CPU: each layer's codes repacked for the int4 kernel (by blocks of 64 output rows), fused as
    such where each layer is whole blocks."""
    assert fuse_quantized_linears(quantized_layers((32, 16, 16), dtype=torch.bfloat16)) is None
    layers = quantized_layers((128, 64, 64), dtype=torch.bfloat16)
    hidden = torch.randn(3, 1, 64, dtype=torch.bfloat16)
    expected = [layer(hidden) for layer in layers]  # the first product repacks each layer's codes
    assert {layer.layout for layer in layers} == {"cpu"}
    held = sum(storage_bytes(layers).values())
    fused = fuse_quantized_linears(layers)
    assert fused.layout == "cpu" and fused.scale_and_offset.shape == (64 // fused.group_size, 256, 2)
    offsets = [layer.qweight.data_ptr() - fused.qweight.data_ptr() for layer in layers]
    assert offsets == [0, 128 * fused.qweight[0].nbytes, 192 * fused.qweight[0].nbytes]  # the packed codes: views
    assert sum(storage_bytes(layers).values()) == held
    for share, reference in zip(FusedQuantizedProducts(layers, fused)(hidden), expected):
        torch.testing.assert_close(share, reference, rtol=0, atol=0)
    assert all(layer.layout == "cpu" for layer in layers)
    for share, reference in zip(FusedQuantizedProducts(layers, fused)(hidden), [layer(hidden) for layer in layers]):
        torch.testing.assert_close(share, reference, rtol=0, atol=0)  # the layers still compute alone


def test_quantized_layers_that_cannot_share_a_product_are_left_alone():
    assert fuse_quantized_linears(quantized_layers((8, 8), input_scale=True)) is None  # AWQ: own input scales
    biased, unbiased = quantized_layers((8,)), quantized_layers((8,), bias=False)
    assert fuse_quantized_linears(biased + unbiased) is None
    assert fuse_quantized_linears(quantized_layers((8,)) + quantized_layers((8,), group_size=64)) is None
    assert fuse_quantized_linears(quantized_layers((8,)) + quantized_layers((8,), in_features=96)) is None
    # the CPU's bf16 kernel takes 16 output rows at a time: two 8-row layers would read the stored form, 16 together
    # the kernel's layout
    assert fuse_quantized_linears(quantized_layers((8, 8), dtype=torch.bfloat16)) is None
    mixed = nn.ModuleDict({"q": quantized_layers((8,))[0], "k": nn.Linear(64, 8), "v": nn.Linear(64, 8)})
    assert FusedProducts.of(mixed, ("q", "k", "v")) is None


def test_awq_attention_and_mlp_layers_are_not_fused():
    from transformers.models.qwen2.configuration_qwen2 import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    mlp = Qwen2MLP(Qwen2Config(hidden_size=64, intermediate_size=64, hidden_act="silu"))
    for name, layer in zip(("gate_proj", "up_proj", "down_proj"), quantized_layers((64, 64, 64), input_scale=True)):
        setattr(mlp, name, layer)
    kernels_of_mlp = StepKernels(mlp)
    assert list(kernels_of_mlp.mlps) == [mlp] and kernels_of_mlp.mlps[mlp] is None  # fewer kernels, one product each


@pytest.fixture(scope="module")
def quantized_qwen(tiny_dirs):
    return vlmcompress.load(tiny_dirs["qwen2_vl"], quant="rtn", quant_group_size=32)


def test_step_kernels_fuse_the_quantized_q_k_v_and_gate_up_without_a_second_copy(quantized_qwen):
    language_model = language_model_of(quantized_qwen)
    layers = len(language_model.layers)
    held = sum(storage_bytes([language_model]).values())
    attention, mlp = language_model.layers[0].self_attn, language_model.layers[0].mlp
    hidden = torch.randn(2, 1, language_model.config.hidden_size)
    with torch.no_grad():
        expected = [attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden),
                    mlp(hidden)]
        kernels_of_model = StepKernels(language_model)
        assert len(kernels_of_model.projections) == layers and len(kernels_of_model.mlps) == layers
        assert all(isinstance(products, FusedQuantizedProducts) for products in
                   kernels_of_model.projections + list(kernels_of_model.mlps.values()))
        assert sum(storage_bytes([language_model]).values()) == held  # the codes moved, not copied
        q_k_v = kernels_of_model.projections[0]
        assert q_k_v.linears == [attention.q_proj, attention.k_proj, attention.v_proj]
        assert attention.k_proj.qweight.untyped_storage().data_ptr() == q_k_v.fused.qweight.data_ptr()
        with kernels_of_model:
            shares = [attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden), mlp(hidden)]
    for share, reference in zip(shares, expected):
        torch.testing.assert_close(share, reference, rtol=1e-5, atol=1e-5)


def test_a_quantized_model_whose_products_were_fused_saves_and_loads_its_codes(quantized_qwen, tmp_path):
    StepKernels(language_model_of(quantized_qwen))
    quantized_qwen.save_pretrained(tmp_path)
    reloaded = vlmcompress.load(str(tmp_path))
    saved, loaded = quantized_qwen.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and any(name.endswith("qweight") for name in saved)
    for name, tensor in saved.items():
        assert torch.equal(tensor, loaded[name]), name


# ----- on a GPU ----------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the triton kernels run on CUDA")


@pytest.fixture
def triton_chosen(monkeypatch):
    """CUDA layers on the triton kernels (tinygemm is `QuantizedLinear.cuda_kernel`'s default)."""
    monkeypatch.setattr(QuantizedLinear, "cuda_kernel", "triton")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_on_cuda_quantized_linear_runs_the_kernels_on_the_stored_form_and_replays_in_a_cuda_graph(dtype, bias,
                                                                                                   triton_chosen):
    torch.manual_seed(0)
    codes, scales, zeros, layer_bias, _ = random_layer(4608, 3584, 128, dtype, "cuda", bias=bias)
    linear = nn.Linear(3584, 4608, bias=bias, dtype=dtype, device="cuda")
    module = QuantizedLinear.from_codes(linear, codes, scales, zeros, 4)
    if bias:
        module.bias.data.copy_(layer_bias)
    stored, address = module.qweight.clone(), module.qweight.data_ptr()
    assert kernels.kernels_work(torch.device("cuda", torch.cuda.current_device()), dtype)
    weight = dequantize_groups(codes, scales, zeros)
    for rows in (1, 8, 300):
        x = torch.randn(rows, 3584, device="cuda", dtype=dtype)
        out = module(x)
        expected = x.float() @ weight.t() + (layer_bias.float() if bias else 0)
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
        if rows <= kernels.MAX_PRODUCT_ROWS:
            assert_product_close(out, x, codes, scales, zeros, layer_bias)
        else:  # dequantized bit for bit, then cuBLAS
            assert torch.equal(out, nn.functional.linear(x, weight.to(dtype), layer_bias))
    assert module.layout == "plain" and module.qweight.data_ptr() == address and torch.equal(module.qweight, stored)
    assert torch.equal(module.codes(), codes) and torch.equal(module.state_dict()["qweight"], pack_codes(codes))
    for rows in (1, 8):
        static_x = torch.randn(rows, 3584, device="cuda", dtype=dtype)
        module(static_x)  # built and probed before the capture
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            static_out = module(static_x)
        fresh = torch.randn(rows, 3584, device="cuda", dtype=dtype)
        static_x.copy_(fresh)
        graph.replay()
        assert torch.equal(static_out, module(fresh))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_cuda_dequantization_is_bit_exact_and_launch_candidates_compute_the_product(dtype):
    codes, scales, zeros, bias, qweight = random_layer(520, 1024, 128, dtype, "cuda")
    weight = kernels.dequantize(qweight, scales, zeros, 128)
    assert torch.equal(weight, dequantize_groups(codes, scales, zeros).to(dtype))
    for rows in (1, 5):
        x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
        for config in kernels.candidate_configs(rows)[::4]:  # a sample of each kind (the benchmark runs them all)
            out = kernels.quantized_product(x, qweight, scales, zeros, bias, 128, config)
            assert_product_close(out, x, codes, scales, zeros, bias)


@cuda
def test_on_cuda_tinygemm_layers_dequantize_their_tiles_for_a_prompts_rows():
    torch.manual_seed(0)
    codes, scales, zeros, layer_bias, _ = random_layer(4608, 3584, 128, torch.bfloat16, "cuda")
    linear = nn.Linear(3584, 4608, dtype=torch.bfloat16, device="cuda")
    module = QuantizedLinear.from_codes(linear, codes, scales, zeros, 4)
    module.bias.data.copy_(layer_bias)
    assert QuantizedLinear.cuda_kernel == "tinygemm" and kernels.tinygemm_tile_order(
        torch.device("cuda", torch.cuda.current_device()), 8) is not None
    weight = dequantize_groups(codes, scales, zeros)
    for rows in (8, 300):
        x = torch.randn(rows, 3584, device="cuda", dtype=torch.bfloat16)
        out = module(x)
        assert module.layout == "cuda"
        if rows > kernels.MAX_PRODUCT_ROWS:  # dequantized bit for bit from tinygemm's tiles, then cuBLAS
            assert torch.equal(out, nn.functional.linear(x, weight.to(torch.bfloat16), layer_bias))
        else:  # tinygemm's own product, of its bf16 offsets
            expected = x.float() @ weight.t() + layer_bias.float()
            torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@cuda
def test_on_cuda_fused_quantized_products_equal_the_separate_layers(monkeypatch):
    layers = quantized_layers((3584, 512, 512), in_features=3584, group_size=128, dtype=torch.bfloat16, device="cuda")
    stored = [layer.qweight.clone() for layer in layers]
    hidden = torch.randn(8, 1, 3584, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setattr(QuantizedLinear, "cuda_kernel", "tinygemm")  # repacks the codes: fused as repacked
    expected = [layer(hidden) for layer in layers]
    assert all(layer.layout == "cuda" for layer in layers)
    products = FusedProducts.of(nn.ModuleDict(dict(zip("qkv", layers))), ("q", "k", "v"))
    assert isinstance(products, FusedQuantizedProducts) and products.fused.layout == "cuda"
    for share, reference in zip(products(hidden), expected):
        torch.testing.assert_close(share, reference, rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(QuantizedLinear, "cuda_kernel", "triton")  # the codes go back to the stored form, fused
    products = FusedProducts.of(nn.ModuleDict(dict(zip("qkv", layers))), ("q", "k", "v"))
    assert isinstance(products, FusedQuantizedProducts)
    assert all(layer.layout == "plain" and torch.equal(layer.qweight, codes) for layer, codes in zip(layers, stored))
    expected = [layer(hidden) for layer in layers]
    for share, reference in zip(products(hidden), expected):
        torch.testing.assert_close(share, reference, rtol=1e-2, atol=1e-2)


@cuda
def test_on_cuda_graphed_steps_of_a_quantized_model_decode_like_separate_products(tiny_dirs, processors, monkeypatch,
                                                                                  triton_chosen):
    """Static decoding of a bf16 quantized model: its q/k/v and gate/up run as fused products of the triton
    kernels inside the CUDA graph, and decode as the layers' own products do."""
    from conftest import image_inputs
    from test_static_decoding import QUESTIONS, assert_path_decodes_like_without

    from vlmcompress import DecodingOptions

    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS).to("cuda")
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], quant="rtn", quant_group_size=32, dtype=torch.bfloat16,
                             device_map="cuda", cuda_graphs=True)
    assert_path_decodes_like_without(model, inputs, monkeypatch, FusedQuantizedProducts, "__call__",
                                     DecodingOptions(fuse_products=False))


@cuda
def test_on_cuda_graphed_steps_of_a_tinygemm_model_decode_like_separate_products(tiny_dirs, processors, monkeypatch):
    """The same with tinygemm (`QuantizedLinear.cuda_kernel`'s default): fused products of its repacked codes."""
    from conftest import image_inputs
    from test_static_decoding import QUESTIONS, assert_path_decodes_like_without

    from vlmcompress import DecodingOptions

    assert QuantizedLinear.cuda_kernel == "tinygemm"
    inputs = image_inputs(processors["qwen2_vl"], QUESTIONS).to("cuda")
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], quant="rtn", quant_group_size=32, dtype=torch.bfloat16,
                             device_map="cuda", cuda_graphs=True)
    assert_path_decodes_like_without(model, inputs, monkeypatch, FusedQuantizedProducts, "__call__",
                                     DecodingOptions(fuse_products=False))
    assert {module.layout for module in model.modules() if isinstance(module, QuantizedLinear)} == {"cuda"}
