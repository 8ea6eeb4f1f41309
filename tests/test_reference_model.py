"""SynthVQA and the trained reference models (evaluation/reference/).

The dataset, scorer and training-script tests always run. The accuracy and KV-cache tests need
the trained checkpoints in evaluation/reference/checkpoints/<arch>/ and are skipped without them.
"""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation.reference import models, synthvqa  # noqa: E402

CHECKPOINTS = ROOT / "evaluation" / "reference" / "checkpoints"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the benchmark


def test_splits_are_deterministic_and_distinct():
    a, b = synthvqa.build_split("test", 10), synthvqa.build_split("test", 10)
    assert a["question"] == b["question"] and a["answers"] == b["answers"]
    assert [_png(x) for x in a["image"]] == [_png(x) for x in b["image"]]
    v = synthvqa.build_split("validation", 10)
    assert v["question_id"] != a["question_id"]
    assert [_png(x) for x in v["image"]] != [_png(x) for x in a["image"]]
    # a sample depends only on (split, index): a slice equals the same rows of a longer split
    tail = synthvqa.build_split("test", 3, start=7)
    assert tail["question"] == a["question"][7:] and tail["question_id"] == a["question_id"][7:]


def test_schema_matches_real_vqa_tasks():
    import datasets

    ds = synthvqa.build_split("validation", 5)
    assert set(ds.column_names) == {"question_id", "image", "question", "answers", "question_type"}
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["answers"].feature.dtype == "string"
    row = ds[0]
    assert row["image"].size == (synthvqa.IMAGE_SIZE, synthvqa.IMAGE_SIZE) and row["image"].mode == "RGB"
    assert isinstance(row["answers"], list) and all(isinstance(a, str) for a in row["answers"])
    dd = synthvqa.build_dataset({"train": 5, "validation": 5, "test": 5})
    assert set(dd) == {"train", "validation", "test"}
    with pytest.raises(ValueError, match="validation"):
        synthvqa.make_sample("dev", 0)
    with pytest.raises(ValueError, match="long_context"):
        synthvqa.make_sample("test", 0, question_type="colour")


@pytest.mark.parametrize("split", ["test", "test_hard"])
def test_question_types_cover_all_kinds_with_valid_answers(split):
    ds = synthvqa.build_split(split, 200)
    types = ds["question_type"]
    assert {t: types.count(t) for t in synthvqa.QUESTION_TYPES} == {t: 40 for t in synthvqa.QUESTION_TYPES}
    colors, shapes, sizes = set(synthvqa.COLORS), set(synthvqa.SHAPES), set(synthvqa.SIZES)
    texts = set(synthvqa.WORDS) | {str(i) for i in range(10, 100)}
    seen = {t: set() for t in synthvqa.QUESTION_TYPES}
    for row in ds:
        (answer,) = row["answers"]
        seen[row["question_type"]].add(answer)
        t = row["question_type"]
        if t == "attribute":
            assert answer in colors | shapes | sizes
        elif t == "count":
            assert answer in {"0", "1", "2", "3", "4"}
        elif t == "relation":
            assert answer in {"left", "right", "above", "below"}
        elif t == "ocr":
            assert answer in texts
        else:
            size, color, shape = answer.split()
            assert size in sizes and color in colors and shape in shapes
            # the question comes at the end of a long text prompt
            assert len(row["question"].split()) > 80 and row["question"].rstrip().endswith(".")
            assert "row" in row["question"].split("\n")[-1]
    # answers are varied, not a constant per type
    assert len(seen["count"]) == 5 and len(seen["relation"]) == 4 and len(seen["ocr"]) > 10
    assert len(seen["attribute"]) > 8 and len(seen["long_context"]) > 15


ASKED = {"attribute": ("What shape is in row", "What color is the shape in row", "What size is the shape in row"),
         "count": ("How many",), "relation": ("Where is the",), "ocr": synthvqa.OCR_QUESTIONS,
         "long_context": ("Describe the shape in row",)}


