"""Benchmarks as data (lmms-eval style): where the data lives, which fields hold what, the prompt, the scorer.

A task is one `Task` record in `TASKS`, written from lmms-eval 0.7.3's task YAML of the same name
(dataset path, config and split, `lmms_eval_specific_kwargs`, `generation_kwargs`, metric and
aggregation); tests/test_lmms_parity*.py check them against the installed lmms-eval. The little logic
there is (prompt formats, targets) lives in `evaluation/tasks/formats.py`, scorers and aggregations in
`evaluation/tasks/scoring.py`, named here by strings, so adding a benchmark is adding a record.
`mirrors` lists older Hub copies of the same data, tried when the first id is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
LMMS_EVAL_UNTIL = ("\n\n",)  # lmms-eval's stop string when a task's generation_kwargs name none


@dataclass(frozen=True)
class LmmsModel:
    """The lmms-eval 0.7.3 model a family is evaluated with there, and what of a task's settings it uses."""

    name: str             # the key looked up in a task's lmms_eval_specific_kwargs (else "default")
    chat: bool            # chat models take doc_to_messages (MMMU interleaves images) and ignore `until`
    max_new_tokens: int   # its default when the task's generation_kwargs set none


LMMS_MODELS = {
    "qwen2_vl": LmmsModel("qwen2_vl", chat=False, max_new_tokens=128),
    "qwen2_5_vl": LmmsModel("qwen2_5_vl", chat=True, max_new_tokens=128),
    "llava_onevision": LmmsModel("llava_hf", chat=True, max_new_tokens=1024),
    "internvl": LmmsModel("internvl_hf", chat=True, max_new_tokens=1024),
}
DEFAULT_LMMS_MODEL = LMMS_MODELS["qwen2_vl"]


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str                      # Hub dataset id passed to datasets.load_dataset (lmms-eval's dataset_path)
    split: str
    config: str | None = None         # dataset config / subset name (lmms-eval's dataset_name)
    question: str = "question"        # field names
    answer: str = "answer"
    image: str | None = "image"       # None: no image field; "image_<n>": MMMU's numbered images
    id_field: str | None = None
    options: str | None = None        # multiple-choice option list (or MMMU's string repr)
    hint: str | None = None           # ScienceQA's context
    meta_fields: tuple[str, ...] = ()  # kept per sample for aggregation / logs
    video: bool = False               # visual is a video looked up by `video_field`
    video_field: str | None = None
    image_join: tuple[str, str | None, str, str, str] | None = None  # (dataset, config, split, key in it, key here)
    fmt: str = "question"             # prompt format, see formats.FORMATS
    messages: str | None = None       # interleaved chat content for chat models, see formats.CONTENTS
    prompts: dict = field(default_factory=lambda: {"default": {"pre_prompt": "", "post_prompt": SHORT_ANSWER}})
    target: str = "field"             # how references are built, see formats.TARGETS
    scorer: str = "exact"             # per-sample scorer, see scoring.SCORERS
    aggregation: str = "mean"         # see scoring.AGGREGATIONS
    primary: str = "exact_match"      # headline metric name (what tables and the Pareto plot use)
    accuracy_key: str | None = None   # per-sample 0..1 key averaged into the cross-task accuracy
    max_new_tokens: int | None = 16   # None: the lmms-eval model's default (LmmsModel.max_new_tokens)
    until: tuple[str, ...] = LMMS_EVAL_UNTIL  # stop strings, cut from the answer by non-chat models
    mirrors: tuple[str, ...] = ()
    higher_is_better: bool = True
    # "module:function" that draws the split locally (synthetic benchmarks): function(split, n) -> datasets.Dataset;
    # `evaluation.tasks.synthetic.write_local_dataset(name, DIR, n)` writes it for --data_dir DIR
    builder: str | None = None

    @staticmethod
    def lmms_model(family: str) -> LmmsModel:
        return LMMS_MODELS.get(family, DEFAULT_LMMS_MODEL)

    def prompt_kwargs(self, family: str) -> dict:
        """The prompt settings of a model family: its lmms-eval model's entry, else lmms-eval's `default`."""
        return self.prompts.get(family, self.prompts.get(self.lmms_model(family).name, self.prompts["default"]))

    @property
    def sample_score_key(self) -> str:
        return self.accuracy_key or self.primary


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is defined twice")
    TASKS[task.name] = task
    return task


