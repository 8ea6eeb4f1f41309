"""ECoFLaP (Sung, Yoon & Bansal, "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for Vision-Language
Models", ICLR 2024).

Formula: coarse stage, block b gets importance s_b = sum over calibration batches of
|(L(W + eps z) - L(W - eps z)) / (2 eps)| (a zeroth-order, forward-only estimate of ||dL/dW_b||, z ~ N(0, I)
on the block's weights), then keep_b = n_b (1 - r_max) + share of the remaining keep budget proportional to
s_b, capped at n_b (1 - r_min) (water-filling), so sum_b keep_b = (1 - r) sum_b n_b; fine stage: Wanda in
every block with its ratio r_b = 1 - keep_b / n_b.

Defaults follow the authors' scripts ("MEZO-GradOnly_sum", block granularity, r_max = r + 0.1, eps = 1e-3,
one noise draw per batch). Deviations, both options: `zo_granularity="block"` perturbs all Linear weights of a
block with one draw (an estimate of the block's gradient norm; the reference perturbs each weight matrix
separately and sums, `zo_granularity="linear"`, which costs one pair of forwards per matrix instead of per
block); `zo_samples=32` samples in batches of `zo_batch_size=8` (the reference: 128 in batches of 8).
The loss L is the language-modelling loss of the calibration texts (image and special tokens ignored).
The mean of the block ratios weighted by block size is the target; every ratio lies in [r_min, r_max].

N:M ("2:4", "4:8"): as the reference code (LAVIS/lavis/compression/pruners/wanda_pruner.py, the `_prune`
methods of `T5LayerWandaPruner` and `VITLayerWandaPruner`): its `prune_n != 0` branch never reads the
per-block ratios; in each row, every group of M consecutive inputs loses its M - N lowest |W| * ||X_j||_2 (the
same Wanda score, sequential calibration as for the unstructured fine stage). Every block is therefore at
1 - N/M, and the coarse stage, which the reference runs and then ignores, is skipped here (same mask, no
zeroth-order forwards); its options are refused at N:M rather than silently unused.
"""

from __future__ import annotations

import math

import torch

from .base import SparsityMethod
from .calibration import to_device
from . import wanda

DEFAULT_MARGIN = 0.1


def default_max_ratio(target: float) -> float:
    return max(target, min(target + DEFAULT_MARGIN, 0.99))


def ecoflap_allocate(scores, sizes, target: float, max_ratio: float | None = None, min_ratio: float = 0.0):
    """Per-group sparsity ratios: keep counts proportional to `scores` above the floor n (1 - max_ratio),
    capped at n (1 - min_ratio); the size-weighted mean ratio equals `target`."""
    scores = torch.as_tensor(scores, dtype=torch.float64).clamp(min=0)
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    if scores.shape != sizes.shape or scores.ndim != 1 or len(scores) == 0:
        raise ValueError("scores and sizes must be two non-empty lists of the same length")
    max_ratio = default_max_ratio(target) if max_ratio is None else float(max_ratio)
    if not 0.0 <= min_ratio <= target <= max_ratio < 1.0:
        raise ValueError(
            f"ECoFLaP bounds must satisfy 0 <= min_layer_ratio ({min_ratio}) <= sparsity_ratio ({target}) "
            f"<= max_layer_ratio ({max_ratio}) < 1"
        )
    low, high = sizes * (1 - max_ratio), sizes * (1 - min_ratio)
    keep = low.clone()
    remaining = float(sizes.sum() * (1 - target) - low.sum())
    active = high - keep > 0
    for _ in range(len(sizes) + 1):
        if remaining <= 1e-12 * float(sizes.sum()) or not active.any():
            break
        weights = torch.where(active, scores, torch.zeros_like(scores))
        if float(weights.sum()) <= 0:  # no signal left: in proportion to size
            weights = torch.where(active, sizes, torch.zeros_like(sizes))
        add = torch.minimum(remaining * weights / weights.sum(), high - keep)
        keep += add
        remaining -= float(add.sum())
        active = (high - keep) > 1e-12 * sizes
    ratios = (1 - keep / sizes).clamp(min_ratio, max_ratio)
    return ratios.tolist()


# The coarse stage's options (all of ECoFLaP's own), with their defaults.
OPTIONS = {"max_layer_ratio": None, "min_layer_ratio": 0.0, "zo_samples": 32, "zo_batch_size": 8, "zo_eps": 1e-3,
           "num_noise": 1, "zo_granularity": "block"}