def test_hard_split_asks_the_same_questions_after_notes():
    """test_hard: seeded and sliceable as the others, disjoint from them, the test schema and answers, every
    question after a block of notes (long-context ones after twice the notes)."""
    n = 100
    hard = synthvqa.build_split("test_hard", n)
    again = synthvqa.build_split("test_hard", 3, start=7)
    assert again["question"] == hard["question"][7:10] and again["answers"] == hard["answers"][7:10]
    assert [_png(x) for x in again["image"]] == [_png(x) for x in hard["image"][7:10]]
    assert hard.features == synthvqa.features()
    assert hard["question_type"] == [synthvqa.QUESTION_TYPES[i % 5] for i in range(n)]
    others = {split: synthvqa.build_split(split, n) for split in ("train", "validation", "test")}
    for split, ds in others.items():
        assert not set(hard["question_id"]) & set(ds["question_id"]), split
        assert not {_png(x) for x in hard["image"]} & {_png(x) for x in ds["image"]}, split
    test = others["test"]
    for row, plain in zip(hard, test):
        question = row["question"]
        assert question.startswith("Notes: ") and question.count("Ignore the notes.") == 1
        asked = question.split("\nIgnore the notes. ")[-1]
        (answer,) = row["answers"]
        if row["question_type"] == "long_context":
            # one notes block has 14-18 sentences; the hard split's long-context notes have two
            assert question.count(". ") > 2 * 14 and asked.startswith("Describe the shape in row")
            assert len(answer.split()) == 3
        else:
            assert question.count(". ") >= 14 and "Notes" not in plain["question"]
        # after the notes, the question is worded as the test split words its type
        assert row["question_type"] == plain["question_type"] and asked.startswith(ASKED[row["question_type"]])
    assert min(len(q) for q in hard["question"]) > max(len(q) for q, t in zip(test["question"], test["question_type"])
                                                      if t != "long_context")
    assert set(synthvqa.build_dataset({"train": 2, "validation": 2, "test": 2})) == {"train", "validation", "test"}


def test_training_questions_come_after_notes_at_the_asked_share():
    """`notes_share` asks that share of the training questions as the hard splits do (the answer and the
    follow-up turns unchanged); validation_hard holds hard-form questions of its own."""
    plain = [synthvqa.make_training_sample(i, follow_ups=2) for i in range(200)]
    mixed = [synthvqa.make_training_sample(i, follow_ups=2, notes_share=0.5) for i in range(200)]
    lengthened = 0
    for a, b in zip(plain, mixed):
        assert a["answers"] == b["answers"] and a["turns"][1:] == b["turns"][1:] and b["turns"][0][0] == b["question"]
        if b["question"] != a["question"]:
            lengthened += 1
            assert b["question"].startswith("Notes: ") and b["question"].count(". ") >= 14
            if a["question_type"] != "long_context":
                assert b["question"].endswith("\nIgnore the notes. " + a["question"])
    assert 70 <= lengthened <= 130
    val_hard = synthvqa.build_split("validation_hard", 20)
    assert all(q.startswith("Notes: ") for q in val_hard["question"])
    assert not set(val_hard["question"]) & set(synthvqa.build_split("test_hard", 20)["question"])


def test_scenes_show_their_answers():
    """A colour asked about is drawn: the image holds pixels of exactly that RGB value."""
    n = 0
    for i in range(0, 200, 5):
        row = synthvqa.make_sample("test", i)  # attribute questions (i % 5 == 0)
        assert row["question_type"] == "attribute"
        if row["question"].startswith("What color"):
            rgb = synthvqa.COLORS[row["answers"][0]]
            assert rgb in {c for _, c in row["image"].getcolors(1 << 16)}
            n += 1
    assert n > 5


