"""KV-cache eviction: one cache (`CompressedCache`) over each method's `Policy`, an allocation and, optionally, a
merging strategy (`merge`); a `transformers.Cache` class per method, registered by name (`KV_METHODS`,
`register_policy`)."""

from ..registry import Registry
from .allocation import Density, Pyramid, Uniform
from .base import CompressedCache, validate_budget
from .context import DecodeContext, PromptContext
from .h2o import H2O, H2OCache
from .head_adaptive import HeadAdaptive
from .layer import CompressedLayer
from .lookm import LookM, LookMCache
from .merge import MERGE_STRATEGIES, Average, Merge, Pivotal, Weighted
from .policy import PROTECTED, Policy, Scores
from .pyramidkv import PyramidKVCache
from .ragged_layer import RaggedLayer
from .random_eviction import Random, RandomCache
from .snapkv import SnapKV, SnapKVCache
from .streamingllm import StreamingLLM, StreamingLLMCache
from .vlcache import VLCache, VLCacheCache

# "SnapKV", "snap-kv" and "snap_kv" all name snapkv
KV_METHODS = Registry("KV-cache", normalize=lambda name: name.strip().lower().replace("-", "").replace("_", ""))
for method in (StreamingLLMCache, H2OCache, SnapKVCache, PyramidKVCache, VLCacheCache, RandomCache,
               LookMCache):
    KV_METHODS.register(method)


def get_cache_class(name: str) -> type[CompressedCache]:
    return KV_METHODS.lookup(name)


def register_policy(policy_class: type[Policy], name: str, allocation_class: type = Uniform) -> type[CompressedCache]:
    """Make `policy_class` a KV method called `name` (`load(kv=name)`), kept per layer as `allocation_class`
    says; returns its cache class, whose keyword options are the fields of both (and `HeadAdaptive`'s)."""
    cache_class = type(f"{policy_class.__name__}Cache", (CompressedCache,), {
        "name": name, "policy_class": policy_class, "allocation_class": allocation_class,
        "__module__": policy_class.__module__, "__doc__": policy_class.__doc__})
    return KV_METHODS.register(cache_class)


__all__ = [
    "KV_METHODS", "get_cache_class", "register_policy", "CompressedCache", "CompressedLayer", "RaggedLayer", "Policy",
    "Scores", "HeadAdaptive",
    "PROTECTED", "PromptContext", "DecodeContext", "Uniform", "Pyramid", "Density", "validate_budget",
    "StreamingLLM", "H2O", "SnapKV", "VLCache", "Random", "LookM",
    "StreamingLLMCache", "H2OCache", "SnapKVCache", "PyramidKVCache", "VLCacheCache", "RandomCache", "LookMCache",
    "MERGE_STRATEGIES", "Merge", "Average", "Pivotal", "Weighted",
]
