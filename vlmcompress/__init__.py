"""vlmcompress: training-free acceleration of large vision-language models.

`load()` returns the upstream transformers model class (a subclass of it) with the
chosen KV-cache eviction, visual-token pruning and parameter sparsity applied, so
`model.generate(**processor(...))` works unchanged.
"""

__version__ = "0.1.0"

from .decoding.options import DecodingOptions  # noqa: E402
from .loading import SUPPORTED_MODEL_TYPES, load  # noqa: E402

__all__ = ["load", "DecodingOptions", "SUPPORTED_MODEL_TYPES", "__version__"]
