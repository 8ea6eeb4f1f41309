"""Tasks from lmms-eval task YAMLs (`--include_path DIR`), mapped onto `Task` records.

A YAML maps when it uses the pieces our tasks are made of: a dataset (Hub id or a local `save_to_disk`
folder), its split, a prompt built from one field (`doc_to_text: question`, a template around one field
`"Q: {{question}}"`, or the field between lmms-eval's `lmms_eval_specific_kwargs` pre_prompt and
post_prompt, which is what lmms-eval's usual `doc_to_text(doc, lmms_eval_specific_kwargs)` computes),
an answer field, an image field, greedy `generation_kwargs` and one of the metrics below. Anything else
(`!function` code, filters, few-shot settings) is refused with an error that names the key.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import Task

# metric_list entries we score: (metric, its options) -> (our scorer, the metric name it reports)
METRICS = {
    ("exact_match", True, True): ("exact", "exact_match"),  # case and punctuation ignored, as GQA's YAML
    ("anls", False, False): ("anls", "anls"),
}
IGNORED_KEYS = {"task", "tag", "group", "metadata", "training_split", "validation_split", "test_split", "include",
                "dataset_path", "dataset_name", "dataset_kwargs", "output_type", "doc_to_visual", "doc_to_text",
                "doc_to_target", "generation_kwargs", "metric_list", "lmms_eval_specific_kwargs"}
GREEDY = {"temperature": (0, 0.0), "do_sample": (False,), "num_beams": (1,), "top_p": None, "top_k": None}
TEMPLATE = re.compile(r"^(?P<pre>[^{}]*)\{\{\s*(?P<field>\w+)\s*\}\}(?P<post>[^{}]*)$", re.S)


class TaskYamlError(ValueError):
    """A YAML that does not map onto a Task; the message names the file, the key and what to write instead."""


class FunctionRef(str):
    """A `!function module.name` value: code, which a Task record does not run."""


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


def _field(path: Path, key: str, value) -> str:
    if isinstance(value, FunctionRef):
        raise TaskYamlError(f"{path}: {key}: !function {value} is code, which our Task records do not run: name a "
                            f"field of the dataset ({key}: question)")
    if not isinstance(value, str):
        raise TaskYamlError(f"{path}: {key} must name a field of the dataset, got {value!r}")
    return value


def _prompts(path: Path, config: dict) -> tuple[str, dict]:
    """The question field and the prompt kwargs per family."""
    text = _field(path, "doc_to_text", config.get("doc_to_text"))
    kwargs = config.get("lmms_eval_specific_kwargs") or {"default": {}}
    template = TEMPLATE.match(text)
    if "{" in text and not template:
        raise TaskYamlError(f"{path}: doc_to_text {text!r}: only a template around one field maps (\"Q: {{{{question}}}}"
                            "\\nA:\")")
    if template and config.get("lmms_eval_specific_kwargs"):
        raise TaskYamlError(f"{path}: lmms_eval_specific_kwargs with a template doc_to_text: give the field name alone")
    if "default" not in kwargs:
        raise TaskYamlError(f"{path}: lmms_eval_specific_kwargs needs a default entry")
    prompts = {}
    for family, kw in kwargs.items():
        unknown = sorted(set(kw or {}) - {"pre_prompt", "post_prompt"})
        if unknown:
            raise TaskYamlError(f"{path}: lmms_eval_specific_kwargs.{family}.{unknown[0]} is not supported: only "
                                "pre_prompt and post_prompt map onto our prompts")
        prompts[family] = {"pre_prompt": (kw or {}).get("pre_prompt", ""), "post_prompt": (kw or {}).get("post_prompt", "")}
    if template:
        prompts = {"default": {"pre_prompt": template["pre"], "post_prompt": template["post"]}}
        text = template["field"]
    return text, prompts


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
    unknown = sorted(set(config) - IGNORED_KEYS)
    if unknown:
        raise TaskYamlError(f"{path}: {unknown[0]} is not supported by evaluation/run.py's tasks (supported: "
                            f"{', '.join(sorted(IGNORED_KEYS))})")
    if config.get("output_type", "generate_until") != "generate_until":
        raise TaskYamlError(f"{path}: output_type {config['output_type']!r} is not supported: generate_until")
    extra = sorted(set(config.get("dataset_kwargs") or {}) - {"load_from_disk", "token"})
    if extra:
        raise TaskYamlError(f"{path}: dataset_kwargs.{extra[0]} is not supported (load_from_disk, token)")
    split = config.get("test_split") or config.get("validation_split")
    if not split or "dataset_path" not in config:
        raise TaskYamlError(f"{path}: a task needs dataset_path and test_split (or validation_split)")
    question, prompts = _prompts(path, config)
    visual = config.get("doc_to_visual")
    scorer, primary = _metric(path, config.get("metric_list"))
    return Task(
        name=str(config["task"]), dataset=str(config["dataset_path"]), config=config.get("dataset_name"), split=split,
        question=question, answer=_field(path, "doc_to_target", config.get("doc_to_target")),
        image=_field(path, "doc_to_visual", visual) if visual is not None else None, fmt="question", prompts=prompts,
        target="list", scorer=scorer, primary=primary, **_generation(path, config.get("generation_kwargs")),
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
