"""Task definitions equal lmms-eval 0.7.3's: dataset path, config and split, metric, generation settings
per model family, prompt text (and MMMU's interleaved messages for chat models), targets and visuals.

lmms-eval's task YAMLs and utils come from the installed package (tests/lmms_eval_reference.py); the
documents are the offline copies' rows (the Hub schema) plus hand-made edge cases.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lmms_eval_reference import TASK_FILES, LmmsEval, require_lmms_eval  # noqa: E402

from evaluation.runner import cut_at_stop_strings, generation_kwargs  # noqa: E402
from evaluation.tasks import LMMS_MODELS, TASKS, get_task  # noqa: E402
from evaluation.tasks.formats import mmmu_image_fields, text_sample  # noqa: E402
from evaluation.tasks.synthetic import _rows  # noqa: E402

require_lmms_eval()
FAMILIES = sorted(LMMS_MODELS)


@pytest.fixture(scope="module")
def lmms():
    return LmmsEval()


def test_every_listed_task_is_an_lmms_eval_task():
    assert set(TASKS) - {"synthvqa", "synthvqa_hard"} == set(TASK_FILES)  # SynthVQA is ours, with its own scorer


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_dataset_split_and_metric(lmms, name):
    config, task = lmms.task_config(name), get_task(name)
    assert (task.dataset, task.config, task.split) == (config["dataset_path"], config.get("dataset_name"),
                                                       config["test_split"])
    assert task.primary == config["metric_list"][0]["metric"]


def test_gqa_joins_the_image_table_lmms_eval_loads(lmms):
    import inspect

    source = inspect.getsource(lmms.utils["gqa"].gqa_process_docs)
    dataset, config, split, key_there, key_here = get_task("gqa").image_join
    assert f'load_dataset("{dataset}", "{config}", split="{split}"' in source
    assert f'row["{key_there}"]' in source and f'doc["{key_here}"]' in source


def _model_facts(lmms):
    """For each lmms-eval model our families map to: chat or simple, default max_new_tokens, cuts at `until`."""
    tree = ast.parse(lmms.model_source("__init__.py"))
    chat_models = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                       and getattr(node.targets[0], "id", "") == "AVAILABLE_CHAT_TEMPLATE_MODELS")
    facts = {}
    for model in LMMS_MODELS.values():
        chat = model.name in chat_models
        source = lmms.model_source(f"{'chat' if chat else 'simple'}/{model.name}.py")
        method = source[source.index("def generate_until("):]
        method = re.split(r"\n    def |\nclass ", method)[0]
        default = re.search(r'"max_new_tokens"\]? ?[:=] ?(\d+)', method)
        facts[model.name] = (chat, int(default.group(1)), "for term in until" in method)
    return facts


def test_family_models_match_lmms_eval_sources(lmms):
    facts = _model_facts(lmms)
    for model in LMMS_MODELS.values():
        chat, default, cuts_at_until = facts[model.name]
        assert (model.chat, model.max_new_tokens) == (chat, default), model.name
        assert cuts_at_until == (not chat), model.name  # chat models never read `until`


@pytest.mark.parametrize("name", sorted(TASK_FILES))
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_settings(lmms, name, family):
    task, model = get_task(name), LMMS_MODELS[family]
    theirs = lmms.generation_kwargs(lmms.task_config(name))
    expected = {"max_new_tokens": theirs.get("max_new_tokens", model.max_new_tokens), "do_sample": False,
                "num_beams": theirs.get("num_beams", 1)}
    if not model.chat:
        expected["until"] = theirs["until"]
    assert theirs.get("temperature", 0) == 0 and not theirs.get("do_sample")
    assert generation_kwargs(task, {}, family) == expected


def test_stop_strings_cut_like_lmms_eval():
    assert cut_at_stop_strings(" B\n\nBecause ASSISTANT: x", ["\n\n"]) == "B"
    assert cut_at_stop_strings("x ASSISTANT: y\n\nz", ["\n\n", "ASSISTANT:"]) == "x"  # the earliest stop wins
    assert cut_at_stop_strings(" no stop ", ["", "\n\n"]) == "no stop"


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (i, 0, 0))


def _edge_docs(name: str) -> list[dict]:
    """Rows whose prompts exercise the formats' corner cases."""
    if name == "mme":
        return [{"question": q, "answer": "Yes", "category": "count", "question_id": "count/1.png"} for q in (
            " Is there a dog? Please answer yes or no. ", "Is there a dog?", "Please answer yes or no. Is it?",
            "Is it? Please answer yes or no. Please answer yes or no.")]
    if name == "scienceqa_img":
        return [{"question": "Which?", "choices": ["a", "b"], "answer": 0, "hint": hint, "subject": "x"}
                for hint in ("", None, "A long hint.\nTwo lines.")]
    if name == "textvqa_val":
        return [{"question": q, "answers": ["x"] * 10, "question_id": 1} for q in
                ("what is this?", "iPhone model?", "WHAT IS THIS?", " leading space?")]
    if name == "ocrbench":
        return [{"question": "  what?\n", "answer": ["x"], "dataset": "IIIT5K", "question_type": "Doc-oriented VQA"}]
    if name == "realworldqa":
        return [{"question": " Where?\nA. here\nB. there\nPlease answer directly with only the letter of the correct "
                             "option and nothing else. ", "answer": "A"}]
    if name == "mmmu_val":
        images = {f"image_{k}": _image(k) for k in range(1, 8)}
        questions = [("<image 2> left, <image 1> right: which?", "['x', 'y']"),
                     ("Compare <image 1> and <image 1> again.", "['a', 'b', 'c']"),
                     ("No image here.", "['a', 'b']"), ("Which option?", "['<image 3>', '<image 4>']"),
                     ("<image 1>", "['p', 'q']")]
        docs = [dict(images, id=f"validation_Math_{i}", question=q, options=o, answer="A",
                     question_type="multiple-choice", subfield="x") for i, (q, o) in enumerate(questions)]
        return docs + [dict(images, id="validation_Math_9", question="<image 1> How much? <image 2>", options="[]",
                            answer="3", question_type="open", subfield="x")]
    return []


