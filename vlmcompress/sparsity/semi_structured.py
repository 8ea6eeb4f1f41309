"""2:4 weights as PyTorch semi-structured sparse tensors (CUDA only), for real 2:4 speed-ups.

`to_semi_structured(model)` replaces the weight of every Linear layer whose weight already follows the 2:4
pattern (at most 2 nonzeros in every 4 consecutive inputs of a row: prune with pattern="2:4" first) by
`torch.sparse.to_sparse_semi_structured(weight)`, so matmuls run on the sparse tensor cores
(cuSPARSELt / CUTLASS). Needs a CUDA GPU of compute capability >= 8.0 and fp16/bf16 (or int8) weights; the
kernels also need shape multiples (the rows and columns of the weight multiples of 64 for fp16/bf16), layers
that do not fit are left dense and listed. Conversion is not reversible in place: save before converting.
These kernels have been slower than dense bf16 matmuls at the Qwen2-7B shapes (docs/benchmarks.md, "2:4
weight sparsity"): use it to measure, not as a default.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _flat_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Semi-structured tensors take 2-D inputs only (a 3-D input hits an unsupported `expand`).
    out = F.linear(x.reshape(-1, x.shape[-1]), module.weight, module.bias)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of each row."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def to_semi_structured(model: nn.Module, *, min_multiple: int = 64, names=None) -> dict:
    """Convert the 2:4-sparse Linear weights of `model` (CUDA) to semi-structured sparse tensors.

    Returns {"converted": [names], "skipped": {name: reason}}. Raises RuntimeError on CPU or without support.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured needs a CUDA GPU (compute capability >= 8.0): "
                           "semi-structured 2:4 kernels do not exist on the CPU; the 2:4 zeros in the weights "
                           "are already there, only the sparse kernels are missing")
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no torch.sparse.to_sparse_semi_structured")
    converted, skipped = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (names is not None and name not in names):
            continue
        weight = module.weight
        if weight.device.type != "cuda":
            skipped[name] = f"on {weight.device}"
        elif weight.dtype not in (torch.float16, torch.bfloat16, torch.int8):
            skipped[name] = f"dtype {weight.dtype} (needs float16/bfloat16/int8)"
        elif weight.shape[0] % min_multiple or weight.shape[1] % min_multiple:
            skipped[name] = f"shape {tuple(weight.shape)} not a multiple of {min_multiple}"
        elif not is_two_four(weight.data):
            skipped[name] = "not 2:4 sparse"
        else:
            module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(weight.data),
                                         requires_grad=False)
            module.forward = types.MethodType(_flat_linear, module)
            converted.append(name)
    if not converted and skipped:
        raise RuntimeError(f"no Linear weight could be converted to 2:4 semi-structured; e.g. "
                           f"{next(iter(skipped.items()))}")
    return {"converted": converted, "skipped": skipped}
