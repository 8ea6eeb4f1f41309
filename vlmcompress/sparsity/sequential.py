"""Where the prunable layers are, and layer-by-layer calibration through them.

A *stack* is a list of blocks run one after the other (the language model's decoder layers, the vision
encoder's blocks) or a single module (the projector). The prunable layers are the `nn.Linear` modules inside
the blocks (embeddings, lm_head and the vision patch embedding are never pruned).

Calibration follows the SparseGPT/Wanda reference code: one forward of the whole model per sample, stopped
right after the stack's last block, records what each block receives (its hidden-states input for the first
block; for every block the other arguments: the model's own rotary embeddings, M-RoPE position ids, causal
masks, Qwen2.5-VL's per-block window/full cu_seqlens). Then each block in turn runs on every sample with hooks
on its Linear layers that accumulate the statistics, is pruned, and runs again so that the next block sees
the outputs of the already-pruned block. Only the current block's statistics and one hidden state per sample
are held at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import to_device

TARGETS = ("vision_tower", "projector", "language_model")
STACK_TARGETS = TARGETS + ("lm_head",)  # what `find_stacks` finds: sparsity's targets, and the output head


@dataclass
class Stack:
    target: str
    name: str
    blocks: list  # list[(block_name, nn.Module)]
    is_sequence: bool = True  # False: a single module called once (the projector)
    linears: dict = field(default_factory=dict)  # block_name -> {full_name: nn.Linear}


def _get(model, path):
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _inner(model):
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) else model


def _find_block_list(module: nn.Module, exclude=("merger", "head")) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of `module` whose blocks hold Linear layers; the longest if several."""
    best = None
    for name, child in module.named_modules():
        if not isinstance(child, nn.ModuleList) or any(part in exclude for part in name.split(".")):
            continue
        if not any(isinstance(m, nn.Linear) for m in child.modules()):
            continue
        if best is None or len(child) > len(best[1]):
            best = (name, child)
    return best


def find_stacks(model: nn.Module, targets) -> list[Stack]:
    """The stacks of `targets`, in the model's forward order (vision tower, projector, language model, output
    head)."""
    unknown = [t for t in targets if t not in STACK_TARGETS]
    if unknown or not targets:
        raise ValueError(f"targets={tuple(targets)!r}: choose one or more of {list(STACK_TARGETS)}")
    inner = _inner(model)
    full = {id(m): n for n, m in model.named_modules()}
    stacks = []
    for target in STACK_TARGETS:
        if target not in targets:
            continue
        if target == "lm_head":
            stacks.append(output_head_stack(model))
            continue
        if target == "language_model":
            lm = getattr(inner, "language_model", None)
            found = ("layers", lm.layers) if lm is not None and hasattr(lm, "layers") else None
            if found is None:
                raise ValueError("no language model with decoder `layers` found at model.model.language_model")
            parent = lm
        elif target == "vision_tower":
            parent = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
            found = _find_block_list(parent) if parent is not None else None
            if found is None:
                raise ValueError("no vision tower with a list of blocks found (model.model.vision_tower / visual)")
        else:
            parent = getattr(inner, "multi_modal_projector", None) or _get(inner, "visual.merger")
            if parent is None:
                raise ValueError("no projector found (model.model.multi_modal_projector / model.model.visual.merger)")
            name = full[id(parent)]
            stacks.append(Stack(target, name, [(name, parent)], is_sequence=False))
            continue
        list_name, blocks = found
        name = full[id(blocks)]
        stacks.append(Stack(target, name, [(f"{name}.{i}", b) for i, b in enumerate(blocks)]))
    for stack in stacks:
        for block_name, block in stack.blocks:
            stack.linears[block_name] = {
                f"{block_name}.{n}" if n else block_name: m for n, m in block.named_modules()
                if isinstance(m, nn.Linear)
            }
    return stacks


