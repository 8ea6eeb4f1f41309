"""Parameter sparsity: magnitude, Wanda, SparseGPT and ECoFLaP, unstructured or N:M, with real calibration.

`sparsify(model, processor, "wanda", 0.5)` prunes a loaded model in place and returns a `SparsityReport`.
Masks are applied by writing exact zeros into the Linear weights, so `save_pretrained` / `from_pretrained`
keep the sparsity (and `save_pretrained` also writes `sparsity_report.json`). Each method is one small module
(`magnitude`, `wanda`, `sparsegpt`, `ecoflap`) with a `METHOD` registry entry and a function on plain tensors;
where the layers are and how calibration reaches them is `sequential`, the samples are `calibration`.
"""

from __future__ import annotations

import dataclasses
import time
import types

from . import ecoflap, magnitude, sparsegpt, wanda
from .base import (
    COMMON_OPTIONS, PATTERNS, SparsityMethod, check_nm_divides, check_nm_ratio, mask_lowest, parse_pattern, prune_count,
    validate_ratio,
)
from .calibration import DEFAULT_NUM_SAMPLES, default_calibration, prepare_calibration, synthetic_sample
from .ecoflap import ecoflap_allocate, zeroth_order_scores
from .magnitude import magnitude_mask
from .report import REPORT_FILE, LayerSparsity, SparsityReport, load_sparsity_report
from .semi_structured import to_semi_structured
from .sequential import TARGETS, calibrate_blocks, find_stacks, model_device
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_mask, wanda_score
from ..registry import Registry

SPARSITY_METHODS = Registry("sparsity")
for method in (magnitude, wanda, sparsegpt, ecoflap):
    SPARSITY_METHODS.register(method.METHOD)


def get_method(name) -> SparsityMethod:
    return SPARSITY_METHODS.lookup(name)


def sparsity_option_names(method: str) -> set[str]:
    """The keyword options `method` accepts (common ones and its own)."""
    return SPARSITY_METHODS.option_names(method)


def validate_sparsity_args(method, ratio, pattern="unstructured", **options):
    """Check method, ratio, pattern and options; return (method name, ratio as float, (N, M) or None).

    ValueError (naming the valid choices) for an unknown method, a ratio outside [0, 1) or not a number,
    a malformed pattern, an N:M pattern whose sparsity 1 - N/M differs from a nonzero ratio, and an unknown or
    bad option (`targets` or the method's own, `method_options`; ECoFLaP's coarse-stage options at N:M).
    """
    spec = get_method(method)
    ratio = validate_ratio(ratio)
    nm = parse_pattern(pattern)
    check_nm_ratio(ratio, nm, pattern)
    if "targets" in options:
        _normalize_targets(options["targets"])
    method_options(spec, ratio, nm, {k: v for k, v in options.items() if k not in COMMON_OPTIONS})
    return spec.name, ratio, nm


def method_options(spec: SparsityMethod, ratio: float, nm, options: dict) -> dict:
    """The method's own options, its defaults filled in and checked against the ratio and the N:M pattern."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sparsity method {spec.name!r}; "
                         f"valid options: {sorted(sparsity_option_names(spec.name))}")
    options = {**spec.options, **options}
    return spec.check(ratio, nm, options) if spec.check is not None else options


def _normalize_targets(targets, allowed=TARGETS) -> tuple:
    """A tuple of target names among `allowed`; a string may join several with "+" ("vision_tower+language_model")
    or be "all" (`TARGETS`)."""
    if isinstance(targets, str):
        targets = TARGETS if targets.strip() == "all" else tuple(t.strip() for t in targets.split("+"))
    targets = tuple(targets or ())
    if not targets or any(t not in allowed for t in targets):
        raise ValueError(f"targets={targets!r}: choose one or more of {list(allowed)}")
    return targets


def _save_pretrained_with_report(self, save_directory, *args, **kwargs):
    """`save_pretrained` of the model class, then `sparsity_report.json` beside the weights."""
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    report = getattr(self, "sparsity_report", None)
    if report is not None and kwargs.get("is_main_process", True):
        report.save(save_directory)
    return out


_save_pretrained_with_report.__name__ = "save_pretrained"  # bound copies pickle as getattr(model, "save_pretrained")


class _PlainForward:
    """Switch off the forked models' visual-token pruning and KV eviction while calibrating."""

    def __init__(self, model):
        self.model = model
        self.saved = getattr(model, "compression", None)

    def __enter__(self):
        if dataclasses.is_dataclass(self.saved) and hasattr(self.saved, "prune"):
            self.model.compression = dataclasses.replace(self.saved, prune=None, kv=None)
        self.training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        if self.saved is not None:
            self.model.compression = self.saved
        self.model.train(self.training)