def _docs(name: str) -> list[dict]:
    rows, _ = _rows(name, 6, np.random.default_rng(0))
    return rows + _edge_docs(name)


def _doc_to_text(lmms, name):
    config = lmms.task_config(name)
    utils = lmms.utils[TASK_FILES[name].split("/")[0]]
    return config, getattr(utils, config["doc_to_text"].split(".", 1)[1])


@pytest.mark.parametrize("name, family", [(n, f) for n in sorted(TASK_FILES) for f in FAMILIES
                                          if not (get_task(n).messages and LMMS_MODELS[f].chat)])  # see below
def test_prompt_text(lmms, name, family):
    config, doc_to_text = _doc_to_text(lmms, name)
    task, model = get_task(name), LMMS_MODELS[family]
    if name == "mmmu_val":  # doc_to_messages (run by another test) flips this module-level switch for good
        lmms.utils["mmmu"].config["metadata"]["interleaved_format"] = False
    kwargs = lmms.specific_kwargs(config, model.name)
    for i, doc in enumerate(_docs(name)):
        with lmms.active():
            expected = doc_to_text(doc, kwargs)
        assert text_sample(task, doc, family, i)["prompt"] == expected, (name, family, doc.get("question"))


@pytest.mark.parametrize("family", [f for f in FAMILIES if LMMS_MODELS[f].chat])
def test_mmmu_messages_for_chat_models(lmms, family):
    """lmms-eval's doc_to_messages places each image at its "<image i>" place; so does our content."""
    config = lmms.task_config("mmmu_val")
    task, utils = get_task("mmmu_val"), lmms.utils["mmmu"]
    kwargs = lmms.specific_kwargs(config, LMMS_MODELS[family].name)
    for i, doc in enumerate(_docs("mmmu_val")):
        with lmms.active():
            messages = utils.mmmu_doc_to_messages(doc, kwargs)
            interleaved_text = utils.mmmu_doc_to_text(doc, kwargs)
        pixels = [doc[f].tobytes() for f in mmmu_image_fields(task, doc)]  # each test image has its own colour
        expected = [{"type": "image", "index": pixels.index(part["url"].tobytes())} if part["type"] == "image" else part
                    for part in messages[0]["content"]]
        sample = text_sample(task, doc, family, i)
        assert sample["content"] == expected, doc["question"]
        assert sample["prompt"] == interleaved_text


# TextVQA's process_results scores doc["answers"]; its doc_to_target names a field the dataset lacks
SCORED_TARGET = {"textvqa_val": "answers"}


@pytest.mark.parametrize("name", sorted(TASK_FILES))
def test_targets(lmms, name):
    config = lmms.task_config(name)
    task = get_task(name)
    utils = lmms.utils[TASK_FILES[name].split("/")[0]]
    for i, doc in enumerate(_docs(name)):
        target = SCORED_TARGET.get(name, config["doc_to_target"])
        if target.startswith("utils."):
            fn = getattr(utils, target.split(".", 1)[1])
            kwargs = ("mcq",) if config.get("model_specific_target_kwargs") else ()
            target = fn(doc, *kwargs)
        else:
            target = doc[target]
        expected = list(target) if isinstance(target, list) else [target]
        assert text_sample(task, doc, "qwen2_vl", i)["answers"] == expected


def test_mmmu_visuals(lmms):
    task = get_task("mmmu_val")
    for doc in _docs("mmmu_val"):
        with lmms.active():
            theirs = lmms.utils["mmmu"].mmmu_doc_to_visual(doc)
        ours = [doc[f].convert("RGB") for f in mmmu_image_fields(task, doc)]
        assert [im.tobytes() for im in ours] == [im.tobytes() for im in theirs], doc["question"]
