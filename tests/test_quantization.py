"""Weight quantization (RTN, GPTQ, AWQ) on small layers and tiny random-weight models.

The literal references below are written from the papers' formulas, independently of vlmcompress.quantization:
a per-weight min-max grid, GPTQ's column-by-column loop with an explicit inverse of the Hessian of the columns
not yet quantized, and AWQ's grid of alphas with per-weight loops.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import vlmcompress
from vlmcompress.quantization import (
    QUANT_METHODS, QuantizedLinear, awq_quantize, dequantize_groups, gptq_quantize, pack_codes, quantize,
    quantize_groups, unpack_codes, validate_quant_args,
)
from vlmcompress.testing import chat_prompt, random_image, save_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_checks import in_a_scratch_folder, no_model, rejected  # noqa: E402, F401 - fixtures


# ----- literal references -----------------------------------------------------------------------------------
def literal_grid(values, bits):
    """Scale and zero point of one group of floats: min-max with 0 included, zero point rounded."""
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    if high == low:
        return 1.0, 0.0
    scale = (high - low) / (2**bits - 1)
    return scale, float(round(-low / scale))


def literal_code(w, scale, zero, bits):
    return min(max(round(w / scale) + zero, 0), 2**bits - 1)


def literal_rtn(W, bits, group_size):
    """Dequantized weight: each (row, group) rounded on its own grid."""
    out = torch.zeros_like(W, dtype=torch.float64)
    for i in range(W.shape[0]):
        for g0 in range(0, W.shape[1], group_size):
            group = [float(w) for w in W[i, g0:g0 + group_size]]
            scale, zero = literal_grid(group, bits)
            for c, w in enumerate(group):
                out[i, g0 + c] = (literal_code(w, scale, zero, bits) - zero) * scale
    return out


def literal_gptq(W, H, bits, group_size, percdamp=0.01, act_order=False):
    """Column by column: quantize, then spread the error over the columns not yet quantized with an explicit
    inverse of their Hessian. Returns integer codes."""
    W, H = W.clone().double(), H.clone().double()
    rows, cols = W.shape
    dead = [j for j in range(cols) if H[j, j] == 0]
    for j in dead:
        H[j, j] = 1.0
        W[:, j] = 0.0
    order = list(range(cols))
    if act_order:
        order = sorted(range(cols), key=lambda j: (-float(H[j, j]) if j not in dead else 0.0, j))
    H = H + percdamp * float(torch.diagonal(H).mean()) * torch.eye(cols, dtype=torch.float64)
    grids = {}
    if act_order:  # static groups: from the original weights
        grids = {(i, g): literal_grid([float(w) for w in W[i, g * group_size:(g + 1) * group_size]], bits)
                 for i in range(rows) for g in range(cols // group_size)}
    codes = torch.zeros(rows, cols, dtype=torch.long)
    for step, j in enumerate(order):
        g = j // group_size
        if not act_order and j % group_size == 0:
            for i in range(rows):
                grids[i, g] = literal_grid([float(w) for w in W[i, j:j + group_size]], bits)
        rest = order[step:]
        Hinv = torch.linalg.inv(H[rest][:, rest])
        for i in range(rows):
            scale, zero = grids[i, g]
            q = literal_code(float(W[i, j]), scale, zero, bits)
            codes[i, j] = q
            err = float(W[i, j]) - (q - zero) * scale
            W[i, rest] -= err / Hinv[0, 0] * Hinv[0, :]
    return codes


def literal_awq(W, X, bits, group_size, n_grid):
    """The output error of every alpha on the grid, with per-weight loops; and the argmin's alpha."""
    tokens, cols = X.shape
    mean_abs = [sum(abs(float(X[t, j])) for t in range(tokens)) / tokens for j in range(cols)]
    errors = []
    for k in range(n_grid):
        alpha = k / n_grid
        s = [max(m**alpha, 1e-4) for m in mean_abs]
        norm = math.sqrt(max(s) * min(s))
        s = torch.tensor([v / norm for v in s], dtype=torch.float64)
        Wq = literal_rtn(W.double() * s, bits, group_size) / s
        errors.append(float(((X.double() @ Wq.t() - X.double() @ W.double().t()) ** 2).mean()))
    return errors, min(range(n_grid), key=lambda k: errors[k]) / n_grid


