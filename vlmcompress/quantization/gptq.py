"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
ICLR 2023).

Formula: with H = X X^T + lambda I (lambda = `percdamp` x mean diag, over the calibration tokens), columns are
quantized one at a time in order; after column q is rounded, the columns not yet quantized absorb its error:
W[:, F] -= ((w_q - quant(w_q)) / [H_F^-1]_qq) [H_F^-1]_{q, F}, F = {q, ...} (the OBS update of SparseGPT,
whose Cholesky factor of H^-1 gives every H_F^-1 at once: `sparsity.sparsegpt.inverse_hessian_factor`).

As in the reference code: updates are applied lazily per block of `blocksize` columns (rounded up to a multiple
of the group size); a group's grid (`base.grid_params`) is set from the already-updated weights when its first
column is reached; inputs never active on the calibration set (H_qq = 0) get H_qq = 1 and zero weights.
`act_order=True` quantizes columns by decreasing H_qq, the grids then taken from the original weights of each
group before any update (the reference's `static_groups`, which keeps groups contiguous for the packed format).
"""

from __future__ import annotations

import numbers

import torch

from ..sparsity.sparsegpt import inverse_hessian_factor
from .base import QuantMethod, grid_params, quantize_codes


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, blocksize: int = 128,
                  percdamp: float = 0.01, act_order: bool = False):
    """Quantize `weight` [out, in] given H = sum over tokens of x x^T [in, in].

    Returns (codes uint8 [out, in], scales, zeros [out, in / group]), computed in float32 (float64 if the inputs
    are float64)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(device=W.device, dtype=dtype).clone()
    rows, cols = W.shape
    W[:, torch.diagonal(H) == 0] = 0
    groups = cols // group_size
    scales = torch.zeros(rows, groups, dtype=dtype, device=W.device)
    zeros = torch.zeros_like(scales)
    order = torch.arange(cols, device=W.device)
    if act_order:
        for g in range(groups):
            scales[:, g], zeros[:, g] = grid_params(W[:, g * group_size:(g + 1) * group_size], bits)
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    group_of = (order // group_size).tolist()
    U = inverse_hessian_factor(H, percdamp)
    codes = torch.zeros_like(W)
    step = -(-blocksize // group_size) * group_size

    for b0 in range(0, cols, step):
        b1 = min(b0 + step, cols)
        W1 = W[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            g = group_of[b0 + i]
            if not act_order and (b0 + i) % group_size == 0:
                scales[:, g], zeros[:, g] = grid_params(W1[:, i:i + group_size], bits)
            w = W1[:, i]
            q = quantize_codes(w, scales[:, g], zeros[:, g], bits)
            codes[:, b0 + i] = q
            err = (w - (q - zeros[:, g]) * scales[:, g]) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    if act_order:
        codes = codes[:, torch.argsort(order)]
    return codes.to(torch.uint8), scales, zeros


def _quantize(weight, stats, bits, group_size, blocksize=128, percdamp=0.01, act_order=False):
    return (*gptq_quantize(weight, stats, bits, group_size, blocksize, percdamp, act_order), None)


def _check(options: dict) -> dict:
    blocksize, percdamp = options["blocksize"], options["percdamp"]
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int (columns updated lazily together), got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, numbers.Real) or not 0 < percdamp < 1:
        raise ValueError(f"percdamp must be a number in (0, 1) (dampening, share of mean diag H), got {percdamp!r}")
    if not isinstance(options["act_order"], bool):
        raise ValueError(f"act_order must be True or False, got {options['act_order']!r}")
    return options


METHOD = QuantMethod(
    name="gptq", stats="hessian", quantize=_quantize, options={"blocksize": 128, "percdamp": 0.01, "act_order": False},
    check=_check, description="column-by-column rounding with the inverse-Hessian error update (lazy blocks)",
)
