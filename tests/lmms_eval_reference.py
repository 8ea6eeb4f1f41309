"""lmms-eval 0.7.3 itself, as the reference the parity tests compare against: its task YAMLs and the task
utils, metric and filter functions that score them, imported from the installed package.

Import plumbing that no scoring path uses is stubbed, only while lmms-eval's modules load and run
(sys.modules is restored afterwards, so other tests see the real package):
- `lmms_eval.tasks` (the package __init__ builds the task index through the whole evaluator; the
  task utils modules below it load without it),
- `lmms_eval.api.registry` (metric/filter registration decorators; imports HF `evaluate` and the model base),
- `lmms_eval.verifiers` (MMMU's LLM-judge for its reasoning variant, needs `openai`),
- `cv2` and `sacrebleu` when missing (Video-MME's subtitle frames; BLEU metrics).
CI installs the wheel without its dependencies (see pyproject's `test` extra and .ci/run); with
CI=true a missing lmms-eval fails these tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

LMMS_EVAL_VERSION = "0.7.3"
TASK_FILES = {  # our task name -> lmms-eval's task YAML
    "docvqa_val": "docvqa/docvqa_val.yaml", "chartqa": "chartqa/chartqa.yaml",
    "textvqa_val": "textvqa/textvqa_val.yaml",
    "ocrbench": "ocrbench/ocrbench.yaml", "ai2d": "ai2d/ai2d.yaml", "mmmu_val": "mmmu/mmmu_val.yaml",
    "mme": "mme/mme.yaml", "gqa": "gqa/gqa.yaml", "scienceqa_img": "scienceqa/scienceqa_img.yaml",
    "realworldqa": "realworldqa/realworldqa.yaml", "videomme": "videomme/videomme.yaml",
}
UTILS = ("docvqa", "chartqa", "textvqa", "ocrbench", "ai2d", "mmmu", "mme", "gqa", "scienceqa", "realworldqa",
         "videomme")


def require_lmms_eval() -> Path:
    """The installed lmms_eval package folder; skip (fail under CI=true) when it is missing or another version."""
    spec = importlib.util.find_spec("lmms_eval")
    problem = None
    if spec is None:
        problem = "lmms-eval is not installed"
    else:
        from importlib.metadata import version

        if version("lmms_eval") != LMMS_EVAL_VERSION:
            problem = f"lmms-eval {version('lmms_eval')} is installed, the parity tests need {LMMS_EVAL_VERSION}"
    if problem:
        message = f"{problem}: pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION} (see .ci/run)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
    return Path(spec.origin).parent


def _stub(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _passthrough_decorator(*args, **kwargs):
    return lambda fn: fn


class _Verifier:  # stands in for the OpenAI judge, never called by the scoring paths tested
    def __init__(self, *args, **kwargs):
        raise RuntimeError("the LLM judge is stubbed out in the parity tests")


class LmmsEval:
    """lmms-eval's task utils (`self.utils[name]`), metrics and filters, and its task YAMLs."""

    def __init__(self):
        self.root = require_lmms_eval()
        stubs = {
            "lmms_eval.tasks": _stub("lmms_eval.tasks", __path__=[str(self.root / "tasks")]),
            "lmms_eval.api.registry": _stub("lmms_eval.api.registry", register_metric=_passthrough_decorator,
                                            register_aggregation=_passthrough_decorator,
                                            register_filter=_passthrough_decorator),
            "lmms_eval.verifiers": _stub("lmms_eval.verifiers", VerificationPipeline=_Verifier),
            "lmms_eval.verifiers.openai": _stub("lmms_eval.verifiers.openai", OpenAIVerifier=_Verifier),
        }
        for optional in ("cv2", "sacrebleu"):
            if importlib.util.find_spec(optional) is None:
                stubs[optional] = _stub(optional)
        saved = {name: sys.modules.get(name) for name in list(sys.modules) if self._ours(name)}
        try:
            for name in saved:
                del sys.modules[name]
            sys.modules.update(stubs)
            self.metrics = importlib.import_module("lmms_eval.api.metrics")
            self.utils = {name: importlib.import_module(f"lmms_eval.tasks.{name}.utils") for name in UTILS}
            self.mcq_utils = importlib.import_module("lmms_eval.tasks._task_utils.mmmu_mcq_utils")
            importlib.import_module("lmms_eval.tasks._task_utils.mcq_extract")  # imported lazily by two tasks
            self.modules = {name: mod for name, mod in sys.modules.items() if self._ours(name)}
        finally:
            self._restore(saved)

    @staticmethod
    def _ours(name: str) -> bool:
        return name == "lmms_eval" or name.startswith("lmms_eval.") or name in ("cv2", "sacrebleu")

    def _restore(self, saved: dict) -> None:
        for name in [n for n in sys.modules if self._ours(n)]:
            del sys.modules[name]
        sys.modules.update({k: v for k, v in saved.items() if v is not None})

    @contextlib.contextmanager
    def active(self):
        """lmms-eval's modules (and stubs) in sys.modules, for its functions that import lazily."""
        saved = {name: sys.modules.get(name) for name in list(sys.modules) if self._ours(name)}
        sys.modules.update(self.modules)
        try:
            yield self
        finally:
            self._restore(saved)

    # ------------------------------------------------------------------ YAML

    def task_config(self, name: str) -> dict:
        """A task YAML with its `include` merged in; `!function utils.f` values become "utils.f"."""
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
        path = self.root / "tasks" / TASK_FILES[name]

        def load(p: Path) -> dict:
            config = yaml.load(p.read_text(), Loader=Loader) or {}
            if "include" in config:
                config = {**load(p.parent / config.pop("include")), **config}
            return config

        return load(path)

    @staticmethod
    def specific_kwargs(config: dict, model_name: str) -> dict:
        """lmms_eval_specific_kwargs as ConfigurableTask resolves them for `model_name`."""
        import copy

        kwargs = copy.deepcopy(config.get("lmms_eval_specific_kwargs"))
        if kwargs is None:
            return None
        if model_name in kwargs:
            return kwargs[model_name]
        if "default" in kwargs:
            kwargs.update(kwargs["default"])
        return kwargs

    @staticmethod
    def generation_kwargs(config: dict) -> dict:
        """generation_kwargs after TaskConfig's defaults (until = the few-shot delimiter when not given)."""
        kwargs = dict(config.get("generation_kwargs") or {})
        if not kwargs:
            return {"until": ["\n\n"], "do_sample": False}
        kwargs.setdefault("until", ["\n\n"])
        return kwargs

    def model_source(self, relative: str) -> str:
        return (self.root / "models" / relative).read_text()
