"""Adapters over the upstream transformers classes: one package per architecture, whose subclass of the upstream
class adds the compression points (where the cache is made, where visual tokens are known and pruned) and whose
`tiny` module builds a small random-weight checkpoint. Which packages there are: `vlmcompress.architectures`."""

from ..architectures import ARCHITECTURES

MODEL_CLASSES = {model_type: arch.model_class for model_type, arch in ARCHITECTURES.items()}

__all__ = ["MODEL_CLASSES"]