register(Task(
    name="docvqa_val", dataset="lmms-lab-encoder/DocVQA", config="DocVQA", split="validation", answer="answers",
    id_field="questionId", target="list", scorer="anls", primary="anls", max_new_tokens=32,
    mirrors=("lmms-lab/DocVQA",),
))
register(Task(
    name="chartqa", dataset="lmms-lab-encoder/ChartQA", split="test", meta_fields=("type",), scorer="relaxed",
    primary="relaxed_overall",
    prompts={"default": {"pre_prompt": "", "post_prompt": "\nAnswer the question with a single word."}},
    mirrors=("lmms-lab/ChartQA",),
))
register(Task(
    name="textvqa_val", dataset="lmms-lab-encoder/textvqa", split="validation", answer="answers",
    id_field="question_id",
    fmt="question_capitalized", target="list", scorer="vqa", primary="exact_match", max_new_tokens=None,
    until=("ASSISTANT:",), mirrors=("lmms-lab/textvqa",),
))
register(Task(
    name="ocrbench", dataset="echo840/OCRBench", split="test", target="list", scorer="ocrbench",
    meta_fields=("dataset", "question_type"), aggregation="ocrbench", primary="ocrbench_accuracy",
    accuracy_key="ocrbench_accuracy", fmt="question_stripped",
    prompts={"default": {"pre_prompt": "", "post_prompt": ""}}, max_new_tokens=128,
))
register(Task(
    name="ai2d", dataset="lmms-lab-encoder/ai2d", split="test", options="options", fmt="mcq", target="index_letter",
    scorer="ai2d", prompts={"default": {"pre_prompt": "", "post_prompt": LETTER_ANSWER}}, mirrors=("lmms-lab/ai2d",),
))
register(Task(
    name="mmmu_val", dataset="lmms-lab-encoder/MMMU", split="validation", image="image_<n>", id_field="id",
    options="options", meta_fields=("question_type", "subfield"), fmt="mmmu", messages="mmmu", scorer="mmmu",
    aggregation="mmmu", primary="mmmu_acc", max_new_tokens=128,
    prompts={"default": {"multiple_choice_prompt": "Answer with the option's letter from the given choices directly.",
                         "open_ended_prompt": "Answer the question using a single word or phrase."}},
    mirrors=("lmms-lab/MMMU",),
))
register(Task(
    name="mme", dataset="lmms-lab-encoder/MME", split="test", id_field="question_id", meta_fields=("category",),
    fmt="mme", target="yes_no", scorer="yes_no", aggregation="mme", primary="mme_perception_score",
    accuracy_key="mme_acc", mirrors=("lmms-lab/MME",),
))
register(Task(
    name="gqa", dataset="lmms-lab-encoder/GQA", config="testdev_balanced_instructions", split="testdev", id_field="id",
    image=None, image_join=("lmms-lab-encoder/GQA", "testdev_balanced_images", "testdev", "id", "imageId"),
    scorer="exact", primary="exact_match", mirrors=("lmms-lab/GQA",),
))
register(Task(
    name="scienceqa_img", dataset="lmms-lab-encoder/ScienceQA", config="ScienceQA-IMG", split="test", options="choices",
    hint="hint", fmt="scienceqa", target="index_letter", scorer="scienceqa", meta_fields=("subject",),
    prompts={"default": {"pre_prompt": "", "post_prompt": LETTER_ANSWER}}, mirrors=("lmms-lab/ScienceQA",),
))
register(Task(
    name="realworldqa", dataset="lmms-lab-encoder/RealWorldQA", split="test", fmt="realworldqa", scorer="realworldqa",
    prompts={"default": {"pre_prompt": "", "post_prompt": ""}}, mirrors=("lmms-lab/RealWorldQA",),
))
register(Task(
    name="videomme", dataset="lmms-eval/Video-MME", split="test", id_field="question_id", image=None, video=True,
    video_field="videoID", options="options", meta_fields=("duration", "domain", "sub_category", "task_type"),
    fmt="videomme", scorer="videomme", aggregation="videomme", primary="videomme_perception_score",
    accuracy_key="videomme_accuracy", prompts={"default": {"pre_prompt": "", "post_prompt": LETTER_ANSWER}},
    mirrors=("lmms-lab/Video-MME",),
))

# SynthVQA: the seeded synthetic benchmark the reference checkpoints (evaluation/reference/) are trained on.
# No Hub copy: the split is drawn by `builder` (evaluation/tasks/synthetic.py writes it for --data_dir,
# as the default run does) or read from any save_to_disk copy of `synthvqa.build_split("test")`.
# The reference training uses prompts with and without lmms-eval's short-answer suffix.
# `synthvqa_hard` is its `test_hard` split: the same questions after a block of irrelevant notes (longer prompts).
for _name, _split in (("synthvqa", "test"), ("synthvqa_hard", "test_hard")):
    register(Task(
        name=_name, dataset=f"local:{_name}", split=_split, answer="answers", id_field="question_id",
        meta_fields=("question_type",), target="list", scorer="synthvqa", primary="exact_match",
        prompts={family: {"pre_prompt": "", "post_prompt": SHORT_ANSWER}
                 for family in ("default", "qwen2_vl", "llava_onevision")},
        # the longest answers ("big red circle", "47") are 3 tokens; 8 leaves room for <|im_end|> and slack
        max_new_tokens=8, until=(), builder="evaluation.reference.synthvqa:build_split",
    ))
del _name, _split


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def resolve_tasks(spec: str | list[str]) -> list[Task]:
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ValueError(f"no task given; available: {', '.join(sorted(TASKS))}")
    return [get_task(n) for n in names]
