"""Fewer kernels in a static decoding step (`StaticDecoding`).

Replayed from a CUDA graph, a step costs its matrix products, its attention, and the language model's small
elementwise kernels, which are most of its kernels and a quarter of its time (docs/benchmarks.md, "Where a
step's time goes"). Within a step, `StepKernels` runs three pieces of every decoder layer with fewer:

- each RMSNorm as `torch.rms_norm` and a multiply (`rms_norm`): 2 kernels instead of 8;
- where torch.compile makes GPU kernels (`vlmcompress.compilation`), the RMSNorm becomes 1 kernel, the
  rotary embedding of the queries and keys 1 (10 in transformers' `apply_rotary_pos_emb`; inductor's combo
  kernels put the two in one) and the SiLU-gated MLP's `silu(gate) * up` 1 (2). Only pointwise work is
  compiled: the matrix products stay cuBLAS's, the cache's writes and masks ours.

On CUDA the step's matrix products go through cuBLASLt (`torch.backends.cuda.preferred_blas_library`, set
within the step and put back after): at batch 8 cuBLAS runs a memset kernel for each layer's down projection,
cuBLASLt none, and a step of Qwen2-7B replays 0.07 ms faster on an H100 (docs/benchmarks.md).

A norm or MLP class is replaced only if its own forward gives the replacement's values on a random input
(checked once per class, activation and dtype), so a variant computing something else (Gemma's `1 + weight`
norm, a GELU MLP) keeps its forward. The rotary function is transformers' own, compiled as it is.

A pre-norm decoder layer (`h = x + attn(norm(x))`, `h + mlp(norm(h))`: Llama's, Qwen2's) runs its first
residual add with the post-attention RMSNorm (`decoder_layer`, `add_rms_norm`: one kernel where compiled). A
layer class is taken only if its own forward, with its attention stubbed, gives `decoder_layer`'s values on a
random input. (The second add inside the down projection's product, `torch.addmm`, saved nothing on an H100:
cuBLAS copies the residual into the output first, a copy kernel for each add kernel saved.)

The Linears that read the same input, an attention's q/k/v projections and a gated MLP's gate and up, run as
one matrix product each (`FusedProducts`): at decoding's few rows a product is bound by reading its weights,
and one long product reads them faster than several short ones. For that their weights (and biases) are
moved, once, into one buffer of which each Linear keeps a view (`fuse_linears`): no second copy is held.
Quantized layers (`QuantizedLinear`) are fused the same way, their codes (stored, or repacked for tinygemm), scales
and zeros each in one buffer (`fuse_quantized_linears`), unless AWQ gave each its own input scale.
"""

from __future__ import annotations

import functools
import itertools
import sys

import torch
import torch.nn.functional as F