def layer_with_inputs(rows=16, cols=96, tokens=200, seed=0, dead_column=None):
    """A weight and correlated, channel-skewed inputs (a few large input channels, as in LLM activations)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) @ (
        torch.eye(cols, dtype=torch.float64) + 0.3 * torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    X[:, :: max(1, cols // 6)] *= 8.0
    if dead_column is not None:
        X[:, dead_column] = 0.0
    W = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    return W, X


# ----- grid, packing, the module ----------------------------------------------------------------------------
def test_round_to_nearest_equals_literal_grid():
    W, _ = layer_with_inputs(rows=6, cols=64)
    W[0, :32] = 0.0  # an all-zero group
    W[1, 32:] = W[1, 32:].abs() + 1  # a group of positive weights: 0 stays in the grid
    for bits in (2, 3, 4):
        codes, scales, zeros = quantize_groups(W, bits, 32)
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
        torch.testing.assert_close(dequantize_groups(codes, scales, zeros).double(), literal_rtn(W, bits, 32))
    assert torch.equal(dequantize_groups(*quantize_groups(W, 4, 32))[0, :32], torch.zeros(32))


def test_packing_round_trip():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (32, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) * 16 + int(codes[0, 1])


@pytest.mark.parametrize("bias", [False, True])
def test_int4_kernel_equals_dequantized_product_and_keeps_the_stored_form(bias):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    linear = nn.Linear(128, 48, bias=bias).to(dtype)
    codes, scales, zeros = quantize_groups(linear.weight.data.float(), 4, 32)
    module = QuantizedLinear.from_codes(linear, codes, scales.to(dtype), zeros, 4)
    x = torch.randn(2, 5, 128).to(dtype)
    expected = nn.functional.linear(x.float(), dequantize_groups(codes, scales.to(dtype), zeros),
                                    linear.bias.float() if bias else None)
    stored = {k: v.clone() for k, v in module.state_dict().items()}
    assert module.layout == "plain"
    out = module(x)
    assert module.layout == "cpu" and out.dtype == dtype and out.shape == (2, 5, 48)  # the int4 CPU kernel ran
    torch.testing.assert_close(out.float(), expected, atol=3e-2 * expected.abs().max().item(), rtol=3e-2)
    # the kernel's layout reads back exactly: state_dict and a copy loaded from it hold the stored form
    after = module.state_dict()
    assert after.keys() == stored.keys() and all(torch.equal(after[k], stored[k]) for k in stored)
    assert torch.equal(module.codes(), codes)
    fresh = QuantizedLinear(128, 48, 32, 4, bias=bias, dtype=dtype)
    fresh.load_state_dict(after)
    assert torch.equal(fresh(x), out)
    module.to(torch.device("cpu"))
    assert module.layout == "plain" and torch.equal(module.qweight, stored["qweight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm, the CUDA int4 kernel, needs a GPU")
def test_cuda_tinygemm_kernel_when_chosen_equals_dequantized_product_and_replays_in_a_cuda_graph(monkeypatch):
    """tinygemm is kept as an explicit choice (`QuantizedLinear.cuda_kernel`), to compare with the triton kernels
    (tests/test_quant_kernels.py); switching back reads the codes back into the stored form."""
    monkeypatch.setattr(QuantizedLinear, "cuda_kernel", "tinygemm")
    torch.manual_seed(0)
    linear = nn.Linear(3584, 512, bias=True, device="cuda", dtype=torch.bfloat16)
    codes, scales, zeros = quantize_groups(linear.weight.data.float(), 4, 128)
    module = QuantizedLinear.from_codes(linear, codes, scales.to(torch.bfloat16), zeros, 4)
    x = torch.randn(8, 3584, device="cuda", dtype=torch.bfloat16)
    expected = nn.functional.linear(x.float(), dequantize_groups(codes, scales.to(torch.bfloat16), zeros),
                                    linear.bias.float())
    out = module(x)
    assert module.layout == "cuda"
    torch.testing.assert_close(out.float(), expected, atol=3e-2 * expected.abs().max().item(), rtol=3e-2)
    assert torch.equal(module.codes(), codes) and torch.equal(module.state_dict()["qweight"], pack_codes(codes))
    graph, static_x = torch.cuda.CUDAGraph(), x.clone()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = module(static_x)
    static_x.copy_(x * 2)
    graph.replay()
    assert torch.equal(static_out, module(x * 2))
    monkeypatch.setattr(QuantizedLinear, "cuda_kernel", "triton")
    triton_out = module(x)
    assert module.layout == "plain" and torch.equal(module.qweight, pack_codes(codes))
    torch.testing.assert_close(triton_out.float(), expected, atol=3e-2 * expected.abs().max().item(), rtol=3e-2)


def test_codes_read_back_from_the_kernel_layout_across_chunks_of_inputs():
    """Reading codes back multiplies by the identity 1024 inputs at a time: a layer wider than that."""
    linear = nn.Linear(2560, 16, bias=False).to(torch.bfloat16)
    codes, scales, zeros = quantize_groups(linear.weight.data.float(), 4, 128)
    module = QuantizedLinear.from_codes(linear, codes, scales.to(torch.bfloat16), zeros, 4)
    module(torch.randn(1, 2560, dtype=torch.bfloat16))
    assert module.layout == "cpu" and torch.equal(module.codes(), codes)
    # back in the stored form the codes are row-major, as the triton kernels read them (they come back transposed)
    module._take_layout(None)
    assert module.layout == "plain" and module.qweight.is_contiguous() and torch.equal(module.codes(), codes)


@pytest.mark.parametrize("dtype, out_features", [(torch.float32, 32), (torch.bfloat16, 24)])
def test_layers_no_kernel_takes_use_the_dequantized_product(dtype, out_features):
    """float32 (slower in the CPU kernel than dequantized), and widths the CPU kernel does not take (16 | out)."""
    linear = nn.Linear(64, out_features).to(dtype)
    codes, scales, zeros = quantize_groups(linear.weight.data.float(), 3, 32)
    module = QuantizedLinear.from_codes(linear, codes, scales.to(dtype), zeros, 3)
    x = torch.randn(3, 64).to(dtype)
    expected = nn.functional.linear(x, dequantize_groups(codes, scales.to(dtype), zeros).to(dtype), linear.bias)
    assert torch.equal(module(x), expected)
    assert module.layout == "plain"


# ----- GPTQ and AWQ against their literal references ---------------------------------------------------------
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits, group_size, blocksize", [(4, 32, 64), (3, 32, 32), (4, 48, 40)])
def test_gptq_equals_literal_column_by_column_reference(act_order, bits, group_size, blocksize):
    W, X = layer_with_inputs(dead_column=5)
    H = X.t() @ X
    codes, scales, zeros = gptq_quantize(W, H, bits, group_size, blocksize=blocksize, act_order=act_order)
    literal = literal_gptq(W, H, bits, group_size, act_order=act_order)
    assert torch.equal(codes.long(), literal)
    assert torch.equal(codes[:, 5], zeros.round().to(torch.uint8)[:, 5 // group_size])  # a dead input reads as 0


def test_gptq_reconstructs_the_layer_output_better_than_rounding():
    W, X = layer_with_inputs(rows=32, cols=128, tokens=400)
    H = X.t() @ X
    for bits in (4, 3):
        rtn = dequantize_groups(*quantize_groups(W, bits, 32)).double()
        gptq = dequantize_groups(*gptq_quantize(W, H, bits, 32)).double()
        error = {name: float(((X @ (Wq - W).t()) ** 2).mean()) for name, Wq in (("rtn", rtn), ("gptq", gptq))}
        assert error["gptq"] < 0.7 * error["rtn"], error


def test_awq_scale_search_equals_literal_reference():
    W, X = layer_with_inputs(rows=8, cols=64, tokens=60)
    n_grid = 10
    codes, scales, zeros, input_scale, alpha, errors = awq_quantize(W, X.abs().mean(0), X, 4, 32, n_grid)
    literal_errors, literal_alpha = literal_awq(W, X, 4, 32, n_grid)
    torch.testing.assert_close(torch.tensor(errors), torch.tensor(literal_errors), rtol=1e-9, atol=0)
    ranked = sorted(literal_errors)
    assert ranked[1] > ranked[0] * 1.001  # the argmin is clear, so the comparison below means something
    assert alpha == literal_alpha > 0
    assert errors[0] > min(errors)  # alpha = 0 is round-to-nearest, which the search beats here
    # the layer reads (x * input_scale) @ dequant^T: the chosen alpha's product
    s = 1 / input_scale
    torch.testing.assert_close(s, (X.abs().mean(0) ** alpha).clamp(min=1e-4) / ((X.abs().mean(0) ** alpha).max()
                               * (X.abs().mean(0) ** alpha).min()).sqrt())
    out = (X * input_scale) @ dequantize_groups(codes, scales, zeros).double().t()
    assert float(((out - X @ W.t()) ** 2).mean()) == pytest.approx(min(errors), rel=1e-9)


# ----- arguments ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"quant": "squeezellm"}, ["unknown weight quantization method 'squeezellm'", "awq", "gptq", "rtn"]),
    ({"quant_bits": 3}, ["quant_bits=3 was given without quant=...", "['awq', 'gptq', 'rtn']"]),
    ({"quant_group_size": 64}, ["quant_group_size=64 was given without quant=..."]),
    ({"quant": "gptq", "quant_bits": 8}, ["quant_bits=8", "[2, 3, 4]"]),
    ({"quant": "gptq", "quant_bits": "4"}, ["quant_bits='4'"]),
    ({"quant": "rtn", "quant_group_size": 100}, ["quant_group_size=100", "[32, 64, 128, 256]"]),
    ({"quant": "rtn", "quant_group_size": 128}, ["quant_group_size=128 does not divide", "quant_group_size=64"]),
    ({"quant": "awq", "sparsity": "wanda"}, ["quant='awq' with sparsity='wanda' is not supported"]),
    ({"quant": "gptq", "act_order": "yes"}, ["act_order must be True or False"]),
    ({"quant": "gptq", "percdamp": 2}, ["percdamp"]),
    ({"quant": "rtn", "blocksize": 64}, ["unknown option blocksize=64", "valid options"]),
    ({"quant": "awq", "targets": "decoder"}, ["language_model"]),
])
def test_bad_arguments_fail_in_load_before_any_weight_is_read(tiny_dirs, monkeypatch, kwargs, words):
    from vlmcompress.models import MODEL_CLASSES

    monkeypatch.setattr(MODEL_CLASSES["qwen2_vl"], "from_pretrained",
                        classmethod(lambda cls, *args, **kw: pytest.fail("the weights were read")))
    with pytest.raises(ValueError) as error:
        vlmcompress.load(tiny_dirs["qwen2_vl"], **kwargs)  # hidden 64, intermediate 128
    for word in words:
        assert word in str(error.value)


def test_valid_arguments_and_registry():
    assert sorted(QUANT_METHODS) == ["awq", "gptq", "rtn"]
    assert validate_quant_args("GPTQ", 3, 64, act_order=True) == ("gptq", 3, 64,
                                                                  {"blocksize": 128, "percdamp": 0.01, "act_order": True})
    assert validate_quant_args("awq")[3] == {"n_grid": 20, "max_tokens": 4096}


# ----- on models ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wide_qwen(tmp_path_factory):
    """A tiny LLaVA-OneVision whose language model's widths take group size 128 (hidden 128, intermediate 256)."""
    return str(save_tiny_model("llava_onevision", tmp_path_factory.mktemp("wide") / "llava_onevision",
                               hidden_size=128, intermediate_size=256))


