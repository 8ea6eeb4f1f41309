"""What every adapter over an upstream class shares: the compression settings, the point where the cache is
made, static decoding around `generate`, and `compression_stats`."""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache

from ..cache import CompressedCache
from ..cache.full import FullCache
from ..config import CompressionSettings
from ..decoding.options import activated
from ..decoding.static import ROOM, StaticDecoding, deferred_stop_check
from ..decoding.workspace import WorkspacePool
from ..glue import cache_argument, language_model_of, passed_cache, reject_right_padding, visual_token_ids


def layer_sizes(cache):
    """`(bytes, tokens)` held by each layer of a transformers cache."""
    for layer in getattr(cache, "layers", []):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            yield keys.numel() * keys.element_size() + values.numel() * values.element_size(), keys.shape[-2]


class CompressionMixin:
    """Mixed in front of an upstream `...ForConditionalGeneration` class.

    Compression point: the KV cache. `generate` builds the configured eviction cache (unless the
    caller passed one) and hooks it into this model, so application code calls `generate` as usual.
    After each `generate`, `compression_stats` holds what the run kept and held.
    """

    compression: CompressionSettings = CompressionSettings()

    @classmethod
    def is_custom_code(cls) -> bool:
        # Same weights and checkpoint layout as the upstream class, so the upstream key conversions apply.
        return False

    def static_decoding(self, generation_kwargs: dict | None = None) -> bool:
        """Whether a `generate` with `generation_kwargs` decodes statically: as `cuda_graphs` says, and where it is
        None (the default) when the language model is on CUDA with an attention that takes the static mask (not
        flash-attention) and the search keeps one row per sample (static buffers cannot reorder beams)."""
        if self.compression.cuda_graphs is not None:
            return self.compression.cuda_graphs
        kwargs = generation_kwargs or {}
        config = kwargs.get("generation_config") or self.generation_config
        one_row_per_sample = (kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1) == 1 and \
            kwargs.get("assistant_model") is None
        language_model = language_model_of(self)
        attention = str(getattr(language_model.config, "_attn_implementation", "") or "")
        return one_row_per_sample and self._on_cuda() and "flash" not in attention

    def _on_cuda(self) -> bool:
        return next(language_model_of(self).parameters()).device.type == "cuda"

    def make_cache(self, static_decoding: bool | None = None):
        """A fresh cache for one `generate` call: the configured eviction cache; without one, a plain
        DynamicCache, or under static decoding (`static_decoding()` if not given) a `FullCache` (every token
        kept, preallocated room)."""
        if self.compression.kv is None:
            static = self.static_decoding() if static_decoding is None else static_decoding
            return FullCache().attach(self) if static else DynamicCache(config=self.config)
        return self.compression.kv.make_cache().attach(self)

    def decoding_workspaces(self) -> WorkspacePool:
        """The static buffers and captured steps this model keeps across `generate` calls (`decoding.workspace`)."""
        pool = vars(self).get("_decoding_workspaces")
        if pool is None or pool.size != self.compression.decoding.kept_graphs:
            pool = self._decoding_workspaces = WorkspacePool(self.compression.decoding.kept_graphs)
        return pool

    def release_decoding_buffers(self) -> None:
        """Free the static buffers and CUDA graphs kept for later `generate` calls now (they also go with the
        model); the next `generate` captures again."""
        vars(self).pop("_decoding_workspaces", None)

    def generate(self, *args, **kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            reject_right_padding(mask.bool())
        cache = passed_cache(kwargs)
        decode_statically = self.static_decoding(kwargs)
        if cache is None:
            cache = kwargs[cache_argument(self)] = self.make_cache(decode_statically)
        elif isinstance(cache, CompressedCache):
            cache.attach(self)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        static, options = None, self.compression.decoding
        # a head-adaptive cache's heads hold different numbers of tokens: it decodes eagerly (RaggedLayer)
        if isinstance(cache, CompressedCache) and not cache.heads.head_adaptive and decode_statically:
            # Compression point: decoding. The language model's decoding steps run at fixed shapes, from a CUDA graph.
            config = kwargs.get("generation_config") or self.generation_config
            room = kwargs.get("max_new_tokens") or config.max_new_tokens or ROOM
            static = StaticDecoding(cache, language_model_of(self), room=room, options=options,
                                    workspaces=self.decoding_workspaces()).install()
        deferring = static is not None and options.defer_stop_check
        try:
            with activated(options), deferred_stop_check() if deferring else contextlib.nullcontext():
                output = super().generate(*args, **kwargs)
        finally:
            if static is not None:
                static.close()
        self.compression_stats = self._compression_stats(cache, input_ids, output)
        self.compression_stats["static_decoding"] = static is not None
        return output

    def _compression_stats(self, cache, input_ids, output) -> dict:
        prompt_tokens = int(input_ids.shape[-1]) if isinstance(input_ids, torch.Tensor) else None
        stats = {"prompt_tokens": prompt_tokens, "compression": self.compression.describe()}
        if isinstance(input_ids, torch.Tensor):
            visual_ids = torch.tensor(visual_token_ids(self.config), device=input_ids.device)
            stats["visual_tokens"] = int(torch.isin(input_ids, visual_ids).sum(dim=-1).max())
        pruning = getattr(self, "pruning_stats", None)
        pruned = pruning() if callable(pruning) else None
        if pruned:  # visual tokens reaching the language model after pruning, and before (`visual_tokens_in`)
            stats.update(pruned)
        if isinstance(cache, CompressedCache):
            stats["kv_bytes"] = cache.prefill_nbytes
            stats["kept_tokens_per_layer"] = [layer.kept_tokens for layer in cache.layers]
        elif prompt_tokens:
            # Each layer now holds its prefill plus every generated token but the last (never fed back).
            sequences = output.sequences if hasattr(output, "sequences") else output
            decoded = max(0, int(sequences.shape[-1]) - prompt_tokens - 1)
            stats["kv_bytes"] = sum(
                layer_bytes * (length - decoded) // max(length, 1)
                for layer_bytes, length in layer_sizes(cache)
            )
        return stats