def test_answer_checker():
    em = synthvqa.exact_match
    assert em("Red", ["red"]) == 1.0
    assert em("  big  red circle. ", ["big red circle"]) == 1.0
    assert em("red circle", ["big red circle"]) == 0.0
    assert em("3", "3") == 1.0 and em("13", "3") == 0.0
    assert em("", ["red"]) == 0.0
    acc = synthvqa.accuracy(["red", "2", "left", "x"], [["red"], ["3"], ["left"], ["cat"]],
                            ["attribute", "count", "relation", "ocr"])
    assert acc["overall"] == 0.5 and acc["n"] == 4
    assert acc["per_type"] == {"attribute": 1.0, "count": 0.0, "ocr": 0.0, "relation": 1.0}
    with pytest.raises(ValueError):
        synthvqa.accuracy(["a"], [], [])


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_fast_batches_equal_the_processor(arch):
    from evaluation.reference.batching import Batcher

    _, processor = models.build_model(arch)
    batcher = Batcher(processor)
    assert batcher.fast
    samples = [synthvqa.make_sample("train", i) for i in range(10)]  # all five types, long prompts included
    assert batcher.verify(samples) is None
    assert batcher.verify(samples[4:5]) is None


def test_tokenizer_and_labels_cover_only_the_answer():
    from evaluation.reference.batching import Batcher

    model, processor = models.build_model("qwen2_vl")
    tok = processor.tokenizer
    for word in ("circle", "triangle", "purple", "below", "big", " column", " relative"):  # answers follow a newline
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    assert tok.decode(tok("row 12 column 3", add_special_tokens=False)["input_ids"]) == "row 12 column 3"
    samples = [synthvqa.make_sample("train", i) for i in range(5)]
    batch = Batcher(processor).cpu_batch(samples)
    for i, s in enumerate(samples):
        target = batch["labels"][i][batch["labels"][i] != -100]
        assert tok.decode(target.tolist()) == s["answers"][0] + tok.eos_token
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [81] * 5


def test_follow_up_turns_are_the_benchmark_questions_answered_from_the_scene():
    import collections
    import re

    where = r"row (\d) column (\d)"
    kinds = collections.Counter()
    for i in range(200):
        qtype, scene, question, answer, _, _ = synthvqa._draw("train", i, None)
        sample = synthvqa.make_training_sample(i, follow_ups=5)
        assert sample["turns"][0] == (question, answer) and sample["question_type"] == qtype
        assert len(sample["turns"]) == 6 and len({q for q, _ in sample["turns"]}) == 6
        objects = {synthvqa._row_col(cell): obj for cell, obj in scene["objects"].items()}
        pos = {(c, s): rc for rc, (_, c, s) in objects.items()}
        for q, a in sample["turns"][1:]:
            if m := re.fullmatch(rf"What (color|shape|size) is (?:the shape )?in {where}\?", q):
                size, color, shape = objects[(int(m[2]), int(m[3]))]
                assert a == {"color": color, "shape": shape, "size": size}[m[1]]
                kinds["attribute"] += 1
            elif m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
                assert a == str(sum(c == m[1] for _, c, _ in objects.values()))
                kinds["count"] += 1
            elif m := re.fullmatch(r"How many (\w+)s are there\?", q):
                assert a == str(sum(s == m[1] for _, _, s in objects.values()))
                kinds["count"] += 1
            elif m := re.fullmatch(r"Where is the (\w+) (\w+) relative to the (\w+) (\w+)\?", q):
                (ra, ca), (rb, cb) = pos[(m[1], m[2])], pos[(m[3], m[4])]
                assert ra == rb or ca == cb
                assert a == (("left" if ca < cb else "right") if ra == rb else ("above" if ra < rb else "below"))
                kinds["relation"] += 1
            elif m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
                assert a == "row {} column {}".format(*pos[(m[1], m[2])])
                kinds["locate"] += 1
            else:
                assert q in ("What is written in the grid?", "What word or number is written in the grid?"), q
                assert a == scene["text"][1]
                kinds["ocr"] += 1
    # the kind of each follow-up is drawn first: attribute questions (three per object) do not crowd out the rest
    assert all(kinds[k] > 0.15 * sum(kinds.values()) for k in ("attribute", "locate", "count", "relation")), kinds
    described = synthvqa.make_training_sample(3, "describe")
    assert described["question"] == synthvqa.DESCRIBE_QUESTION and described["answers"][0].count("row ") == 16
    with pytest.raises(ValueError, match="describe"):
        synthvqa.make_sample("test", 0, question_type="nope")