def inputs_of(path, question="What is in the picture? Describe it.", seed=3):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    return processor(text=[chat_prompt(processor, question, 1)], images=[random_image(seed)], return_tensors="pt")


def linear_weight_bytes(model, prefix="model.language_model.layers"):
    return {name: sum(t.numel() * t.element_size() for t in (m.buffers(recurse=False) if isinstance(m, QuantizedLinear)
                                                             else [m.weight]))
            for name, m in model.named_modules()
            if name.startswith(prefix) and isinstance(m, (nn.Linear, QuantizedLinear))}


def test_packed_weights_hold_under_0_3x_the_bf16_bytes(wide_qwen):
    original = linear_weight_bytes(vlmcompress.load(wide_qwen, dtype=torch.bfloat16))
    model = vlmcompress.load(wide_qwen, dtype=torch.bfloat16, quant="rtn")
    assert set(linear_weight_bytes(model)) == set(original) and len(original) == 4 * 7
    assert all(isinstance(model.get_submodule(name), QuantizedLinear) for name in original)
    with torch.no_grad():
        model(**inputs_of(wide_qwen))  # the layers now hold the CPU kernel's layout and its scales too
    quantized = linear_weight_bytes(model)
    assert all(model.get_submodule(name).layout == "cpu" for name in original)
    assert sum(quantized.values()) <= 0.3 * sum(original.values())
    assert model.quantization_report.memory_ratio() <= 0.3


