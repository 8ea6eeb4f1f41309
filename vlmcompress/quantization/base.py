"""What every weight-quantization method shares: the argument checks, the group-wise integer grid, the registry entry.

Conventions (all methods):

* A Linear weight `W` is `[out_features, in_features]`; its inputs are split into groups of `group_size`
  consecutive columns, and each (output row, group) has its own scale `s` and integer zero point `z`.
* The grid is asymmetric min-max (AWQ's and GPTQ's): over the group's weights with 0 included
  (min(w_min, 0), max(w_max, 0), so an exact 0 stays exactly 0), `s = (max - min) / (2^bits - 1)`,
  `z = round(-min / s)`; a weight becomes `q = clamp(round(w / s) + z, 0, 2^bits - 1)` and reads back as
  `(q - z) * s`. An all-zero group gets s = 1, z = 0.
* Codes are stored in 4-bit containers (`packing.QuantizedLinear`) whatever `bits` is (2, 3 or 4): W3 and W2
  change the accuracy, not the bytes.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..sparsity.sequential import STACK_TARGETS

BITS = (2, 3, 4)
GROUP_SIZES = (32, 64, 128, 256)  # those of the int4 matmul kernels (tinygemm); a group never spans two rows
DEFAULT_BITS, DEFAULT_GROUP_SIZE = 4, 128  # what load(quant=...) and quantize() use unless told
QUANT_TARGETS = STACK_TARGETS  # what `quantize` replaces: sparsity's targets and the output head


def validate_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in BITS:
        raise ValueError(f"quant_bits={bits!r} is not supported: use one of {list(BITS)} (weights are stored in "
                         "4-bit containers; 8-bit or 16-bit weights are not quantized here)")
    return int(bits)


def validate_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size not in GROUP_SIZES:
        raise ValueError(f"quant_group_size={group_size!r} is not supported: use one of {list(GROUP_SIZES)} "
                         "(input columns sharing one scale and zero point; the int4 kernels take these)")
    return int(group_size)


def check_group_divides(name: str, in_features: int, group_size: int) -> None:
    """ValueError naming the layer when the group size does not divide its input width."""
    if in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        raise ValueError(
            f"quant_group_size={group_size} does not divide the input width of {name} (in_features={in_features}): "
            f"use quant_group_size={fits[-1] if fits else 'one that divides every quantized layer'}"
            + (f" (any of {fits} fits this layer)" if fits else "") + ", or leave its part of the model out (targets=...)"
        )


def language_model_widths(config) -> dict[str, int]:
    """Input widths of the language model's Linear layers, read off a model config (before any weight loads)."""
    text = getattr(config, "text_config", None) or getattr(config, "llm_config", None) or config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    widths = {"q/k/v, gate/up (hidden_size)": text.hidden_size, "down_proj (intermediate_size)": text.intermediate_size}
    if heads and head_dim:
        widths["o_proj (heads x head_dim)"] = heads * head_dim
    return widths


def check_group_fits_config(config, group_size: int, targets=None) -> None:
    """`check_group_divides` for the language model's layers from the config alone (other targets are checked on
    the loaded layers); `targets` as `quantize` takes it, None for the default (the language model)."""
    from ..sparsity import _normalize_targets

    if "language_model" in _normalize_targets(targets or ("language_model",), QUANT_TARGETS):
        for name, width in language_model_widths(config).items():
            check_group_divides(f"the language model's {name}", width, group_size)


def grid_params(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point (as floats) of each row of `weight` [rows, group] -> ([rows], [rows])."""
    maxq = 2**bits - 1
    low = weight.amin(dim=1).clamp(max=0)
    high = weight.amax(dim=1).clamp(min=0)
    scale = (high - low) / maxq
    empty = scale == 0
    scale = torch.where(empty, torch.ones_like(scale), scale)
    zero = torch.where(empty, torch.zeros_like(scale), torch.round(-low / scale))
    return scale, zero


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (same dtype as `weight`) of `weight` [rows, cols] on a grid broadcast against it."""
    return torch.clamp(torch.round(weight / scale) + zero, 0, 2**bits - 1)


def quantize_groups(weight: torch.Tensor, bits: int, group_size: int):
    """Round-to-nearest codes of `weight` [out, in] on each group's min-max grid.

    Returns (codes [out, in] uint8, scales [out, in/group], zeros [out, in/group]) with scales and zeros in
    `weight`'s dtype (float32 for the arithmetic; the caller casts them to the model's)."""
    rows, cols = weight.shape
    grouped = weight.reshape(rows * cols // group_size, group_size)
    scale, zero = grid_params(grouped, bits)
    codes = quantize_codes(grouped, scale[:, None], zero[:, None], bits)
    return codes.reshape(rows, cols).to(torch.uint8), scale.reshape(rows, -1), zero.reshape(rows, -1)


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(q - z) * s, each group's scale and zero broadcast over its columns; [out, in] in float32 (float64 for
    float64 scales)."""
    dtype = torch.promote_types(scales.dtype, torch.float32)
    group_size = codes.shape[1] // scales.shape[1]
    s = scales.to(dtype).repeat_interleave(group_size, dim=1)
    z = zeros.to(dtype).repeat_interleave(group_size, dim=1)
    return (codes.to(dtype) - z) * s


# Keyword options of `quantize` that every method takes, besides its own (`QuantMethod.options`).
COMMON_OPTIONS = ("targets", "num_samples", "progress", "calibration_seed")


@dataclass(frozen=True)
class QuantMethod:
    """A registry entry: what calibration statistics a method needs and how it quantizes one layer.

    stats: "none" (RTN), "hessian" (X^T X, GPTQ) or "inputs" (mean |x| and a sample of inputs, AWQ).
    quantize(weight_fp32, stats, bits, group_size, **options) -> (codes uint8, scales, zeros, input_scale or None),
    where `input_scale` (AWQ) multiplies the layer's input before the quantized product.
    """

    name: str
    stats: str
    quantize: Callable
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    check: Callable | None = None  # check(options) -> options: the method's own options checked, before any weight

    def option_names(self) -> set[str]:
        return set(COMMON_OPTIONS) | set(self.options)
