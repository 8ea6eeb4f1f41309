"""Tasks from lmms-eval task YAMLs (`--include_path DIR`), mapped onto `Task` records.

A YAML maps when it uses the pieces our tasks are made of: a dataset (Hub id or a local `save_to_disk`
folder), its split, `doc_to_text` / `doc_to_target` / `doc_to_visual` as lmms-eval reads them (a field
name, a Jinja-style template around one field, or `!function module.name` from a file beside the YAML,
called as lmms-eval calls it, with `lmms_eval_specific_kwargs` for `doc_to_text`), greedy
`generation_kwargs` and one of the metrics below. Anything else (`process_results`, filters, few-shot
settings) is refused with an error that names the key.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

from . import Task
from .formats import FORMATS, TARGETS, VISUALS

log = logging.getLogger("evaluation")

# metric_list entries we score: (metric, its options) -> (our scorer, the metric name it reports)
METRICS = {
    ("exact_match", True, True): ("exact", "exact_match"),  # case and punctuation ignored, as GQA's YAML
    ("anls", False, False): ("anls", "anls"),
}
SUPPORTED_KEYS = {"task", "tag", "group", "metadata", "training_split", "validation_split", "test_split", "include",
                "dataset_path", "dataset_name", "dataset_kwargs", "output_type", "doc_to_visual", "doc_to_text",
                "doc_to_target", "generation_kwargs", "metric_list", "lmms_eval_specific_kwargs"}
GREEDY = {"temperature": (0, 0.0), "do_sample": (False,), "num_beams": (1,), "top_p": None, "top_k": None}
TEMPLATE = re.compile(r"^(?P<pre>[^{}]*)\{\{\s*(?P<field>\w+)\s*\}\}(?P<post>[^{}]*)$", re.S)


class TaskYamlError(ValueError):
    """A YAML that does not map onto a Task; the message names the file, the key and what to write instead."""


class FunctionRef(str):
    """A `!function module.name` value, resolved by `_function` against the YAML's folder."""


def _loader():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
    return Loader


