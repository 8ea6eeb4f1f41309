"""Fewer kernels in a static decoding step (`StaticDecoding`).

Replayed from a CUDA graph, a step costs its matrix products, its attention, and the language model's small
elementwise kernels: on Qwen2-VL-7B at batch 8 those were 1118 kernels and 2.1 ms of an 8.3 ms step
(docs/benchmarks.md). Within a step, `StepKernels` runs three pieces of every decoder layer with fewer:

- each RMSNorm as `torch.rms_norm` and a multiply (`rms_norm`): 2 kernels instead of 8;
- where torch.compile makes GPU kernels (`vlmcompress.compilation`), the RMSNorm becomes 1 kernel, the
  rotary embedding of the queries and keys 2 (10 in transformers' `apply_rotary_pos_emb`) and the SiLU-gated
  MLP's `silu(gate) * up` 1 (2). Only pointwise work is compiled: the matrix products stay cuBLAS's, the
  cache's writes and masks ours.

A norm or MLP class is replaced only if its own forward gives the replacement's values on a random input
(checked once per class, activation and dtype), so a variant computing something else (Gemma's `1 + weight`
norm, a GELU MLP) keeps its forward. The rotary function is transformers' own, compiled as it is.
"""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

from .. import compilation


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm, `weight * (x * rsqrt(mean(x²) + eps)).to(x.dtype)` with float32 statistics, as
    one `torch.rms_norm` kernel (which accumulates in float32 and rounds to the input's dtype) and one multiply."""
    return weight * torch.rms_norm(hidden, (hidden.shape[-1],), eps=eps)


def silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class StepKernels:
    """Context manager: within it, the language model's RMSNorms, SiLU-gated MLPs and rotary embedding use
    fewer kernels (see the module docstring). `compile` compiles the pointwise pieces (if the compiler works
    on the model's device; else they run eagerly)."""

    _agrees: dict[tuple[type, type | None, torch.dtype], bool] = {}

    def __init__(self, language_model: torch.nn.Module, compile: bool = False):
        parameter = next(language_model.parameters())
        self.compile = compile and compilation.compiler_works(parameter.device, parameter.dtype)
        modules = list(language_model.modules())
        self.norms = [module for module in modules if self._fusable_norm(module)]
        self.mlps = [module for module in modules if self._gated_silu_mlp(module)] if self.compile else []
        # transformers' attention modules call their modeling file's `apply_rotary_pos_emb` by its global name
        self.rotary_modules = [] if not self.compile else list({
            sys.modules[type(module).__module__] for module in modules
            if type(module).__name__.endswith("Attention") and hasattr(module, "q_proj")
            and callable(getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None))})
        self.upstream_rotary = {}

    def _pointwise(self, function):
        return compilation.compiled(function, compilation.COMPILE_BACKEND) if self.compile else function

    @classmethod
    def _agrees_with(cls, module: torch.nn.Module, replacement, probe_shape, variant: type | None = None) -> bool:
        """Whether `replacement(module, x)` gives `module(x)` on a random x, checked once per class, `variant`
        (what configures the class, an MLP's activation) and dtype."""
        parameter = next(module.parameters())
        key = (type(module), variant, parameter.dtype)
        if key not in cls._agrees:
            dtype, device = parameter.dtype, parameter.device
            with torch.no_grad():
                probe = (torch.randn(*probe_shape, generator=torch.Generator().manual_seed(0)) * 3).to(device, dtype)
                expected, replaced = module(probe), replacement(module, probe)
            tolerance = 1e-5 if dtype == torch.float32 else 2e-2
            cls._agrees[key] = torch.allclose(replaced, expected, rtol=tolerance, atol=tolerance)
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
        if not all(isinstance(part, torch.nn.Linear) for part in parts) or not hasattr(module, "act_fn"):
            return False
        return cls._agrees_with(module, lambda mlp, x: gated_mlp(silu_gate, mlp, x), (2, parts[0].in_features),
                                type(module.act_fn))

    def __enter__(self):
        norm = self._pointwise(rms_norm)
        for module in self.norms:
            module.forward = functools.partial(norm_forward, norm, module)
        gate = self._pointwise(silu_gate)
        for module in self.mlps:
            module.forward = functools.partial(gated_mlp, gate, module)
        for modeling in self.rotary_modules:
            self.upstream_rotary[modeling] = modeling.apply_rotary_pos_emb
            modeling.apply_rotary_pos_emb = self._pointwise(modeling.apply_rotary_pos_emb)

    def __exit__(self, *exc_info):
        for module in self.norms + self.mlps:
            vars(module).pop("forward", None)
        for modeling, upstream in self.upstream_rotary.items():
            modeling.apply_rotary_pos_emb = upstream
        self.upstream_rotary = {}


def norm_forward(norm_function, norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return norm_function(hidden, norm.weight, norm.variance_epsilon)


def gated_mlp(gate_function, mlp: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(gate_function(mlp.gate_proj(hidden), mlp.up_proj(hidden)))