@pytest.mark.parametrize("arch, method", [("qwen2_vl", "rtn"), ("qwen2_vl", "gptq"), ("qwen2_vl", "awq"),
                                          ("llava_onevision", "awq"), ("internvl", "gptq")])
def test_quantized_model_saves_and_loads_with_the_same_outputs(tiny_dirs, tmp_path, arch, method):
    path = tiny_dirs[arch]
    inputs = inputs_of(path)
    model = vlmcompress.load(path, quant=method, quant_bits=4, quant_group_size=32, num_samples=3, progress=False)
    assert model.quantization_report.num_samples == (0 if method == "rtn" else 3)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    again = vlmcompress.load(str(tmp_path))
    assert isinstance(again, type(model).__mro__[1]) and again.quantization_report.method == method
    layer = again.model.language_model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantizedLinear) and (layer.input_scale is not None) == (method == "awq")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)
    assert torch.equal(again.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
    with pytest.raises(ValueError, match="holds a .*-quantized model: load it without quant="):
        vlmcompress.load(str(tmp_path), quant="rtn", quant_group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(again, None, "rtn", 4, 32)


@pytest.mark.parametrize("arch, method", [("qwen2_vl", "rtn"), ("qwen2_vl", "gptq"), ("llava_onevision", "awq")])
def test_the_output_head_is_quantized_on_request_and_saves_and_loads(tiny_dirs, tmp_path, arch, method):
    path = tiny_dirs[arch]
    inputs = inputs_of(path)
    model = vlmcompress.load(path, quant=method, quant_group_size=32, targets="language_model+lm_head", num_samples=2,
                             progress=False)
    assert isinstance(model.lm_head, QuantizedLinear) and "lm_head" in model.quantization_report.targets
    assert (model.lm_head.input_scale is not None) == (method == "awq")
    assert isinstance(model.model.language_model.layers[0].mlp.down_proj, QuantizedLinear)
    with torch.no_grad():
        logits = model(**inputs).logits
        reference = inputs_of(path)  # the head's product: the dequantized weight applied to its input
        head_input = []
        handle = model.lm_head.register_forward_pre_hook(lambda module, args: head_input.append(args[0]))
        model(**reference)
        handle.remove()
        head = model.lm_head  # AWQ's head multiplies its input by its own input scale first
        scaled = head_input[0] * head.input_scale if head.input_scale is not None else head_input[0]
        expected = scaled @ head.dequantized_weight().t().to(scaled.dtype)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    model.save_pretrained(tmp_path)
    again = vlmcompress.load(str(tmp_path))
    assert isinstance(again.lm_head, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)
    assert torch.equal(again.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)


def test_an_output_head_tied_to_the_embeddings_is_not_quantized(tiny_dirs):
    model = vlmcompress.load(tiny_dirs["qwen2_vl"])
    model.lm_head.weight = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tie_word_embeddings=True.*leave 'lm_head' out of targets"):
        quantize(model, None, "rtn", 4, 32, targets=("lm_head",))
    with pytest.raises(ValueError, match="choose one or more of .*lm_head"):
        quantize(model, None, "rtn", 4, 32, targets=("head",))


def test_calibrated_methods_follow_the_full_precision_model_closer_than_rounding(wide_qwen):
    """GPTQ's error updates bring the model's logits closer than rounding does. AWQ's search includes alpha = 0,
    rounding's own grid, so on the calibration inputs no layer does worse; on a random tiny model its gain may be
    nil (the model differs with the transformers release that initialised it), so the model's logits are only
    required to stay as close as rounding's."""
    inputs = inputs_of(wide_qwen, seed=7)
    with torch.no_grad():
        reference = vlmcompress.load(wide_qwen)(**inputs).logits
        error = {}
        for method in ("rtn", "gptq", "awq"):
            model = vlmcompress.load(wide_qwen, quant=method, quant_bits=3, num_samples=8, progress=False)
            error[method] = float(((model(**inputs).logits - reference) ** 2).mean())
    assert error["gptq"] < 0.9 * error["rtn"] and error["awq"] <= 1.001 * error["rtn"], error


def test_quantized_model_composes_with_kv_eviction_and_static_decoding(tiny_dirs):
    path = tiny_dirs["qwen2_vl"]
    inputs = inputs_of(path)
    plain = vlmcompress.load(path, quant="rtn", quant_group_size=32)
    tokens = plain.generate(**inputs, max_new_tokens=5, do_sample=False)
    full = vlmcompress.load(path, quant="rtn", quant_group_size=32, kv="snapkv", kv_budget=1.0, cuda_graphs=True)
    assert torch.equal(full.generate(**inputs, max_new_tokens=5, do_sample=False), tokens)  # identity at full budget
    evicting = vlmcompress.load(path, quant="rtn", quant_group_size=32, kv="snapkv", kv_budget=0.3, cuda_graphs=True)
    assert evicting.generate(**inputs, max_new_tokens=5, do_sample=False).shape == tokens.shape


def test_vision_tower_is_quantized_on_request(tiny_dirs):
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], quant="rtn", quant_group_size=32,
                             targets="vision_tower+language_model")
    names = set(model.quantization_report.layers)
    assert any(n.startswith("model.visual.blocks.") for n in names)
    assert any(n.startswith("model.language_model.layers.") for n in names)
    assert not any("merger" in n for n in names)


