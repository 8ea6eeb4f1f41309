"""Weight-only quantization (W4A16, W3, W2): RTN, GPTQ and AWQ, with packed 4-bit storage and int4 kernels.

`quantize(model, processor, "gptq", bits=4, group_size=128)` replaces the target Linear layers of a loaded model
with `QuantizedLinear` modules (packed codes, group scales and zeros) and returns a `QuantizationReport`.
Calibration is the sparsity methods' (`vlmcompress.sparsity`): image-text samples through the model's own
processor, then block by block, each block seeing the already-quantized blocks' outputs. Each method is one
small module (`rtn`, `gptq`, `awq`) with a `METHOD` registry entry and a function on plain tensors;
`packing` holds the module and its kernels, `checkpoint` the save/load round trip.
"""

from __future__ import annotations

import time

import torch

from ..registry import Registry
from ..sparsity import _bar, _normalize_targets, _PlainForward
from ..sparsity.calibration import DEFAULT_NUM_SAMPLES, prepare_calibration
from ..sparsity.sequential import calibrate_blocks, find_stacks
from . import awq, gptq, rtn
from .awq import awq_quantize, awq_scales
from .base import (
    BITS, COMMON_OPTIONS, DEFAULT_BITS, DEFAULT_GROUP_SIZE, GROUP_SIZES, QUANT_TARGETS, QuantMethod,
    check_group_divides, dequantize_groups, quantize_groups, validate_bits, validate_group_size,
)
from .checkpoint import QUANT_FILE, QuantizationReport, install_save_hook, read_quantization
from .gptq import gptq_quantize
from .packing import QuantizedLinear, pack_codes, unpack_codes

QUANT_METHODS = Registry("weight quantization")
for _method in (rtn, gptq, awq):
    QUANT_METHODS.register(_method.METHOD)


def quant_option_names(method: str) -> set[str]:
    """The keyword options `method` accepts (common ones and its own)."""
    return QUANT_METHODS.option_names(method)


def validate_quant_args(method, bits=DEFAULT_BITS, group_size=DEFAULT_GROUP_SIZE, **options) -> tuple[str, int, int, dict]:
    """Check method, bits, group size and options; return (method name, bits, group size, the method's options
    with its defaults). ValueError naming the valid choices otherwise."""
    spec = QUANT_METHODS.lookup(method)
    bits, group_size = validate_bits(bits), validate_group_size(group_size)
    if "targets" in options:
        _normalize_targets(options["targets"], QUANT_TARGETS)
    own = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    unknown = sorted(set(own) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for quantization method {spec.name!r}; "
                         f"valid options: {sorted(quant_option_names(spec.name))}")
    own = {**spec.options, **own}
    return spec.name, bits, group_size, spec.check(own) if spec.check is not None else own


def quantize(
    model,
    processor,
    method: str,
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP_SIZE,
    calibration=None,
    *,
    targets=("language_model",),
    num_samples: int = DEFAULT_NUM_SAMPLES,
    progress: bool = True,
    calibration_seed: int = 0,
    **options,
) -> QuantizationReport:
    """Quantize `model`'s target Linear weights in place (replaced by `QuantizedLinear`); return a report.

    Args:
        model: a loaded image-text-to-text model (as for `vlmcompress.sparsity.sparsify`).
        processor: the model's processor (turns calibration samples into inputs; RTN uses none).
        method: "rtn", "gptq" or "awq" (`QUANT_METHODS`).
        bits: 2, 3 or 4 (codes are stored 4 bits each whatever the value).
        group_size: 32, 64, 128 or 256 input columns per scale and zero point; must divide every target layer's
            input width.
        targets: as for `sparsify`, and "lm_head": the output head too (not where it shares its weight with the
            input embeddings). At batch-1 decoding the head is a quarter of a W4 model's bytes read per step.
        calibration, num_samples, progress, calibration_seed: as for `sparsify`.
        **options: the method's own: gptq `blocksize` (128), `percdamp` (0.01), `act_order` (False);
            awq `n_grid` (20), `max_tokens` (4096).
    """
    name, bits, group_size, opts = validate_quant_args(method, bits, group_size, **options)
    spec = QUANT_METHODS[name]
    targets = _normalize_targets(targets, QUANT_TARGETS)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("the model is already quantized: quantize the original (unquantized) model")
    if getattr(model, "sparsity_report", None) is not None:
        raise ValueError("the model is sparsified, and GPTQ's and AWQ's updates would refill the pruned zeros: "
                         "quantize the dense model (quantization and sparsity are not combined)")
    stacks = find_stacks(model, targets)
    for stack in stacks:
        for linears in stack.linears.values():
            for lname, linear in linears.items():
                check_group_divides(lname, linear.in_features, group_size)
    if spec.stats != "none" and calibration is not None and hasattr(calibration, "__len__") and len(calibration) == 0:
        prepare_calibration(processor, calibration, num_samples)  # raises the empty-set error

    started = time.perf_counter()
    report = QuantizationReport(name, bits, group_size, targets, options=dict(opts))

    def quantize_block(block_name, linears, collector):
        for lname, linear in linears.items():
            stats = collector.stats.pop(lname) if collector is not None else None
            if spec.stats == "inputs":
                stats = (stats[0] / collector.tokens[lname], torch.cat(stats[1]))
            codes, scales, zeros, input_scale = spec.quantize(linear.weight.data.float(), stats, bits, group_size,
                                                              **opts)
            dtype = linear.weight.dtype
            module = QuantizedLinear.from_codes(linear, codes, scales.to(dtype), zeros, bits,
                                                None if input_scale is None else input_scale.to(dtype))
            model.set_submodule(lname, module)
            report.add_layer(lname, linear, module)

    with _PlainForward(model):
        samples = []
        if spec.stats != "none":
            samples = prepare_calibration(processor, calibration, num_samples, calibration_seed)
            report.num_samples = len(samples)
        for stack in stacks:
            if spec.stats == "none":
                for block_name, linears in stack.linears.items():
                    quantize_block(block_name, linears, None)
                continue
            rows = -(-opts["max_tokens"] // len(samples)) if spec.stats == "inputs" else None
            bar = _bar(progress, len(samples) + len(stack.blocks), f"{name}: {stack.target}")
            try:
                calibrate_blocks(model, stack, samples, spec.stats, quantize_block, bar, rows)
            finally:
                bar.close()
    report.seconds = time.perf_counter() - started
    model.quantization_report = report
    install_save_hook(model)
    return report

__all__ = [
    "quantize", "QUANT_METHODS", "QUANT_TARGETS", "validate_quant_args", "quant_option_names", "QuantizedLinear",
    "QuantMethod",
    "QuantizationReport", "read_quantization", "QUANT_FILE", "BITS", "GROUP_SIZES", "DEFAULT_BITS", "DEFAULT_GROUP_SIZE",
    "quantize_groups", "dequantize_groups", "gptq_quantize", "awq_quantize", "awq_scales", "pack_codes",
    "unpack_codes",
]