def output_head_stack(model: nn.Module) -> Stack:
    """The output head (`lm_head`) as a stack of one module, last in forward order. A head that shares its weight
    with the input embeddings (`tie_word_embeddings`) is refused: replacing it would change both."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError("no output head (an nn.Linear `lm_head`) found: leave 'lm_head' out of targets")
    embeddings = model.get_input_embeddings()
    if getattr(embeddings, "weight", None) is head.weight:
        raise ValueError("lm_head shares its weight with the input embeddings (tie_word_embeddings=True): leave "
                         "'lm_head' out of targets")
    name = next(n for n, m in model.named_modules() if m is head)
    return Stack("lm_head", name, [(name, head)], is_sequence=False, linears={name: {name: head}})


def model_device(model) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


class _Stop(Exception):
    pass


@dataclass
class Captured:
    """What each block of a stack received for each sample: hidden-states inputs (first block) and the rest."""

    hidden: list  # per sample: tensor given to the first block
    calls: list  # per block: per sample (args without the hidden states, kwargs, hidden given as kwarg?)


def capture_inputs(model, stack: Stack, samples, progress_bar=None) -> Captured:
    """Run the model on each sample until the end of `stack`, recording every block's inputs."""
    device = model_device(model)
    n_blocks = len(stack.blocks)
    calls = [[] for _ in range(n_blocks)]
    hidden = []
    handles = []

    def pre_hook(index):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            if args:
                h, rest, as_kw = args[0], tuple(args[1:]), False
            else:
                h, rest, as_kw = kwargs.pop("hidden_states"), (), True
            if index == 0:
                hidden.append(h.detach())
            calls[index].append((rest, kwargs, as_kw))
        return hook

    def stop_hook(module, args, output):
        raise _Stop

    try:
        for index, (_, block) in enumerate(stack.blocks):
            handles.append(block.register_forward_pre_hook(pre_hook(index), with_kwargs=True))
        handles.append(stack.blocks[-1][1].register_forward_hook(stop_hook))
        with torch.no_grad():
            for sample in samples:
                before = len(hidden)
                try:
                    model(**to_device(sample, device), use_cache=False)
                except _Stop:
                    pass
                if len(hidden) == before:  # a text-only sample never reaches the vision tower / projector
                    for per_block in calls:
                        del per_block[len(hidden):]
                if progress_bar is not None:
                    progress_bar.update(1)
    finally:
        for handle in handles:
            handle.remove()
    if not hidden:
        raise ValueError(
            f"no calibration sample reached {stack.name} ({stack.target}): "
            f"use samples with an image to calibrate the vision tower and projector"
        )
    return Captured(hidden, calls)


def run_block(block, hidden, call):
    rest, kwargs, as_kw = call
    with torch.no_grad():
        out = block(hidden_states=hidden, **kwargs) if as_kw else block(hidden, *rest, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "to_tuple"):
        out = out.to_tuple()[0]
    return out


class StatsCollector:
    """Forward hooks on Linear layers accumulating input statistics in float32.

    kind "norm": per input feature, the sum over tokens of x_j^2 (Wanda's ||X_j||_2^2).
    kind "hessian": X^T X summed over tokens (SparseGPT's H up to a constant).
    kind "inputs": (sum over tokens of |x_j|, [up to `rows_per_call` evenly spaced tokens of each call]) (AWQ).
    """

    def __init__(self, linears: dict, kind: str, rows_per_call: int | None = None):
        self.kind = kind
        self.rows_per_call = rows_per_call
        self.stats = {}
        self.tokens = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
            if self.kind == "inputs":
                abs_sum, rows = self.stats.setdefault(name, (torch.zeros_like(x[0]), []))
                abs_sum += x.abs().sum(0)
                kept = min(x.shape[0], self.rows_per_call or x.shape[0])
                rows.append(x[torch.linspace(0, x.shape[0] - 1, kept, device=x.device).round().long()])
                return
            if self.kind == "norm":
                update = (x * x).sum(0)
            else:
                update = x.t() @ x
            if name in self.stats:
                self.stats[name] += update
            else:
                self.stats[name] = update
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def calibrate_blocks(model, stack: Stack, samples, kind: str, update_block, progress_bar=None, rows_per_call=None):
    """Sequential calibration of `stack`: each block in turn runs on every sample with a `StatsCollector` of
    `kind` on its Linear layers, then `update_block(block_name, linears, collector)` changes the block from
    those statistics (prunes, quantizes), and the next block receives the changed block's outputs."""
    captured = capture_inputs(model, stack, samples, progress_bar)
    hidden = captured.hidden
    for index, (block_name, block) in enumerate(stack.blocks):
        linears = stack.linears[block_name]
        collector = StatsCollector(linears, kind, rows_per_call)
        try:
            for s, h in enumerate(hidden):
                run_block(block, h, captured.calls[index][s])
        finally:
            collector.remove()
        update_block(block_name, linears, collector)
        del collector
        if index + 1 < len(stack.blocks):
            hidden = [run_block(block, h, captured.calls[index][s]) for s, h in enumerate(hidden)]
        if progress_bar is not None:
            progress_bar.update(1)
