"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling").

SnapKV's scores with pyramid-shaped budgets (`allocation.Pyramid`): layer l keeps w + m_l tokens where m_l falls
linearly from m_max = 2m − m/β (first layer) to m_min = m/β (last layer), m = budget − w, rounded so that the mean
over layers is exactly the budget.
"""

from __future__ import annotations

from .allocation import Pyramid
from .base import CompressedCache
from .snapkv import SnapKV


class PyramidKVCache(CompressedCache):
    name = "pyramidkv"
    policy_class = SnapKV
    allocation_class = Pyramid
