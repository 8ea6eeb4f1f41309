"""KV-cache eviction: one `transformers.Cache` subclass per method, registered by name (`KV_METHODS.register`)."""

from .base import CompressedCache, validate_budget
from .context import PromptContext
from .layer import CompressedLayer
from .h2o import H2OCache
from .pyramidkv import PyramidKVCache
from .snapkv import SnapKVCache
from .streamingllm import StreamingLLMCache
from .vlcache import VLCacheCache

from ..registry import Registry

# "SnapKV", "snap-kv" and "snap_kv" all name snapkv
KV_METHODS = Registry("KV-cache", normalize=lambda name: name.strip().lower().replace("-", "").replace("_", ""))
for method in (StreamingLLMCache, H2OCache, SnapKVCache, PyramidKVCache, VLCacheCache):
    KV_METHODS.register(method)


def get_cache_class(name: str) -> type[CompressedCache]:
    return KV_METHODS.lookup(name)


__all__ = [
    "KV_METHODS", "get_cache_class", "CompressedCache", "CompressedLayer", "PromptContext", "validate_budget",
    "StreamingLLMCache", "H2OCache", "SnapKVCache", "PyramidKVCache", "VLCacheCache",
]
