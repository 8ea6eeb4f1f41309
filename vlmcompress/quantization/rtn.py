"""Round-to-nearest (RTN): each weight rounded on its group's min-max grid (`base.quantize_groups`), no calibration.

The baseline of GPTQ and AWQ, and the quick way to get a packed model (speed does not depend on the method).
"""

from __future__ import annotations

from .base import QuantMethod, quantize_groups


def _quantize(weight, stats, bits, group_size):
    codes, scales, zeros = quantize_groups(weight, bits, group_size)
    return codes, scales, zeros, None


METHOD = QuantMethod(name="rtn", stats="none", quantize=_quantize,
                     description="round to nearest on each group's min-max grid; no calibration")