def validate_options(ratio: float, nm, opts: dict) -> dict:
    """Check ECoFLaP's options before any weight changes; fills in the default `max_layer_ratio`. A ratio of 0
    prunes nothing, so nothing needs checking. At N:M there is no coarse stage (module docstring): its options
    are refused when set to anything but their defaults, and none are returned."""
    if ratio == 0:
        return opts
    if nm is not None:
        changed = sorted(k for k, v in opts.items() if v != OPTIONS[k])
        if changed:
            raise ValueError(
                f"ecoflap with sparsity_pattern '{nm[0]}:{nm[1]}' prunes every block at 1 - N/M (the reference "
                f"code's N:M branch ignores the per-block ratios), so the coarse-stage option(s) {changed} have "
                f"no effect: drop them, or use sparsity_pattern='unstructured' for per-block ratios")
        return {}
    opts = dict(opts)
    if opts["max_layer_ratio"] is None:
        opts["max_layer_ratio"] = default_max_ratio(ratio)
    lo, hi = opts["min_layer_ratio"], opts["max_layer_ratio"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or not (
            0.0 <= lo <= ratio <= hi < 1.0):
        raise ValueError(f"ECoFLaP bounds must satisfy 0 <= min_layer_ratio <= sparsity_ratio <= max_layer_ratio < 1, "
                         f"got min_layer_ratio={lo!r}, sparsity_ratio={ratio}, max_layer_ratio={hi!r}")
    for key in ("zo_samples", "zo_batch_size", "num_noise"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
            raise ValueError(f"{key} must be an int >= 1, got {opts[key]!r}")
    if not isinstance(opts["zo_eps"], (int, float)) or not opts["zo_eps"] > 0:
        raise ValueError(f"zo_eps must be a positive number, got {opts['zo_eps']!r}")
    if opts["zo_granularity"] not in ("block", "linear"):
        raise ValueError(f"zo_granularity={opts['zo_granularity']!r}; choose 'block' or 'linear'")
    return opts


def text_labels(model, processor, input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for the language-modelling loss: the input ids with special and image/video tokens ignored."""
    ignore = set(getattr(getattr(processor, "tokenizer", processor), "all_special_ids", []) or [])
    for key in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(model.config, key, None)
        if isinstance(value, int):
            ignore.add(value)
    labels = input_ids.clone()
    if ignore:
        labels[torch.isin(labels, torch.tensor(sorted(ignore), device=labels.device))] = -100
    return labels


def calibration_loss(model, processor, samples, device) -> float:
    """Mean language-modelling loss over `samples` (forward only)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            inputs = to_device(sample, device)
            labels = text_labels(model, processor, inputs["input_ids"])
            if int((labels[:, 1:] != -100).sum()) == 0:
                continue
            loss = model(**inputs, labels=labels, use_cache=False).loss
            total += float(loss.float())
            count += 1
    if count == 0:
        raise ValueError("ECoFLaP needs calibration samples with text tokens to score (its loss is on the text)")
    return total / count


def zeroth_order_scores(model, processor, groups: dict, samples, device, *, zo_samples=32, zo_batch_size=8,
                        zo_eps=1e-3, num_noise=1, zo_granularity="block", seed=0, progress_bar=None) -> dict:
    """Forward-only importance of each group {name: {linear_name: nn.Linear}} (see the module docstring)."""
    if zo_granularity not in ("block", "linear"):
        raise ValueError(f"zo_granularity={zo_granularity!r}; choose 'block' or 'linear'")
    samples = samples[:zo_samples]
    batches = [samples[i:i + zo_batch_size] for i in range(0, len(samples), zo_batch_size)]
    scores = {}
    for g_index, (group, linears) in enumerate(groups.items()):
        units = [list(linears.values())] if zo_granularity == "block" else [[m] for m in linears.values()]
        score = 0.0
        for u_index, unit in enumerate(units):
            weights = [m.weight for m in unit]
            for b_index, batch in enumerate(batches):
                for k in range(num_noise):
                    gen_seed = hash((seed, g_index, u_index, b_index, k)) % (2**63)
                    backup = [w.data.clone() for w in weights]
                    noise = []
                    for w in weights:
                        gen = torch.Generator(device=w.device).manual_seed(gen_seed)
                        gen_seed += 1
                        noise.append(torch.randn(w.shape, generator=gen, device=w.device, dtype=torch.float32))
                    try:
                        for w, b, z in zip(weights, backup, noise):
                            w.data.copy_((b.float() + zo_eps * z).to(w.dtype))
                        plus = calibration_loss(model, processor, batch, device)
                        for w, b, z in zip(weights, backup, noise):
                            w.data.copy_((b.float() - zo_eps * z).to(w.dtype))
                        minus = calibration_loss(model, processor, batch, device)
                    finally:
                        for w, b in zip(weights, backup):
                            w.data.copy_(b)
                    projected = (plus - minus) / (2 * zo_eps)
                    if math.isfinite(projected):
                        score += abs(projected)
                    if progress_bar is not None:
                        progress_bar.update(1)
        scores[group] = score
    return scores


METHOD = SparsityMethod(
    # within a block (and at N:M everywhere) ECoFLaP prunes as Wanda does
    name="ecoflap", stats="norm", prune=wanda.METHOD.prune, check=validate_options, options=OPTIONS,
    description="per-block ratios from zeroth-order global scores, then Wanda per block (N:M: Wanda's N:M masks)",
)
