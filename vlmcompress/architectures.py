"""The supported architectures, listed once: `load()`, `vlmcompress.testing`, the evaluation and the benchmarks
read them here.

Each `config.model_type` names the package of its forked modeling module (`vlmcompress.models.<package>`: a
subclass of the upstream class whose `pruning_adapter` says where its visual tokens come from) and the class in
it, and that package's `tiny` module builds a small random-weight config and processor of it. Nothing heavy is
imported until an architecture is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    model_type: str
    package: str  # vlmcompress.models.<package>
    class_name: str  # the forked subclass of the upstream class, in that package

    @property
    def model_class(self) -> type:
        return getattr(importlib.import_module(f"vlmcompress.models.{self.package}"), self.class_name)

    @property
    def tiny(self):
        """The module building a tiny checkpoint: `SPECIAL_TOKENS`, `PLACEHOLDERS` (image, video) and
        `build(model_type, tokenizer, ids, text_config) -> (config, processor)`."""
        return importlib.import_module(f"vlmcompress.models.{self.package}.tiny")


ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (
    Architecture("llava_onevision", "llava_onevision", "LlavaOnevisionForConditionalGeneration"),
    Architecture("qwen2_vl", "qwen2_vl", "Qwen2VLForConditionalGeneration"),
    Architecture("qwen2_5_vl", "qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    Architecture("internvl", "internvl", "InternVLForConditionalGeneration"),
)}


def architecture(model_type: str, source: str | None = None) -> Architecture:
    """The entry of `model_type`; a `ValueError` naming the supported ones otherwise (`source`: the checkpoint
    the model type was read from, for the message)."""
    if model_type not in ARCHITECTURES:
        subject = f"{source!r} is a {model_type!r} model" if source else f"unknown model_type {model_type!r}"
        raise ValueError(f"{subject}; vlmcompress supports {list(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]
