"""KV-cache eviction: one `transformers.Cache` subclass per method, registered by name."""

from .base import CompressedCache, validate_budget
from .context import PromptContext
from .layer import CompressedLayer
from .h2o import H2OCache
from .pyramidkv import PyramidKVCache
from .snapkv import SnapKVCache
from .streamingllm import StreamingLLMCache
from .vlcache import VLCacheCache

KV_METHODS: dict[str, type[CompressedCache]] = {
    cls.name: cls for cls in (StreamingLLMCache, H2OCache, SnapKVCache, PyramidKVCache, VLCacheCache)
}


def get_cache_class(name: str) -> type[CompressedCache]:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in KV_METHODS:
        raise ValueError(f"unknown KV-cache method {name!r}; choose one of {sorted(KV_METHODS)}")
    return KV_METHODS[key]


__all__ = [
    "KV_METHODS", "get_cache_class", "CompressedCache", "CompressedLayer", "PromptContext", "validate_budget",
    "StreamingLLMCache", "H2OCache", "SnapKVCache", "PyramidKVCache", "VLCacheCache",
]