# ----- the evaluation CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, tiny_dirs):
    from evaluation.tasks.synthetic import write_local_dataset

    root = tmp_path_factory.mktemp("quant_cli")
    write_local_dataset("docvqa_val", root / "data", n=2)
    return {"model": tiny_dirs["qwen2_vl"], "data": str(root / "data")}


@pytest.mark.parametrize("model_args, sweep, message", [
    ("quant=bogus", [], "unknown weight quantization method 'bogus'"),
    ("quant_group_size=32", ["quant=rtn,gptq", "quant_bits=4,8"], "quant_bits=8 is not supported"),
    ("quant=rtn", [], "quant_group_size=128 does not divide"),
    ("quant=rtn,sparsity=wanda", [], "is not supported (GPTQ and AWQ rewrite the pruned zeros)"),
    ("quant_bits=3", [], "--model_args: quant_bits=3 was given without quant=..."),
])
def test_cli_rejects_bad_quantization_before_loading(cli_env, capsys, no_model, model_args, sweep, message):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    args = ["--model_args", f"pretrained={cli_env['model']},{model_args}", "--tasks", "docvqa_val", "--data_dir",
            cli_env["data"], "--device", "cpu", "--verbosity", "ERROR"] + (["--sweep", *sweep] if sweep else [])
    assert message in rejected(args, capsys, no_model)


def test_a_sparsified_model_is_not_quantized(tiny_dirs):
    model = vlmcompress.load(tiny_dirs["qwen2_vl"], sparsity="magnitude", sparsity_ratio=0.5)
    with pytest.raises(ValueError, match="the model is sparsified"):
        quantize(model, None, "rtn", 4, 32)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
