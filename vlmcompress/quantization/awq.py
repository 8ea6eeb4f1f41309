"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024).

Formula: per input channel j, s_j = mean_tokens |x_j|^alpha, normalised by sqrt(max s x min s); the layer is
quantized as Q(W diag(s)) and its input divided by s, so y = (x / s) Q(W diag(s))^T. alpha is searched over
{0, 1/n_grid, ..., (n_grid - 1)/n_grid} (n_grid = 20), keeping the one whose output on the calibration tokens
is closest to the full-precision output (mean squared error); alpha = 0 is plain round-to-nearest, so AWQ is
never worse than RTN on those tokens.

Departures from the reference code, which folds 1/s into the preceding norm or layer and searches one s for the
layers that share an input: here each layer keeps its own 1/s as an `input_scale` multiplied into its input
(one elementwise product a layer; no architecture-specific folding) and its own alpha, searched on its own
output. The reference's weight-clipping search is not done. The error is measured on at most `max_tokens`
tokens (evenly spaced in each sample); mean |x| uses every token.
"""

from __future__ import annotations

import torch

from .base import QuantMethod, dequantize_groups, quantize_groups


def awq_scales(mean_abs_input: torch.Tensor, alpha: float) -> torch.Tensor:
    scales = mean_abs_input.pow(alpha).clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def awq_quantize(weight: torch.Tensor, mean_abs_input: torch.Tensor, inputs: torch.Tensor, bits: int,
                 group_size: int, n_grid: int = 20):
    """Search alpha and quantize `weight` [out, in] given mean |x| per input [in] and calibration inputs [tokens, in].

    Returns (codes, scales, zeros, input_scale = 1/s, chosen alpha, the error of every alpha), computed in float32
    (float64 if the inputs are float64)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W, X, mean_abs_input = weight.detach().to(dtype), inputs.to(dtype), mean_abs_input.to(dtype)
    reference = X @ W.t()
    best = None
    errors = []
    for step in range(n_grid):
        alpha = step / n_grid
        s = awq_scales(mean_abs_input, alpha)
        codes, scales, zeros = quantize_groups(W * s, bits, group_size)
        error = ((X / s) @ dequantize_groups(codes, scales, zeros).t() - reference).pow(2).mean().item()
        errors.append(error)
        if best is None or error < best[0]:
            best = (error, codes, scales, zeros, 1 / s, alpha)
    return (*best[1:], errors)


def _quantize(weight, stats, bits, group_size, n_grid=20, max_tokens=4096):
    mean_abs, inputs = stats
    return awq_quantize(weight, mean_abs, inputs, bits, group_size, n_grid)[:4]


def _check(options: dict) -> dict:
    for name in ("n_grid", "max_tokens"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return options


METHOD = QuantMethod(
    name="awq", stats="inputs", quantize=_quantize, options={"n_grid": 20, "max_tokens": 4096}, check=_check,
    description="per-input-channel scales mean|x|^alpha, alpha searched on the layer's output error",
)