def test_follow_up_weights_shift_the_kinds_and_the_relation_steps_are_answered_from_the_scene():
    import collections
    import re

    sys.path.insert(0, str(ROOT / "evaluation" / "reference"))
    from train import follow_up_weights

    weights = follow_up_weights("relation=4,locate_pair=2,row_of=1,column_of=1,same_line=1")
    assert weights == {"attribute": 1.0, "locate": 1.0, "count": 1.0, "relation": 4.0, "ocr": 1.0,
                       "locate_pair": 2.0, "row_of": 1.0, "column_of": 1.0, "same_line": 1.0}
    for bad, message in (("nope=1", "nope"), ("relation=x", "NUMBER"), ("relation=-1", ">= 0")):
        with pytest.raises(Exception, match=message):
            follow_up_weights(bad)
    kinds = collections.Counter()
    for i in range(150):
        _, scene, _, _, _, _ = synthvqa._draw("train", i, "relation")
        pos = {(c, s): synthvqa._row_col(cell) for cell, (_, c, s) in scene["objects"].items()}
        for q, a in synthvqa.make_training_sample(i, "relation", 5, weights)["turns"][1:]:
            if m := re.fullmatch(r"Where are the (\w+) (\w+) and the (\w+) (\w+)\?", q):
                assert a == "row {} column {} and row {} column {}".format(*pos[m[1], m[2]], *pos[m[3], m[4]])
                assert m.group(1, 2) != m.group(3, 4)
                kinds["locate_pair"] += 1
            elif m := re.fullmatch(r"Which (row|column) is the (\w+) (\w+) in\?", q):
                assert a == str(pos[m[2], m[3]][m[1] == "column"])
                kinds[m[1] + "_of"] += 1
            elif m := re.fullmatch(r"Are the (\w+) (\w+) and the (\w+) (\w+) in the same (row|column)\?", q):
                axis = m[5] == "column"
                assert a == ("yes" if pos[m[1], m[2]][axis] == pos[m[3], m[4]][axis] else "no")
                kinds["same_line"] += 1
            else:
                kinds["relation" if "relative to" in q else "other"] += 1
    assert min(kinds[k] for k in ("locate_pair", "row_of", "column_of", "same_line")) > 20, kinds
    assert kinds["relation"] > 0.2 * sum(kinds.values()), kinds
    # without weights: none of the extra kinds, and the same turns as the uniform draw always gave
    plain = [synthvqa.make_training_sample(i, None, 5)["turns"] for i in range(30)]
    assert not any(q.startswith(("Where are", "Which", "Are")) for turns in plain for q, _ in turns)
    assert plain == [synthvqa.make_training_sample(i, None, 5, synthvqa.follow_up_weights())["turns"]
                     for i in range(30)]


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_multi_turn_batches_follow_the_chat_template_and_label_only_the_answers(arch):
    from evaluation.reference.batching import Batcher, training_texts

    _, processor = models.build_model(arch)
    tok = processor.tokenizer
    samples = [synthvqa.make_training_sample(i, follow_ups=3) for i in range(5)]
    texts, _ = training_texts(processor, samples)
    for text, s in zip(texts, samples):
        messages = []
        for k, (q, a) in enumerate(s["turns"]):
            messages.append({"role": "user", "content": ([{"type": "image"}] if k == 0 else []) + [{"type": "text", "text": q}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        assert text == processor.apply_chat_template(messages).rstrip("\n")
    for fast in (True, False):
        batch = Batcher(processor, fast=fast).cpu_batch(samples)
        for i, s in enumerate(samples):
            target = batch["labels"][i][batch["labels"][i] != -100]
            assert tok.decode(target.tolist()) == "".join(a + tok.eos_token for _, a in s["turns"])


def test_training_script_smoke_run_gives_a_loadable_checkpoint(tmp_path):
    import vlmcompress
    from transformers import AutoProcessor

    out = tmp_path / "ref"
    cmd = [sys.executable, str(ROOT / "evaluation" / "reference" / "train.py"), "--smoke", "--out", str(out),
           "--arch", "qwen2_vl,llava_onevision"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    for arch in models.ARCHITECTURES:
        path = out / arch
        weights = path / "model.safetensors"
        assert weights.exists() and weights.stat().st_size <= 30 * 2**20
        metrics = json.loads((path / "metrics.json").read_text())
        assert metrics["steps"] == 3 and set(metrics["test"]["per_type"]) == set(synthvqa.QUESTION_TYPES)
        assert metrics["vlmcompress_load"]["ok"] and metrics["vlmcompress_load"]["agreement"] == 1.0
        assert 64 <= metrics["visual_tokens"] <= 200
        assert summary[arch]["steps"] == 3
        assert (path / "train.log").read_text().count("step 3") >= 1
        model = vlmcompress.load(str(path), kv="snapkv", kv_budget=0.5)
        processor = AutoProcessor.from_pretrained(str(path))
        assert model.config.model_type == arch
        samples = [synthvqa.make_sample("test", i) for i in range(2)]
        preds = models.generate_answers(model, processor, [s["question"] for s in samples],
                                        [s["image"] for s in samples], max_new_tokens=3)
        assert len(preds) == 2 and all(isinstance(p, str) for p in preds)
    # a second leg continues from the first one's output (weights, tokenizer, processor)
    again = tmp_path / "ref2"
    cmd = [sys.executable, str(ROOT / "evaluation" / "reference" / "train.py"), "--smoke", "--out", str(again),
           "--arch", "qwen2_vl", "--init-from", str(out), "--max-steps", "1", "--grow-layers", "2",
           "--notes-share", "0.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((again / "qwen2_vl" / "metrics.json").read_text())
    assert metrics["init_from"] == str(out / "qwen2_vl") and metrics["steps"] == 1
    assert metrics["notes_share"] == 0.5 and set(metrics["test_hard"]["per_type"]) == set(synthvqa.QUESTION_TYPES)
    assert "initialised from" in (again / "qwen2_vl" / "train.log").read_text()
    config = json.loads((again / "qwen2_vl" / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == models.TEXT["num_hidden_layers"] + 2
    assert (again / "qwen2_vl" / "tokenizer.json").read_text() == (out / "qwen2_vl" / "tokenizer.json").read_text()


@pytest.mark.parametrize("arch", models.ARCHITECTURES)
def test_grown_language_model_answers_as_before_until_trained(arch, tmp_path):
    """Block expansion: the inserted layers start as no-ops (zeroed output projections), the KV cache
    indexes every layer, and the grown model saves and loads as an ordinary deeper checkpoint."""
    from transformers import AutoModelForImageTextToText

    model, processor = models.build_model(arch)
    model.eval()
    samples = [synthvqa.make_sample("test", i) for i in range(4)]
    questions, images = [s["question"] for s in samples], [s["image"] for s in samples]
    inputs = processor(text=[models.chat_prompt(processor, q) for q in questions], images=images,
                       padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
        answers = models.generate_answers(model, processor, questions, images, max_new_tokens=4)
        models.grow_language_model(model, 2)
        torch.testing.assert_close(model(**inputs).logits, before)
        assert models.generate_answers(model, processor, questions, images, max_new_tokens=4) == answers
    layers = model.model.language_model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(models.TEXT["num_hidden_layers"] + 2))
    assert all(layer.mlp.down_proj.weight.abs().sum() == 0 for layer in layers[-3:-1])
    assert layers[-1].mlp.down_proj.weight.abs().sum() > 0  # the original last layer stays last
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, before)


# --------------------------------------------------------------------------- the trained checkpoints

TRAINED = [a for a in models.ARCHITECTURES if (CHECKPOINTS / a / "model.safetensors").exists()]
needs_checkpoint = pytest.mark.parametrize(
    "arch", [pytest.param(a, marks=pytest.mark.skipif(a not in TRAINED, reason=f"no trained {a} checkpoint in "
                                                       f"{CHECKPOINTS}")) for a in models.ARCHITECTURES])

N_PER_TYPE = 20  # the accuracy subset: 100 test questions


def _test_subset(n_per_type: int = N_PER_TYPE, types=synthvqa.QUESTION_TYPES):
    import datasets

    k = len(synthvqa.QUESTION_TYPES)
    rows = [synthvqa.make_sample("test", j * k + synthvqa.QUESTION_TYPES.index(t))
            for t in types for j in range(n_per_type)]
    return datasets.Dataset.from_list(rows, features=synthvqa.features())


def _answers(path, data, **load_kwargs):
    import vlmcompress
    from transformers import AutoProcessor

    model = vlmcompress.load(str(path), dtype=torch.float32, **load_kwargs)
    processor = AutoProcessor.from_pretrained(str(path))
    return models.generate_answers(model, processor, data["question"], data["image"], batch_size=25)


@functools.lru_cache(maxsize=None)
def _uncompressed_accuracy(arch: str, n_per_type: int = N_PER_TYPE) -> dict:
    data = _test_subset(n_per_type)
    return synthvqa.accuracy(_answers(CHECKPOINTS / arch, data), data["answers"], data["question_type"])


@needs_checkpoint
def test_reference_accuracy_uncompressed(arch):
    """What the committed checkpoints must keep for the default evaluation to mean something: they see
    (attribute, count, OCR) and read the long-context cell (which the KV-method comparisons rest on)."""
    acc = _uncompressed_accuracy(arch)
    assert acc["overall"] >= 0.75, acc
    assert acc["per_type"]["long_context"] >= 0.9, acc
    assert min(acc["per_type"][t] for t in ("attribute", "count", "ocr")) >= 0.7, acc


@needs_checkpoint
def test_reference_accuracy_meets_the_target(arch):
    """Issue 7's target on the whole held-out test split (1000 questions): >= 90 % overall, each type >= 75 %."""
    acc = _uncompressed_accuracy(arch, synthvqa.SPLIT_SIZES["test"] // len(synthvqa.QUESTION_TYPES))
    assert acc["n"] == synthvqa.SPLIT_SIZES["test"]
    assert acc["overall"] >= 0.90, acc
    assert min(acc["per_type"].values()) >= 0.75, acc


@needs_checkpoint
def test_reference_models_answer_the_hard_split(arch):
    """Both committed checkpoints keep the >= 90 % target on test_hard (100 questions), every type included: the
    split the reference benchmark separates the methods on (docs/reference_benchmark.md)."""
    import datasets

    data = datasets.Dataset.from_list([synthvqa.make_sample("test_hard", i) for i in range(100)],
                                      features=synthvqa.features())
    acc = synthvqa.accuracy(_answers(CHECKPOINTS / arch, data), data["answers"], data["question_type"])
    assert min(acc["per_type"].values()) >= 0.9 and acc["overall"] >= 0.9, acc


@pytest.mark.skipif("qwen2_vl" not in TRAINED, reason="no trained qwen2_vl checkpoint")
def test_the_default_evaluation_runs_the_committed_qwen2_vl_checkpoint():
    import evaluation.default as default

    spec = default.resolve()
    assert spec["mode"] == "reference" and spec["model"] == str(CHECKPOINTS / "qwen2_vl")
    assert spec["tasks"] == ["synthvqa"]


@needs_checkpoint
@pytest.mark.parametrize("method", ["snapkv", "streamingllm"])
def test_full_kv_budget_equals_baseline(arch, method):
    data = _test_subset(4)
    assert _answers(CHECKPOINTS / arch, data, kv=method, kv_budget=1.0) == _answers(CHECKPOINTS / arch, data)


# A budget at which StreamingLLM keeps only the notes' tail and the question, not the image.
SMALL_BUDGET = 0.2


@needs_checkpoint
def test_snapkv_beats_streamingllm_on_long_context(arch):
    data = _test_subset(40, types=("long_context",))
    path = CHECKPOINTS / arch
    snap = _answers(path, data, kv="snapkv", kv_budget=SMALL_BUDGET, window_size=16)
    stream = _answers(path, data, kv="streamingllm", kv_budget=SMALL_BUDGET)
    acc_snap = synthvqa.accuracy(snap, data["answers"], data["question_type"])["overall"]
    acc_stream = synthvqa.accuracy(stream, data["answers"], data["question_type"])["overall"]
    assert acc_snap >= acc_stream + 0.3, (acc_snap, acc_stream)