from .. import compilation
from ..glue import rotary_function_name
from ..quantization.packing import QuantizedLinear, fuse_quantized_linears


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, `weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)` with float32 statistics, as
    one `torch.rms_norm` kernel (which accumulates in float32 and rounds to the input's dtype) and one multiply."""
    return weight * torch.rms_norm(hidden, (hidden.shape[-1],), eps=eps)


def add_rms_norm(hidden: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """`(rms_norm(residual + hidden), residual + hidden)`: a decoder layer's residual add and the norm after it."""
    total = residual + hidden
    return rms_norm(total, weight, eps), total


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def plain_weights(linears: list[torch.nn.Module]) -> bool:
    """Whether `linears` are dense Linears over one input, on one device and dtype, all with a bias or none
    (not semi-structured sparse, quantised or offloaded weights, which keep their own products)."""
    if not all(isinstance(linear, torch.nn.Linear) and not hasattr(linear, "_hf_hook") for linear in linears):
        return False
    tensors = [linear.weight for linear in linears] + [linear.bias for linear in linears if linear.bias is not None]
    first = linears[0].weight
    return (all(type(t.data) is torch.Tensor and t.layout == torch.strided and t.device == first.device
                and t.device.type != "meta" and t.dtype == first.dtype for t in tensors)
            and len({linear.in_features for linear in linears}) == 1
            and len({linear.bias is None for linear in linears}) == 1)


def consecutive_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor over `tensors` (concatenated along their first dimension) if they lie one after the other in
    one storage, else None."""
    for tensor, following in zip(tensors, tensors[1:]):
        if not (tensor.is_contiguous() and following.is_contiguous()
                and tensor.untyped_storage().data_ptr() == following.untyped_storage().data_ptr()
                and tensor.storage_offset() + tensor.numel() == following.storage_offset()):
            return None
    first = tensors[0].detach()
    return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride())


def fused_rows(modules: list[torch.nn.Module], name: str) -> torch.Tensor:
    """One tensor over the `name` tensors of `modules` (parameters or buffers), concatenated along their first
    dimension, whose consecutive rows are the modules' own: the first call moves them into one buffer, of which
    each module keeps a view (as the parameter or buffer it was), so that no second copy is held; later calls
    find them there. A tensor replaced since (a `to`, a new weight) is moved again."""
    tensors = [getattr(module, name) for module in modules]
    rows = consecutive_rows(tensors)
    if rows is None:
        rows = torch.cat([tensor.detach() for tensor in tensors])
        for module, tensor, part in zip(modules, tensors, rows.split([t.shape[0] for t in tensors])):
            setattr(module, name, torch.nn.Parameter(part, requires_grad=tensor.requires_grad)
                    if isinstance(tensor, torch.nn.Parameter) else part)
    return rows


def fuse_linears(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The weight and bias of one Linear computing all of `linears` (outputs concatenated), as tensors whose
    consecutive rows are the Linears' own parameters (`fused_rows`); None where `plain_weights` says no."""
    if not plain_weights(linears):
        return None
    return fused_rows(linears, "weight"), fused_rows(linears, "bias") if linears[0].bias is not None else None


class FusedProducts:
    """Linears reading the same input, run as one product over their fused weight (`fuse_linears`).

    `part(index, hidden)` stands in for the `index`-th Linear's forward: the first of them called on `hidden`
    runs the product for all, the others take their share of it. The shares are views of one output (last
    dimension sliced), which the attention's and MLP's reshapes of a decoding step's `[b, 1, out]` accept."""

    def __init__(self, linears: list[torch.nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None):
        self.linears, self.weight, self.bias = linears, weight, bias
        self.sizes = [linear.out_features for linear in linears]
        self._pending = None  # (input, outputs, indices taken) of the last product, until every share is taken

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(hidden, self.weight, self.bias).split(self.sizes, dim=-1)

    def part(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        pending = self._pending
        if pending is None or pending[0] is not hidden or index in pending[2]:
            pending = self._pending = (hidden, self(hidden), set())
        pending[2].add(index)
        if len(pending[2]) == len(self.sizes):
            self._pending = None
        return pending[1][index]

    @classmethod
    def of(cls, module: torch.nn.Module, names: tuple[str, ...]) -> "FusedProducts | None":
        linears = [getattr(module, name, None) for name in names]
        if any(linear is None for linear in linears):
            return None
        if all(isinstance(linear, QuantizedLinear) for linear in linears):
            fused = fuse_quantized_linears(linears)
            return None if fused is None else FusedQuantizedProducts(linears, fused)
        fused = fuse_linears(linears)
        return None if fused is None else cls(linears, *fused)


class FusedQuantizedProducts(FusedProducts):
    """`QuantizedLinear`s reading the same input, run as one quantized product over their fused codes, scales and
    zeros (`fuse_quantized_linears`)."""

    def __init__(self, layers: list[QuantizedLinear], fused: QuantizedLinear):
        super().__init__(layers, weight=None, bias=None)  # the weight and bias are `fused`'s
        self.fused = fused

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.fused(hidden).split(self.sizes, dim=-1)


class StepKernels:
    """Context manager: within it, the language model's RMSNorms, SiLU-gated MLPs and rotary embedding use
    fewer kernels, and (`fuse_products`) its attentions' q/k/v projections and MLPs' gate/up one product each
    (see the module docstring). `compile` compiles the pointwise pieces (if the compiler works on the model's
    device; else they run eagerly)."""

    _agrees: dict[tuple[type, type | None, torch.dtype], bool] = {}

    def __init__(self, language_model: torch.nn.Module, compile: bool = False, fuse_products: bool = True):
        parameter = next(language_model.parameters())
        self.compile = compile and compilation.compiler_works(parameter.device, parameter.dtype)
        modules = list(language_model.modules())
        self.norms = [module for module in modules if self._fusable_norm(module)]
        self.mlps = {module: FusedProducts.of(module, ("gate_proj", "up_proj")) if fuse_products else None
                     for module in modules if self._gated_silu_mlp(module)}
        self.layers = [module for module in modules if fuse_products and self._pre_norm_layer(module)]
        self.projections = [products for module in modules if fuse_products
                            and type(module).__name__.endswith("Attention")
                            and (products := FusedProducts.of(module, ("q_proj", "k_proj", "v_proj")))]
        # transformers' attention modules call their modeling file's rotary function by its global name
        self.rotary_functions = [] if not self.compile else list({
            (sys.modules[type(module).__module__], name) for module in modules
            if type(module).__name__.endswith("Attention") and hasattr(module, "q_proj")
            and (name := rotary_function_name(type(module))) is not None})
        self.upstream_rotary = {}
        self.blas_library = "cublaslt" if parameter.device.type == "cuda" else None
        self.upstream_blas_library = None

    def _pointwise(self, function):
        return compilation.compiled(function, compilation.COMPILE_BACKEND, combo_kernels=True) if self.compile \
            else function

    @classmethod
    def _agrees_with(cls, module: torch.nn.Module, replacement, probe_shape, variant: type | None = None,
                     original=torch.nn.Module.__call__) -> bool:
        """Whether `replacement(module, x)` gives `original(module, x)` (its forward) on a random x, checked once per
        class, `variant` (what configures the class, an MLP's activation) and dtype."""
        # the first float tensor: a quantized MLP's may be its layers' scales (codes are integers, and a
        # QuantizedLinear has no parameter but its bias)
        parameter = next(t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point())
        key = (type(module), variant, parameter.dtype)
        if key not in cls._agrees:
            dtype, device = parameter.dtype, parameter.device
            with torch.no_grad():
                probe = (torch.randn(*probe_shape, generator=torch.Generator().manual_seed(0)) * 3).to(device, dtype)
                expected, replaced = original(module, probe), replacement(module, probe)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            cls._agrees[key] = isinstance(expected, torch.Tensor) and expected.shape == replaced.shape \
                and torch.allclose(replaced, expected, rtol=tolerance, atol=tolerance)
        return cls._agrees[key]

    @classmethod
    def _fusable_norm(cls, module: torch.nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        if not (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and isinstance(weight, torch.Tensor) and weight.dim() == 1):
            return False
        return cls._agrees_with(module, lambda norm, x: rms_norm(x, norm.weight, norm.variance_epsilon),
                                (2, weight.numel()))

    @classmethod
    def _gated_silu_mlp(cls, module: torch.nn.Module) -> bool:
        parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(part, (torch.nn.Linear, QuantizedLinear)) for part in parts) \
                or not hasattr(module, "act_fn"):
            return False
        return cls._agrees_with(module, lambda mlp, x: gated_mlp(silu_gate, mlp, None, x), (2, parts[0].in_features),
                                type(module.act_fn))

    @classmethod
    def _pre_norm_layer(cls, module: torch.nn.Module) -> bool:
        parts = [getattr(module, name, None) for name in ("input_layernorm", "self_attn", "post_attention_layernorm",
                                                            "mlp")]
        if any(part is None for part in parts) or not (cls._fusable_norm(parts[0]) and cls._fusable_norm(parts[2])
                                                       and cls._gated_silu_mlp(parts[3])):
            return False

        def stubbed_attention(layer_call):  # the attention's work is not the layer's: any function of its input
            def call(layer, hidden):
                attention, held = layer.self_attn, vars(layer.self_attn).get("forward")
                attention.forward = lambda hidden_states, **kwargs: (hidden_states * 0.5 - 1, None)
                try:
                    return layer_call(layer, hidden)
                finally:
                    vars(attention).pop("forward")
                    if held is not None:
                        attention.forward = held
            return call

        fused = functools.partial(decoder_layer, add_rms_norm, silu_gate, None)
        return cls._agrees_with(module, stubbed_attention(fused),
                                (1, 2, parts[0].weight.numel()), original=stubbed_attention(torch.nn.Module.__call__))

    def __enter__(self):
        norm = self._pointwise(rms_norm)
        for module in self.norms:
            module.forward = functools.partial(norm_forward, norm, module)
        gate = self._pointwise(silu_gate)
        for module, products in self.mlps.items():
            module.forward = functools.partial(gated_mlp, gate, module, products)
        add_norm = self._pointwise(add_rms_norm)
        for layer in self.layers:
            layer.forward = functools.partial(decoder_layer, add_norm, gate, self.mlps[layer.mlp], layer)
        for products in self.projections:
            for index, linear in enumerate(products.linears):
                linear.forward = functools.partial(products.part, index)
        for modeling, name in self.rotary_functions:
            self.upstream_rotary[modeling, name] = getattr(modeling, name)
            setattr(modeling, name, self._pointwise(getattr(modeling, name)))
        if self.blas_library is not None:
            self.upstream_blas_library = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library(self.blas_library)

    def __exit__(self, *exc_info):
        shares = [linear for products in self.projections for linear in products.linears]
        for module in self.norms + list(self.mlps) + self.layers + shares:
            vars(module).pop("forward", None)
        for (modeling, name), upstream in self.upstream_rotary.items():
            setattr(modeling, name, upstream)
        self.upstream_rotary = {}
        if self.upstream_blas_library is not None:
            torch.backends.cuda.preferred_blas_library(self.upstream_blas_library)
            self.upstream_blas_library = None


def norm_forward(norm_function, norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return norm_function(hidden, norm.weight, norm.variance_epsilon)


def gated_mlp(gate_function, mlp: torch.nn.Module, gate_and_up: FusedProducts | None,
              hidden: torch.Tensor) -> torch.Tensor:
    gate, up = gate_and_up(hidden) if gate_and_up is not None else (mlp.gate_proj(hidden), mlp.up_proj(hidden))
    return mlp.down_proj(gate_function(gate, up))


def decoder_layer(add_norm, gate_function, gate_and_up: FusedProducts | None, layer: torch.nn.Module,
                  hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A pre-norm decoder layer's forward (Llama's, Qwen2's) whose first residual add is `add_norm`'s
    (`add_rms_norm`)."""
    if args:  # transformers passes all but the hidden states by name; anything else takes the layer's own forward
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    norm = layer.post_attention_layernorm
    hidden, residual = add_norm(attended, hidden_states, norm.weight, norm.variance_epsilon)
    return residual + gated_mlp(gate_function, layer.mlp, gate_and_up, hidden)
