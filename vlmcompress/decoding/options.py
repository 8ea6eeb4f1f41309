"""The fast paths' switches, one object passed through `load(..., decoding=DecodingOptions(...))`.

Every switch is on by default; each turns one optional path off (for a comparison, or where it misbehaves), and
each path still checks where it works (`vlmcompress.compilation`, `split_kv.split_kv_works`). `generate` makes
its model's options the active ones for its length (`active`), which is where the kernels that run deep inside
transformers' attention and the prompt's scoring read them.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DecodingOptions:
    compile: bool = True  # torch.compile the step's pointwise kernels and the prompt scoring where inductor works
    split_kv: bool = True  # the decoding attention as split-KV triton kernels on CUDA (`split_kv`)
    fuse_products: bool = True  # q/k/v and gate/up as one matrix product each in static steps (`step_kernels`)
    defer_stop_check: bool = True  # read generate's "all finished" flag one step late under static decoding
    fused_scoring: bool = True  # all-query prompt scores (H2O, LOOK-M) as triton kernels on CUDA (`received_attention`)
    # static buffers and captured steps a model keeps for later `generate` calls (`decoding.workspace`); 0: none
    kept_graphs: int = 4

    def __post_init__(self):
        for option in fields(self):
            value = getattr(self, option.name)
            if option.type == "int":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"DecodingOptions.{option.name} must be an int >= 0, got {value!r}")
            elif not isinstance(value, bool):
                raise ValueError(f"DecodingOptions.{option.name} must be True or False, got {value!r}")


_ACTIVE = contextvars.ContextVar("vlmcompress_decoding_options", default=DecodingOptions())


def active() -> DecodingOptions:
    """The options of the `generate` running now (the defaults outside one)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activated(options: DecodingOptions):
    """Make `options` the active ones within this block."""
    token = _ACTIVE.set(options)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
