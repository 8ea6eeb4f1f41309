"""What vlmcompress reads off transformers' models, shared by eviction (`cache`), pruning and the models.

Where a model keeps its decoder layers, under which name a forward takes its KV cache, which token ids are
visual, a forward's arguments by name, an attention's rotary function, the additive form of a boolean mask, and
the refusal of a right-padded batch.
"""

from __future__ import annotations

import inspect
import sys
from functools import lru_cache

import torch

CACHE_ARGUMENTS = ("cache", "past_key_values")  # a forward's KV-cache keyword: since transformers 5.24, before


def language_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (the module holding `.layers`) of a VLM or plain causal LM."""
    candidates = [
        getattr(getattr(model, "model", None), "language_model", None),
        getattr(model, "language_model", None),
        getattr(model, "model", None),
        model,
    ]
    for candidate in candidates:
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate
    raise ValueError(f"{type(model).__name__} has no decoder layers that a KV cache can attach to")


def passed_cache(arguments: dict):
    """The KV cache a forward was called with: `cache=` since transformers 5.24, `past_key_values=` before."""
    new_name, old_name = CACHE_ARGUMENTS
    return arguments.get(new_name, arguments.get(old_name))


def cache_argument(model: torch.nn.Module) -> str:
    """The name `model.forward` takes its KV cache under (`cache` since transformers 5.24, which still
    accepts `past_key_values` but warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a boolean attention mask: 0 where attending is allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def visual_token_ids(config) -> list[int]:
    """The image and video placeholder token ids of a VLM's config."""
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


@lru_cache(maxsize=None)
def _forward_signature(module_type: type) -> inspect.Signature:
    return inspect.signature(module_type.forward)


def bind_attention_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The attention forward's arguments by name, whatever mix of positional and keyword was used."""
    bound = _forward_signature(type(module)).bind_partial(module, *args, **kwargs).arguments
    named = {k: v for k, v in bound.items() if k not in ("self", "kwargs")}
    named.update(bound.get("kwargs", {}))
    return named


# The names transformers' modeling files give the function their attentions rotate queries and keys with:
# Qwen2-VL's is `apply_multimodal_rotary_pos_emb` up to transformers 5.16 (3-D cos/sin, split by the
# config's `mrope_section`), `apply_rotary_pos_emb` (cos/sin already merged) from 5.17 and in every other model.
ROTARY_FUNCTION_NAMES = ("apply_rotary_pos_emb", "apply_multimodal_rotary_pos_emb")


def rotary_function_name(attention_type: type) -> str | None:
    """The global name under which `attention_type`'s modeling file holds its rotary function, if any.

    The function may be a plain function or, from transformers 5.25, an `nn.Module` wrapping it."""
    modeling = sys.modules[attention_type.__module__]
    return next((name for name in ROTARY_FUNCTION_NAMES if callable(getattr(modeling, name, None))), None)


def rotary_function(module: torch.nn.Module):
    """`(q, k, cos, sin) -> (q, k)` as `module`'s own forward rotates them."""
    name = rotary_function_name(type(module))
    if name is None:
        raise TypeError(f"{type(module).__name__}: its modeling file has none of {ROTARY_FUNCTION_NAMES}")
    rotate = getattr(sys.modules[type(module).__module__], name)
    if name == "apply_multimodal_rotary_pos_emb":
        section = module.config.rope_parameters["mrope_section"]
        return lambda q, k, cos, sin: rotate(q, k, cos, sin, section)
    return rotate


def reject_right_padding(valid: torch.Tensor) -> None:
    """Raise a ValueError where a row of `valid` `[b, n]` (True on real tokens) has padding after a real token:
    generation continues each row from its last slot, so a right-padded batch decodes from padding."""
    if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
        raise ValueError(
            "the batch is right-padded (its attention_mask has zeros after ones): generation needs left "
            'padding; build it with padding_side="left" (processor(..., padding=True, padding_side="left"), '
            'or set processor.tokenizer.padding_side = "left")'
        )
