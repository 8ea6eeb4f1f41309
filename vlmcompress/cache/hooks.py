"""The cache's hooks on a model, module-level so that they hold the cache only weakly."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..glue import bind_attention_arguments, passed_cache


def remove_all(handles: list) -> None:
    while handles:
        handles.pop().remove()


def discover(ref, module, args):
    cache = ref()
    if cache is None or cache._attached_to is not None:
        return None
    if isinstance(module, PreTrainedModel):
        try:
            cache.attach(module)
        except ValueError:
            return None
    return None


def embedding_pre_hook(ref, module, args):
    cache = ref()
    if cache is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 2:
        return None
    if cache.layers and cache.layers[0].seen_tokens > 0:
        return None  # decoding: the prompt's modality map is already known
    if cache._visual_ids:
        ids = torch.tensor(cache._visual_ids, device=args[0].device)
        cache.visual_mask = torch.isin(args[0], ids)
    return None


def attention_pre_hook(ref, module, args, kwargs):
    cache = ref()
    if cache is None or passed_cache(kwargs) is not cache:
        return None
    if module.layer_idx >= len(cache.layers) or not cache.layers[module.layer_idx].compressed:
        return None
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    layer = cache.layers[module.layer_idx]
    kwargs["attention_mask"] = cache.decode_attention_mask(module, layer, hidden.shape[1], hidden.dtype)
    return args, kwargs


def attention_post_hook(ref, module, args, kwargs, output):
    cache = ref()
    if cache is None:
        return None
    arguments = kwargs if passed_cache(kwargs) is not None else bind_attention_arguments(module, args, kwargs)
    if passed_cache(arguments) is not cache:
        return None
    if "hidden_states" not in arguments:
        arguments = bind_attention_arguments(module, args, kwargs)
    layer = cache.layers[module.layer_idx]
    if layer.compressed:
        cache._on_decode(module, layer, arguments)
    elif module.layer_idx not in cache._pending:
        cache._on_prompt(module, layer, arguments)
    return None
