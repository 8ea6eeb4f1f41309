"""lmms-eval's entry point for the `vlmcompress` model backend (`--model vlmcompress`).

`pip install -e ".[lmms]"` registers `manifests` in the `lmms_eval.models` entry-point group, which
lmms-eval (0.7+) reads when it builds its model registry. The backend itself,
`evaluation.lmms_backend.VlmCompress`, reuses the repository's `evaluation/` package (prompts,
generation, efficiency, loyalty); that package ships with the source tree, not the wheel, so this
module makes a clone's `evaluation/` importable from any working directory. The function must not
raise: a failing entry point would stop lmms-eval from registering every other plugin.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODEL_ID = "vlmcompress"
BACKEND_CLASS = "evaluation.lmms_backend.VlmCompress"


def _repository_root() -> Path | None:
    """The clone this vlmcompress was installed from (editable install), when it holds the backend."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "evaluation" / "lmms_backend.py").is_file() else None


def ensure_evaluation_importable() -> None:
    """Append the clone's root to sys.path when `evaluation` is not importable yet (appended, so it shadows nothing)."""
    if importlib.util.find_spec("evaluation") is not None:
        return
    root = _repository_root()
    if root is not None and str(root) not in sys.path:
        sys.path.append(str(root))


def manifests():
    """The `lmms_eval.models` entry point: one simple (doc_to_text / doc_to_visual) model, `vlmcompress`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    ensure_evaluation_importable()
    return [ModelManifest(model_id=MODEL_ID, simple_class_path=BACKEND_CLASS)]
