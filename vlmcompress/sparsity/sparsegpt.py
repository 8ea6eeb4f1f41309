"""SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
ICML 2023).

Formula: with H = X X^T + lambda I (lambda = 0.01 x mean diag, over the calibration tokens), columns are
pruned left to right; weight w_q is pruned by saliency w_q^2 / [H_F^-1]_qq and the rest of its row is
updated by delta = -(w_q / [H_F^-1]_qq) [H_F^-1]_q,: (OBS), where F is the set of columns not yet processed.

As in the paper: the sequence of inverses H_F^-1 comes from one Cholesky factor of H^-1; updates are applied
lazily per block of `blocksize` (128) columns; the unstructured mask is chosen per block of 128 columns
(the floor(ratio x rows x 128) lowest saliencies of the block, the adaptive mask selection), an N:M mask
per group of M columns when the group is reached. Inputs that are always zero (H_jj = 0) get H_jj = 1 as in
the reference code, but their weights are not zeroed outside the mask, so the sparsity is exactly the mask's.
Should H + lambda I still fail the Cholesky (numerically), lambda is raised tenfold, up to three times.
"""

from __future__ import annotations

import torch

from .base import SparsityMethod, mask_lowest, prune_count


def inverse_hessian_factor(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1: row q of U, divided by U_qq, is row q of H_F^-1 with
    F = {q, q+1, ...} (SparseGPT's and GPTQ's sequence of inverses). Zero-diagonal (dead) inputs get H_qq = 1
    (H is changed in place there)."""
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(4):  # 10x more dampening if H + lambda I is numerically not positive definite
        damp = percdamp * 10**attempt * torch.mean(torch.diagonal(H))
        try:
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H + damp * eye)), upper=True)
        except torch.linalg.LinAlgError:
            if attempt == 3:
                raise


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    ratio: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [out, in] given H = sum over tokens of x x^T [in, in]. Returns (new weight, mask).

    Computes in float32 (float64 if the inputs are float64); the returned weight has that dtype.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(device=W.device, dtype=dtype).clone()
    rows, cols = W.shape
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize={blocksize} must be a multiple of M={nm[1]} for an N:M pattern")
    U = inverse_hessian_factor(H, percdamp)
    mask = torch.zeros_like(W, dtype=torch.bool)

    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1 = W[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        d = torch.diagonal(U1)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        if nm is None:
            M1 = mask_lowest(W1**2 / (d**2).reshape(1, -1), ratio, None, dim_group="layer")
        else:
            M1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(b1 - b0):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = W1[:, i:i + m] ** 2 / (d[i:i + m] ** 2).reshape(1, -1)
                M1[:, i:i + m] = mask_lowest(score, 1.0 - n / m, nm)
            w = W1[:, i]
            q = w.masked_fill(M1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b0:b1] = Q1
        mask[:, b0:b1] = M1
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    return W, mask


def expected_pruned(rows: int, cols: int, ratio: float, nm=None, blocksize: int = 128) -> int:
    """How many weights SparseGPT prunes in a [rows, cols] layer (unstructured: per block of columns)."""
    if nm is not None:
        return rows * cols // nm[1] * (nm[1] - nm[0])
    return sum(prune_count(ratio, rows * (min(b + blocksize, cols) - b)) for b in range(0, cols, blocksize))


def _prune(weight, stats, ratio, nm, blocksize: int = 128, percdamp: float = 0.01):
    return sparsegpt_prune(weight, stats, ratio, nm, blocksize=blocksize, percdamp=percdamp)


def _check(ratio, nm, options: dict) -> dict:
    blocksize = options["blocksize"]
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1 or (nm and blocksize % nm[1]):
        raise ValueError(f"blocksize must be a positive int (a multiple of M for N:M), got {blocksize!r}")
    return options


METHOD = SparsityMethod(
    name="sparsegpt", stats="hessian", prune=_prune, options={"blocksize": 128, "percdamp": 0.01}, check=_check,
    description="OBS pruning + reconstruction from H = X X^T (blocks of 128, lambda = 0.01 mean diag)",
)