def read_yaml(path: Path) -> dict:
    """A task YAML with its `include:` (a path relative to it) merged underneath, as lmms-eval reads it."""
    import yaml

    try:
        config = yaml.load(path.read_text(), Loader=_loader()) or {}  # noqa: S506 - SafeLoader plus !function
    except yaml.YAMLError as exc:
        raise TaskYamlError(f"{path}: not readable YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(config, dict):
        raise TaskYamlError(f"{path}: not a mapping of task keys")
    included = config.pop("include", None)
    if included:
        config = {**read_yaml(path.parent / included), **config}
    return config


def _function(path: Path, key: str, ref: str):
    """The callable `!function module.name` names: module.py beside the YAML, imported as lmms-eval does."""
    module_name, _, name = ref.rpartition(".")
    source = path.parent / f"{module_name}.py"
    try:
        spec = importlib.util.spec_from_file_location(f"yaml_task_{abs(hash(str(source)))}_{module_name}", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return getattr(module, name)
    except (OSError, AttributeError, ImportError, SyntaxError) as exc:
        raise TaskYamlError(f"{path}: {key}: !function {ref} cannot be loaded from {source} ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from None


def _field(path: Path, key: str, value) -> str:
    if not isinstance(value, str):
        raise TaskYamlError(f"{path}: {key} must name a field of the dataset or a !function, got {value!r}")
    if "{" in value:
        raise TaskYamlError(f"{path}: {key} {value!r}: a template maps only in doc_to_text; name a field or a !function")
    return value


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _text(path: Path, config: dict) -> tuple[str, str, dict]:
    """(the question field, the prompt format, the prompt kwargs per family) of `doc_to_text`."""
    text = config.get("doc_to_text")
    kwargs = config.get("lmms_eval_specific_kwargs")
    if isinstance(text, FunctionRef):  # called as lmms-eval calls it: with the family's kwargs when the YAML has some
        function = _function(path, "doc_to_text", text)
        key = f"yaml:{path}:doc_to_text"
        FORMATS[key] = (lambda task, row, kw: function(row, kw)) if kwargs else (lambda task, row, kw: function(row))
        if kwargs and "default" not in kwargs:
            raise TaskYamlError(f"{path}: lmms_eval_specific_kwargs needs a default entry")
        return "question", key, dict(kwargs or {"default": {}})
    if kwargs:  # lmms-eval passes them to a !function doc_to_text only
        log.warning("%s: lmms_eval_specific_kwargs are not used with doc_to_text %r (lmms-eval passes them to a "
                    "!function doc_to_text only)", path, text)
    if not isinstance(text, str):
        raise TaskYamlError(f"{path}: doc_to_text must name a field, a template or a !function, got {text!r}")
    template = TEMPLATE.match(text)
    if "{" in text and not template:
        raise TaskYamlError(f"{path}: doc_to_text {text!r}: only a template around one field maps (\"Q: {{{{question}}}}"
                            "\\nA:\"); write a !function for more")
    pre, field, post = (template["pre"], template["field"], template["post"]) if template else ("", text, "")
    return field, "question", {"default": {"pre_prompt": pre, "post_prompt": post}}


def _target(path: Path, value) -> tuple[str, str]:
    """(the answer field, the reference builder) of `doc_to_target`."""
    if isinstance(value, FunctionRef):
        function = _function(path, "doc_to_target", value)
        key = f"yaml:{path}:doc_to_target"
        TARGETS[key] = lambda task, row: _as_list(function(row))
        return "answer", key
    return _field(path, "doc_to_target", value), "list"


def _visual(path: Path, value) -> str | None:
    """The image field of `doc_to_visual`, or the key of its function in VISUALS; None: text only."""
    if value is None:
        return None
    if isinstance(value, FunctionRef):
        key = f"yaml:{path}:doc_to_visual"
        VISUALS[key] = _function(path, "doc_to_visual", value)
        return key
    return _field(path, "doc_to_visual", value)


def _generation(path: Path, kwargs: dict) -> dict:
    out = {}
    for key, value in (kwargs or {}).items():
        if key in ("max_new_tokens", "until"):
            out[key] = value
        elif key not in GREEDY or (GREEDY[key] is not None and value not in GREEDY[key]):
            raise TaskYamlError(f"{path}: generation_kwargs.{key}={value!r} is not supported: our tasks generate "
                                "greedily with max_new_tokens and until")
    until = out.get("until", ("\n\n",))
    return {"max_new_tokens": out.get("max_new_tokens"), "until": tuple([until] if isinstance(until, str) else until)}


def _metric(path: Path, metric_list) -> tuple[str, str]:
    if not metric_list:
        raise TaskYamlError(f"{path}: metric_list is missing: give one metric (exact_match or anls)")
    entry = metric_list[0]
    name = entry.get("metric")
    if entry.get("aggregation", "mean") != "mean":
        raise TaskYamlError(f"{path}: metric_list {name}: aggregation {entry['aggregation']!r} is not supported: mean")
    key = (name, bool(entry.get("ignore_case")), bool(entry.get("ignore_punctuation")))
    if key not in METRICS:
        raise TaskYamlError(f"{path}: metric_list {name} {dict(entry)} is not supported: use exact_match with "
                            "ignore_case: true and ignore_punctuation: true, or anls")
    return METRICS[key]


def task_from_yaml(path: Path, config: dict) -> Task:
    unknown = sorted(set(config) - SUPPORTED_KEYS)
    if unknown:
        raise TaskYamlError(f"{path}: {unknown[0]} is not supported by evaluation/run.py's tasks (supported: "
                            f"{', '.join(sorted(SUPPORTED_KEYS))})")
    if config.get("output_type", "generate_until") != "generate_until":
        raise TaskYamlError(f"{path}: output_type {config['output_type']!r} is not supported: generate_until")
    extra = sorted(set(config.get("dataset_kwargs") or {}) - {"load_from_disk", "token"})
    if extra:
        raise TaskYamlError(f"{path}: dataset_kwargs.{extra[0]} is not supported (load_from_disk, token)")
    split = config.get("test_split") or config.get("validation_split")
    if not split or "dataset_path" not in config:
        raise TaskYamlError(f"{path}: a task needs dataset_path and test_split (or validation_split)")
    question, fmt, prompts = _text(path, config)
    answer, target = _target(path, config.get("doc_to_target"))
    scorer, primary = _metric(path, config.get("metric_list"))
    return Task(
        name=str(config["task"]), dataset=str(config["dataset_path"]), config=config.get("dataset_name"), split=split,
        question=question, answer=answer, image=_visual(path, config.get("doc_to_visual")), fmt=fmt, prompts=prompts,
        target=target, scorer=scorer, primary=primary, **_generation(path, config.get("generation_kwargs")),
    )


def load_include_path(folder: str) -> dict[str, Task]:
    """Every task YAML under `folder` (recursively; files without a `task` key, such as templates, are skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise TaskYamlError(f"{folder} is not a folder: --include_path takes a folder of lmms-eval task YAMLs")
    tasks = {}
    for path in sorted(root.rglob("*.yaml")):
        config = read_yaml(path)
        if "task" not in config:
            continue
        if not isinstance(config["task"], str):
            raise TaskYamlError(f"{path}: a group of tasks (task: [...]) is not supported: one YAML per task")
        tasks[config["task"]] = task_from_yaml(path, config)
    if not tasks:
        raise TaskYamlError(f"{folder} holds no task YAML (*.yaml with a task: key)")
    return tasks
