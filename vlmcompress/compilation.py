"""torch.compile for vlmcompress's own small kernels, where inductor makes GPU kernels.

Used for pointwise and reduction work that eager PyTorch runs as many kernels over the same memory: a static
decoding step's norms, rotary embedding and MLP gates (`decoding.step_kernels`), and the softmax statistics
that score a prompt's keys (`vlmcompress.scoring`). Only on CUDA with triton installed (`compile_by_default`),
and only once a probe has compiled and agreed with eager (`compiler_works`); otherwise, with one warning,
the same functions run uncompiled. `DecodingOptions(compile=False)` turns it off (bench/decode_step.py --compile).
"""

from __future__ import annotations

import functools
import warnings

import torch

from .decoding.options import active

COMPILE_BACKEND = "inductor"

# Inductor's note when it splits a softmax's reduction (the prompt scoring's statistics at batch 1, torch 2.11):
# a hint about its own lowering, which nothing in vlmcompress or its user's code can act on.
warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled on the fly", category=UserWarning,
                        module=r"torch\._inductor\.lowering")


@functools.lru_cache(maxsize=None)
def compiled(function, backend: str, combo_kernels: bool = False):
    """`function` compiled once per process; shapes become dynamic at the second shape seen, so batches,
    prompts and models share one compilation rather than running into dynamo's recompilation limit.
    `combo_kernels`: inductor runs independent pointwise kernels of `function` as one (the decoding step's
    rotary embedding of queries and keys: 28 fewer kernels a step of Qwen2-7B, 0.045 ms of 5.9 on an H100,
    docs/benchmarks.md; not measured for the prompt's scoring kernels, which keep them apart)."""
    if backend != "inductor":
        return torch.compile(function, backend=backend)
    # inductor rounds each intermediate to its dtype as eager does (a bf16 residual sum before the norm that reads
    # it), so that compiled steps compute transformers' values, not more precise ones
    options = {"emulate_precision_casts": True, "combo_kernels": combo_kernels}
    return torch.compile(function, backend=backend, options=options)


def _probe(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A norm, a gate and a softmax row sum: the kinds of work vlmcompress compiles."""
    normed = weight * torch.rms_norm(hidden, (hidden.shape[-1],), eps=1e-6)
    return torch.nn.functional.silu(normed) * hidden + torch.softmax(hidden.float(), dim=-1).sum(dim=-2, keepdim=True)


def compiler_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `COMPILE_BACKEND` compiles on `device` and its kernels agree with eager: a missing triton or C
    compiler fails here, once, with a warning, instead of inside a decoding step or a prefill."""
    return _compiler_works(device, dtype, COMPILE_BACKEND)


@functools.lru_cache(maxsize=None)
def _compiler_works(device: torch.device, dtype: torch.dtype, backend) -> bool:
    hidden = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    weight = torch.ones(64, device=device, dtype=dtype)
    return agrees_or_warns(lambda: compiled(_probe, backend)(hidden, weight), lambda: _probe(hidden, weight),
                           2e-2 if dtype != torch.float32 else 1e-5, f"torch.compile ({backend})", "eager",
                           "its kernels run uncompiled", device)


def agrees_or_warns(candidate, reference, tolerance: float, what: str, reference_name: str, instead: str,
                    device: torch.device) -> bool:
    """Whether `candidate()` runs and gives `reference()`'s values (to `tolerance`): the once-per-device probe of
    an optional fast path. If not, one warning says so and what runs `instead`."""
    try:
        agree = torch.allclose(candidate().float(), reference().float(), rtol=tolerance, atol=tolerance)
    except Exception as error:  # whatever the compiler stack raises: vlmcompress goes on without it
        warnings.warn(f"vlmcompress: {what} does not work on {device} ({error!r}); {instead}", stacklevel=4)
        return False
    if not agree:
        warnings.warn(f"vlmcompress: {what} gave other values than {reference_name} on {device}; {instead}",
                      stacklevel=4)
    return agree


def compile_by_default(device: torch.device) -> bool:
    """Compile where inductor makes GPU kernels: CUDA with triton installed."""
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def compiled_where_it_works(function, device: torch.device, dtype: torch.dtype):
    """`function` compiled if the active options say so (`DecodingOptions.compile`), `compile_by_default(device)`
    and the compiler works there; else `function`."""
    if active().compile and compile_by_default(device) and compiler_works(device, dtype):
        return compiled(function, COMPILE_BACKEND)
    return function
