"""Small offline copies of every task in its real Hub schema, for the default run and the tests.

`write_local_dataset(name, data_dir, n)` writes `data_dir/name` with `Dataset.save_to_disk`, using
the same column names and types as the Hub dataset lmms-eval reads, so `--data_dir data_dir` runs
the real loading, formatting and scoring code on it. Answers are synthetic (random images), except
for tasks that are synthetic to begin with (SynthVQA), whose own generator writes real rows.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

MME_CATEGORIES = ("existence", "count", "OCR", "commonsense_reasoning")
OCRBENCH_TYPES = ("Regular Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA",
                  "Handwritten Mathematical Expression Recognition")
WORDS = ("cat", "blue", "seven", "tree", "12", "yes", "house", "2019", "red", "north")


def _image(rng, size=(64, 48)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _rows(name: str, n: int, rng) -> tuple[list[dict], dict]:
    """Rows and extra features for task `name`."""
    from datasets import Image as ImageFeature
    from datasets import List, Value

    w = lambda i: WORDS[i % len(WORDS)]  # noqa: E731
    img = lambda: _image(rng)  # noqa: E731
    if name == "docvqa_val":
        rows = [{"questionId": str(1000 + i), "question": f"What is the word number {i} on the page?",
                 "question_types": ["handwritten"], "image": img(), "docId": i, "ucsf_document_id": f"doc{i}",
                 "ucsf_document_page_no": "1", "answers": [w(i), w(i).upper()], "data_split": "val"} for i in range(n)]
        return rows, {"answers": List(Value("string")), "question_types": List(Value("string"))}
    if name == "chartqa":
        rows = [{"type": "human_test" if i % 2 else "augmented_test", "question": f"What is the value of bar {i}?",
                 "answer": str(10 * (i + 1)) if i % 3 else w(i), "image": img()} for i in range(n)]
        return rows, {}
    if name == "textvqa_val":
        rows = [{"image_id": f"img{i}", "question_id": i, "question": f"what is written on sign {i}?",
                 "question_tokens": ["what", "is", "written"], "image": img(), "image_width": 64, "image_height": 48,
                 "flickr_original_url": "", "flickr_300k_url": "", "answers": [w(i)] * 7 + [w(i + 1)] * 3,
                 "image_classes": ["sign"], "set_name": "val", "ocr_tokens": [w(i)]} for i in range(n)]
        return rows, {"answers": List(Value("string")), "question_tokens": List(Value("string")),
                      "image_classes": List(Value("string")), "ocr_tokens": List(Value("string"))}
    if name == "ocrbench":
        rows = [{"dataset": "HME100k" if i % 4 == 3 else "IIIT5K", "question": "what is written in the image?",
                 "question_type": OCRBENCH_TYPES[i % len(OCRBENCH_TYPES)], "answer": [w(i)], "image": img()}
                for i in range(n)]
        return rows, {"answer": List(Value("string"))}
    if name == "ai2d":
        rows = [{"question": f"Which label marks part {i}?", "options": [w(i), w(i + 1), w(i + 2), w(i + 3)],
                 "answer": str(i % 4), "image": img()} for i in range(n)]
        return rows, {"options": List(Value("string"))}
    if name == "mmmu_val":
        rows = []
        for i in range(n):
            mc = i % 3 != 2
            rows.append({
                "id": f"validation_Accounting_{i + 1}", "question": f"<image 1> How much is item {i}?",
                "options": str([w(i), w(i + 1), w(i + 2), w(i + 3)]) if mc else "[]", "explanation": "",
                "image_1": img(), **{f"image_{k}": None for k in range(2, 8)}, "img_type": "['Tables']",
                "answer": "ABCD"[i % 4] if mc else str(i * 3), "topic_difficulty": "Easy",
                "question_type": "multiple-choice" if mc else "open", "subfield": "Financial Accounting"})
        return rows, {f"image_{k}": ImageFeature() for k in range(1, 8)}
    if name == "mme":
        rows = []
        for i in range(n):
            pair, yes = i // 2, i % 2 == 0
            cat = MME_CATEGORIES[pair % len(MME_CATEGORIES)]
            rows.append({"question_id": f"{cat}/{pair:04d}.png", "image": img(),
                         "question": f"Is there a {w(pair)} in the image? Please answer yes or no.",
                         "answer": "Yes" if yes else "No", "category": cat})
        return rows, {}
    if name == "gqa":
        rows = [{"id": str(200 + i), "imageId": f"n{i % max(1, n // 2)}", "question": f"What color is object {i}?",
                 "answer": w(i), "fullAnswer": f"It is {w(i)}.", "isBalanced": True, "groups": {"global": None, "local": ""},
                 "entailed": "", "equivalent": "", "types": {"structural": "query", "semantic": "attr", "detailed": "c"},
                 "annotations": {"answer": "", "fullAnswer": "", "question": ""}, "semantic": [], "semanticStr": ""}
                for i in range(n)]
        for r in rows:  # keep the nested columns simple strings, the loaders only read the flat ones
            r["groups"] = str(r["groups"])
            r["types"] = str(r["types"])
            r["annotations"] = str(r["annotations"])
            r["semantic"] = "[]"
        return rows, {}
    if name == "gqa_images":
        return [{"id": f"n{i}", "image": img()} for i in range(max(1, n // 2))], {}
    if name == "scienceqa_img":
        rows = [{"image": img(), "question": f"Which object is {w(i)}?", "choices": [w(i), w(i + 1), w(i + 2)][: 2 + i % 2],
                 "answer": i % 2, "hint": f"Look at item {i}." if i % 2 else "", "task": "closed choice",
                 "grade": "grade4", "subject": "natural science", "topic": "physics", "category": "Materials",
                 "skill": "Identify", "lecture": "", "solution": ""} for i in range(n)]
        return rows, {"choices": List(Value("string")), "answer": Value("int64")}
    if name == "realworldqa":
        rows = []
        for i in range(n):
            if i % 3 == 2:
                rows.append({"image": img(), "question": f"How many cars are visible in frame {i}? "
                             "Please answer directly with a single word or number.", "answer": str(i)})
            else:
                rows.append({"image": img(), "question": f"Which way is the road heading?\nA. left\nB. right\nC. straight\n"
                             "Please answer directly with only the letter of the correct option and nothing else.",
                             "answer": "ABC"[i % 3]})
        return rows, {}
    if name == "videomme":
        rows = [{"video_id": f"{i:03d}", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
                 "url": "", "videoID": f"vid{i % max(1, n // 2)}", "question_id": f"{i:03d}-1", "task_type": "Counting Problem",
                 "question": f"How many objects appear in clip {i}?",
                 "options": [f"A. {i}", f"B. {i + 1}", f"C. {i + 2}", f"D. {i + 3}"], "answer": "ABCD"[i % 4]}
                for i in range(n)]
        return rows, {"options": List(Value("string"))}
    raise ValueError(f"no synthetic schema for {name!r}")


SYNTHETIC_TASKS = ("docvqa_val", "chartqa", "textvqa_val", "ocrbench", "ai2d", "mmmu_val", "mme", "gqa",
                   "scienceqa_img", "realworldqa", "videomme", "synthvqa", "synthvqa_hard")


def builder(task):
    """The function a task's `builder` names ("module:function"), or None for a Hub task; `task` is a Task, or the
    name of one of ours."""
    from importlib import import_module

    from . import TASKS

    task = TASKS.get(task) if isinstance(task, str) else task
    spec = task.builder if task is not None else None
    if not spec:
        return None
    module, _, function = spec.partition(":")
    return getattr(import_module(module), function)


def write_local_dataset(name: str, data_dir: str | Path, n: int = 8, seed: int = 0) -> Path:
    """Write a small copy of task `name` (and its companion image table or videos) under data_dir.

    A task with a `builder` (SynthVQA) gets its real data: the first `n` rows of its split, drawn by
    the builder (`seed` is not used; the benchmark is seeded by split name and index).
    """
    import datasets
    from datasets import Image as ImageFeature

    build = builder(name)
    if build is not None:
        from . import TASKS

        path = Path(data_dir) / name
        build(TASKS[name].split, n).save_to_disk(str(path))
        return path
    rng = np.random.default_rng(seed)
    data_dir = Path(data_dir)
    rows, extra = _rows(name, n, rng)
    features = {}
    for key, value in rows[0].items():
        if key in extra:
            features[key] = extra[key]
        elif isinstance(value, Image.Image) or (key.startswith("image") and (value is None or isinstance(value, Image.Image))):
            features[key] = ImageFeature()
        elif isinstance(value, bool):
            features[key] = datasets.Value("bool")
        elif isinstance(value, int):
            features[key] = datasets.Value("int64")
        else:
            features[key] = datasets.Value("string")
    ds = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    path = data_dir / name
    ds.save_to_disk(str(path))
    if name == "gqa":
        write_local_dataset("gqa_images", data_dir, n=n, seed=seed + 1)
    if name == "videomme":
        video_dir = data_dir / "videomme_videos"
        video_dir.mkdir(parents=True, exist_ok=True)
        for vid in sorted({r["videoID"] for r in rows}):
            frames = [_image(rng) for _ in range(6)]
            frames[0].save(video_dir / f"{vid}.gif", save_all=True, append_images=frames[1:], duration=100)
    return path


def corrupt_image(data_dir: str | Path, name: str, doc_ids, column: str = "image") -> None:
    """Rewrite task `name`'s local copy with unreadable bytes in `column` of the given rows (for tests)."""
    import datasets
    from datasets import Image as ImageFeature

    path = Path(data_dir) / name
    ds = datasets.load_from_disk(str(path)).cast_column(column, ImageFeature(decode=False))
    bad = set(doc_ids)
    ds = ds.map(lambda r, i: {column: {"bytes": b"not an image", "path": None} if i in bad else r[column]},
                with_indices=True)
    tmp = path.with_name(path.name + ".tmp")
    ds.save_to_disk(str(tmp))
    import shutil

    shutil.rmtree(path)
    tmp.rename(path)