def _bar(progress, total, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def sparsify(
    model,
    processor,
    method: str,
    ratio: float,
    pattern: str = "unstructured",
    calibration=None,
    *,
    targets=("language_model",),
    num_samples: int = DEFAULT_NUM_SAMPLES,
    progress: bool = True,
    calibration_seed: int = 0,
    **options,
) -> SparsityReport:
    """Prune `model`'s Linear weights in place and return a `SparsityReport`.

    Args:
        model: a loaded image-text-to-text model (LLaVA-OneVision, Qwen2-VL/2.5-VL, InternVL, or any model
            with `model.model.language_model.layers`).
        processor: the model's processor (turns calibration samples into inputs).
        method: "magnitude", "wanda", "sparsegpt" or "ecoflap" (`SPARSITY_METHODS`).
        ratio: share of each target weight zeroed, in [0, 1); 0 leaves the model untouched.
        pattern: "unstructured", "2:4" or "4:8" (any "N:M": N nonzeros kept in every M inputs; ratio must then
            be 1 - N/M).
        calibration: None (the default synthetic set of `num_samples` image-caption pairs), a
            `datasets.Dataset` or list of dicts with "image" and "question"/"text" (optionally "answer"), or
            processed inputs. Magnitude uses none.
        targets: which parts are pruned: any of "language_model" (default), "vision_tower", "projector"
            (a tuple, or a string joining them with "+", or "all").
        num_samples: calibration samples used (default 128).
        progress: tqdm progress bars.
        calibration_seed: seed of the default set (and of ECoFLaP's noise).
        **options: the method's own options (`SPARSITY_METHODS[method].options`): magnitude `comparison`
            ("layer"/"row"); sparsegpt `blocksize` (128), `percdamp` (0.01); ecoflap, unstructured only (at N:M
            it has no coarse stage), `max_layer_ratio` (ratio + 0.1), `min_layer_ratio` (0), `zo_samples` (32),
            `zo_batch_size` (8), `zo_eps` (1e-3), `num_noise` (1), `zo_granularity` ("block").
    """
    name, ratio, nm = validate_sparsity_args(method, ratio, pattern)
    spec = SPARSITY_METHODS[name]
    opts = method_options(spec, ratio, nm, options)
    targets = _normalize_targets(targets)
    if calibration is not None and hasattr(calibration, "__len__") and len(calibration) == 0:
        prepare_calibration(processor, calibration, num_samples)  # raises the empty-set error
    stacks = find_stacks(model, targets)
    for stack in stacks:
        for linears in stack.linears.values():
            for lname, linear in linears.items():
                check_nm_divides(lname, linear.in_features, nm)

    started = time.perf_counter()
    report = SparsityReport(name, ratio, pattern, targets, options={**opts, "num_samples": num_samples})
    block_ratio = {block: ratio for stack in stacks for block, _ in stack.blocks}

    if ratio > 0:
        with _PlainForward(model):
            samples = []
            if spec.stats != "none":
                samples = prepare_calibration(processor, calibration, num_samples, calibration_seed)
                report.num_samples = len(samples)
                report.calibration_tokens = int(sum(s["input_ids"].numel() for s in samples))
            layer_opts = {} if name == "ecoflap" else opts
            if name == "ecoflap" and nm is None:  # at N:M every block is at 1 - N/M (ecoflap.py docstring)
                block_ratio, report.block_scores = _ecoflap_ratios(model, processor, stacks, samples, ratio, opts,
                                                                   calibration_seed, progress)
                report.block_ratios = dict(block_ratio)
            for stack in stacks:
                _prune_stack(model, stack, spec, samples, block_ratio, nm, layer_opts, progress)

    for stack in stacks:
        for block, linears in stack.linears.items():
            target = 0.0 if ratio == 0 else (1 - nm[0] / nm[1] if nm else block_ratio[block])
            for lname, linear in linears.items():
                w = linear.weight
                report.layers.append(
                    LayerSparsity(lname, tuple(w.shape), float(target), int((w == 0).sum()), w.numel()))
    report.seconds = time.perf_counter() - started
    if ratio > 0:
        model.sparsity_report = report
        if not isinstance(model.__dict__.get("save_pretrained"), types.MethodType):
            model.save_pretrained = types.MethodType(_save_pretrained_with_report, model)
    return report


def _prune_linear(spec, linear, stats, ratio, nm, opts):
    weight = linear.weight
    if ratio <= 0:
        return
    new, mask = spec.prune(weight.data.float() if spec.stats == "hessian" else weight.data, stats, ratio, nm,
                           **opts)
    if spec.stats == "hessian":
        weight.data.copy_(new.to(weight.dtype))
    else:
        weight.data.masked_fill_(mask, 0)


def _prune_stack(model, stack, spec, samples, block_ratio, nm, opts, progress):
    if spec.stats == "none":
        for block, linears in stack.linears.items():
            for linear in linears.values():
                _prune_linear(spec, linear, None, block_ratio[block], nm, opts)
        return
    def prune_block(block_name, linears, collector):
        for lname, linear in linears.items():
            _prune_linear(spec, linear, collector.stats.pop(lname), block_ratio[block_name], nm, opts)

    bar = _bar(progress, len(samples) + len(stack.blocks), f"{spec.name}: {stack.target}")
    try:
        calibrate_blocks(model, stack, samples, spec.stats, prune_block, bar)
    finally:
        bar.close()


def _ecoflap_ratios(model, processor, stacks, samples, ratio, opts, seed, progress):
    groups = {block: linears for stack in stacks for block, linears in stack.linears.items()}
    n_batches = -(-min(len(samples), opts["zo_samples"]) // opts["zo_batch_size"])
    units = sum(1 if opts["zo_granularity"] == "block" else len(l) for l in groups.values())
    bar = _bar(progress, units * n_batches * opts["num_noise"], "ecoflap: zeroth-order scores")
    try:
        scores = zeroth_order_scores(
            model, processor, groups, samples, model_device(model), zo_samples=opts["zo_samples"],
            zo_batch_size=opts["zo_batch_size"], zo_eps=opts["zo_eps"], num_noise=opts["num_noise"],
            zo_granularity=opts["zo_granularity"], seed=seed, progress_bar=bar,
        )
    finally:
        bar.close()
    names = list(groups)
    sizes = [sum(m.weight.numel() for m in groups[g].values()) for g in names]
    ratios = ecoflap_allocate([scores[g] for g in names], sizes, ratio, opts["max_layer_ratio"],
                              opts["min_layer_ratio"])
    return dict(zip(names, ratios)), scores


__all__ = [
    "sparsify", "SPARSITY_METHODS", "validate_sparsity_args", "sparsity_option_names", "SparsityReport",
    "LayerSparsity", "load_sparsity_report", "REPORT_FILE", "to_semi_structured", "default_calibration",
    "prepare_calibration", "synthetic_sample", "magnitude_mask", "wanda_mask", "wanda_score", "sparsegpt_prune",
    "ecoflap_allocate", "zeroth_order_scores", "mask_lowest", "prune_count", "parse_pattern", "PATTERNS",
    "TARGETS", "DEFAULT_NUM_SAMPLES", "find_stacks",
]
