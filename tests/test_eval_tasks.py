"""Every task loads from a small offline copy in its real schema, formats lmms-eval's prompt, and scores."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.data import SampleError, TaskData, load_video_frames  # noqa: E402
from evaluation.tasks import TASKS, get_task, resolve_tasks  # noqa: E402
from evaluation.tasks.scoring import AGGREGATIONS, loyalty_references, score_sample  # noqa: E402
from evaluation.tasks.synthetic import SYNTHETIC_TASKS, corrupt_image, write_local_dataset  # noqa: E402

N = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_data")
    for name in SYNTHETIC_TASKS:
        write_local_dataset(name, root, n=N)
    return root


def test_every_task_has_an_offline_copy():
    assert set(TASKS) == set(SYNTHETIC_TASKS)
    assert len(TASKS) >= 11 and any(t.video for t in TASKS.values())


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="docvqa_val"):
        resolve_tasks("docvqa_val,nope")


@pytest.mark.parametrize("name", SYNTHETIC_TASKS)
def test_task_loads_formats_and_scores(name, data_dir):
    task = get_task(name)
    data = TaskData(task, str(data_dir), num_frames=4)
    assert len(data) == N
    for doc_id in range(len(data)):
        sample = data.sample(doc_id)
        assert sample["answers"] and all(isinstance(a, str) and a for a in sample["answers"])
        if task.video:
            assert sample["images"] == [] and len(sample["video"]) == 4
        else:
            assert sample["video"] is None and len(sample["images"]) >= 1
            assert all(im.mode == "RGB" for im in sample["images"])
        row = data.row(doc_id)
        assert str(row[task.question]).strip()[:10].lower() in sample["prompt"].lower()
        post = task.prompt_kwargs("qwen2_vl").get("post_prompt")
        if post:
            assert sample["prompt"].endswith(post)
        key = task.sample_score_key
        rng = random.Random(0)
        # the gold answer scores 1, a nonsense answer 0, and an answer scored against itself is loyal
        gold = sample["answers"][0]
        assert score_sample(task, gold, sample["answers"], sample, rng)[key] == 1.0, (name, gold)
        # a wrong option letter where there are options (MMMU would draw a random one for plain nonsense)
        wrong = next((f"({c})" for c in "ABCD" if c != gold), "") if sample["options"] else ""
        assert score_sample(task, f"{wrong} qqqq zzzz", sample["answers"], sample, rng)[key] == 0.0, name
        refs = loyalty_references(task, gold, sample, rng)
        assert score_sample(task, gold, refs, sample, rng)[key] == 1.0


def test_lmms_eval_prompts(data_dir):
    docvqa = TaskData(get_task("docvqa_val"), str(data_dir)).sample(0)
    assert docvqa["prompt"].endswith("\nAnswer the question using a single word or phrase.")
    mme = TaskData(get_task("mme"), str(data_dir)).sample(0)
    # lmms-eval's post prompt replaces the question's own " Please answer yes or no."
    assert mme["prompt"].endswith("image?\nAnswer the question using a single word or phrase.")
    ai2d = TaskData(get_task("ai2d"), str(data_dir)).sample(0)
    assert "\nA. " in ai2d["prompt"] and "\nD. " in ai2d["prompt"]
    assert ai2d["prompt"].endswith("\nAnswer with the option's letter from the given choices directly.")
    sqa = TaskData(get_task("scienceqa_img"), str(data_dir)).sample(1)
    assert sqa["prompt"].startswith("Context: ")
    textvqa = TaskData(get_task("textvqa_val"), str(data_dir)).sample(0)
    assert textvqa["prompt"][0].isupper()  # lmms-eval capitalises TextVQA questions
    assert len(textvqa["answers"]) == 10


def test_mme_aggregation_pairs_questions(data_dir):
    task = get_task("mme")
    data = TaskData(task, str(data_dir))
    records = []
    for i in range(len(data)):
        s = data.sample(i)
        records.append((s, {"mme_acc": 1.0}))
    out = AGGREGATIONS["mme"](task, records)
    n_perception_categories = len({s["meta"]["category"] for s, _ in records if s["meta"]["category"] != "commonsense_reasoning"})
    assert out["mme_perception_score"] == pytest.approx(200.0 * n_perception_categories)


def test_parquet_copy_loads(tmp_path):
    import datasets

    src = write_local_dataset("chartqa", tmp_path / "src", n=4)
    ds = datasets.load_from_disk(str(src))
    (tmp_path / "pq" / "chartqa").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "chartqa" / "test-00000-of-00001.parquet"))
    data = TaskData(get_task("chartqa"), str(tmp_path / "pq"))
    assert len(data) == 4 and data.sample(3)["images"][0].size == (64, 48)


def test_missing_local_copy_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="docvqa_val"):
        TaskData(get_task("docvqa_val"), str(tmp_path))


def test_bad_samples_raise_sample_error(tmp_path):
    import datasets

    write_local_dataset("docvqa_val", tmp_path, n=4)
    corrupt_image(tmp_path, "docvqa_val", [1])
    path = tmp_path / "docvqa_val"
    ds = datasets.load_from_disk(str(path))
    ds = ds.map(lambda r, i: {"answers": [] if i == 2 else r["answers"]}, with_indices=True)
    ds.save_to_disk(str(tmp_path / "tmp"))
    import shutil

    shutil.rmtree(path)
    (tmp_path / "tmp").rename(path)
    data = TaskData(get_task("docvqa_val"), str(tmp_path))
    data.sample(0)
    with pytest.raises(SampleError, match="image"):
        data.sample(1)
    with pytest.raises(SampleError, match="no reference"):
        data.sample(2)
    data.sample(3)


def test_video_frames_even_and_uniform(tmp_path):
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(7)]
    frames[0].save(tmp_path / "v.gif", save_all=True, append_images=frames[1:], duration=50)
    out = load_video_frames(tmp_path / "v.gif", 3)
    assert len(out) == 4  # 3 frames, padded to an even count for Qwen2-VL's temporal patches
    reds = [f.getpixel((0, 0))[0] for f in out]
    assert reds[0] == 0 and reds[2] == 120 and reds[3] == reds[2]
    with pytest.raises(SampleError):
        load_video_frames(tmp_path / "missing.gif", 3)


def test_chat_models_get_mmmu_images_in_place(tmp_path, data_dir):
    """lmms-eval's doc_to_messages for chat models: the image where the question names it, not first."""
    from transformers import AutoProcessor

    from evaluation.runner import ModelRunner
    from vlmcompress.testing import save_tiny_model

    data = TaskData(get_task("mmmu_val"), str(data_dir))
    runner = object.__new__(ModelRunner)  # only its prompt rendering, no model
    runner.processor = AutoProcessor.from_pretrained(save_tiny_model("llava_onevision", tmp_path / "m"))
    chat = data.sample(0, "llava_onevision")
    assert "<image 1>" not in chat["prompt"] and len(chat["images"]) == 1
    assert [part["type"] for part in chat["content"]] == ["image", "text"]
    question = chat["content"][1]["text"].splitlines()[0]
    rendered = runner.prompt(dict(chat, content=[{"type": "text", "text": "Before."}] + chat["content"]))
    assert rendered.index("Before.") < rendered.index("<image>") < rendered.index(question)
    simple = data.sample(0, "qwen2_vl")  # simple models keep the text as is, images first
    assert simple["content"] is None and simple["prompt"].startswith("<image 1> ")


def test_mmmu_fallbacks_are_seeded_and_counted(data_dir):
    from evaluation.runner import score_task

    task = get_task("mmmu_val")
    data = TaskData(task, str(data_dir))
    samples = [data.sample(i) for i in range(len(data))]
    n_choice = sum(s["meta"]["question_type"] == "multiple-choice" for s in samples)

    def run(seed):
        records = [dict(s, prediction="no idea", stats={}) for s in samples]
        out = score_task(task, records, seed=seed)
        return [r["scores"]["mmmu_acc"] for r in records], out["metrics"]

    scores, metrics = run(0)
    assert metrics["mmmu_acc_random_fallbacks"] == n_choice > 0
    assert run(0)[0] == scores  # the same seed draws the same letters
    assert any(run(seed)[0] != scores for seed in range(1, 20))
