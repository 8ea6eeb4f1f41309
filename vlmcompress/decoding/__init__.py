"""Fast decoding, apart from eviction: once a prompt is compressed, `generate`'s decoding steps run at fixed
shapes (`static`, over `StaticLayer`s built from the cache's evicted layers), replayed from a CUDA graph, with
fewer kernels per step (`step_kernels`) and grouped-query attention that copies no K/V per query head
(`grouped_sdpa`), split over the held slots on CUDA (`split_kv`). The eviction methods never see any of it.

Nothing is imported here: `cache` imports `grouped_sdpa`, and `static` builds on `cache`'s layers.
"""
