"""Benchmarks as data (lmms-eval style): where the data lives, which fields hold what, the prompt, the scorer.

A task is one `Task` record in `TASKS`. The little logic there is (prompt formats, target
extraction, scorers, aggregations) lives in `evaluation/tasks/formats.py` and `evaluation/metrics.py`,
named here by strings, so adding a benchmark is adding a record. Dataset ids are the ones lmms-eval
uses; `mirrors` lists the newer lmms-eval organisations tried when the first id is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str                      # Hub dataset id passed to datasets.load_dataset
    split: str
    config: str | None = None         # dataset config / subset name
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
    prompts: dict = field(default_factory=lambda: {"default": {"pre_prompt": "", "post_prompt": SHORT_ANSWER}})
    target: str = "field"             # how references are built, see formats.TARGETS
    scorer: str = "exact"             # per-sample scorer, see formats.SCORERS
    aggregation: str = "mean"         # see formats.AGGREGATIONS
    primary: str = "exact_match"      # headline metric name (what tables and the Pareto plot use)
    accuracy_key: str | None = None   # per-sample 0..1 key averaged into the cross-task accuracy
    max_new_tokens: int = 16
    mirrors: tuple[str, ...] = ()
    higher_is_better: bool = True
    # "module:function" that draws the split locally (synthetic benchmarks): function(split, n) -> datasets.Dataset;
    # `evaluation.tasks.synthetic.write_local_dataset(name, DIR, n)` writes it for --data_dir DIR
    builder: str | None = None

    def prompt_kwargs(self, family: str) -> dict:
        """The prompt settings of a model family (model_type), falling back to lmms-eval's `default`."""
        return self.prompts.get(family, self.prompts["default"])

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
    name="docvqa_val", dataset="lmms-lab/DocVQA", config="DocVQA", split="validation", answer="answers",
    id_field="questionId", target="list", scorer="anls", primary="anls", max_new_tokens=32,
    mirrors=("lmms-lab-encoder/DocVQA",),
))
register(Task(
    name="chartqa", dataset="lmms-lab/ChartQA", split="test", meta_fields=("type",), scorer="relaxed",
    primary="relaxed_overall", prompts={"default": {"pre_prompt": "", "post_prompt": "\nAnswer the question with a single word."}},
    mirrors=("lmms-lab-encoder/ChartQA",),
))
register(Task(
    name="textvqa_val", dataset="lmms-lab/textvqa", split="validation", answer="answers", id_field="question_id",
    fmt="question_capitalized", target="list", scorer="vqa", primary="exact_match", max_new_tokens=16,
    mirrors=("lmms-lab-encoder/textvqa",),
))
register(Task(
    name="ocrbench", dataset="echo840/OCRBench", split="test", target="list", scorer="ocrbench",
    meta_fields=("dataset", "question_type"), aggregation="ocrbench", primary="ocrbench_accuracy",
    accuracy_key="ocrbench_accuracy", fmt="question_stripped",
    prompts={"default": {"pre_prompt": "", "post_prompt": ""}}, max_new_tokens=128,
))
register(Task(
    name="ai2d", dataset="lmms-lab/ai2d", split="test", options="options", fmt="mcq", target="index_letter",
    scorer="choice", prompts={"default": {"pre_prompt": "", "post_prompt": LETTER_ANSWER}},
    mirrors=("lmms-lab-encoder/ai2d",),
))
register(Task(
    name="mmmu_val", dataset="lmms-lab/MMMU", split="validation", image="image_<n>", id_field="id",
    options="options", meta_fields=("question_type", "subfield"), fmt="mmmu", target="mmmu", scorer="mmmu",
    primary="mmmu_acc", max_new_tokens=128,
    prompts={"default": {"multiple_choice_prompt": "Answer with the option's letter from the given choices directly.",
                         "open_ended_prompt": "Answer the question using a single word or phrase."}},
    mirrors=("lmms-lab-encoder/MMMU",),
))
register(Task(
    name="mme", dataset="lmms-lab/MME", split="test", id_field="question_id", meta_fields=("category",),
    fmt="mme", scorer="yes_no", aggregation="mme", primary="mme_perception_score", accuracy_key="mme_acc",
    # the questions already end with " Please answer yes or no."; an empty post_prompt keeps it
    prompts={"default": {"pre_prompt": "", "post_prompt": ""}},
    mirrors=("lmms-lab-encoder/MME",),
))
register(Task(
    name="gqa", dataset="lmms-lab/GQA", config="testdev_balanced_instructions", split="testdev", id_field="id",
    image=None, image_join=("lmms-lab/GQA", "testdev_balanced_images", "testdev", "id", "imageId"),
    scorer="exact", primary="exact_match", mirrors=("lmms-lab-encoder/GQA",),
))
register(Task(
    name="scienceqa_img", dataset="lmms-lab/ScienceQA", config="ScienceQA-IMG", split="test", options="choices",
    hint="hint", fmt="scienceqa", target="index_letter", scorer="choice", meta_fields=("subject",),
    prompts={"default": {"pre_prompt": "", "post_prompt": LETTER_ANSWER}}, mirrors=("lmms-lab-encoder/ScienceQA",),
))
register(Task(
    name="realworldqa", dataset="lmms-lab/RealWorldQA", split="test", fmt="question_stripped", scorer="realworldqa",
    prompts={"default": {"pre_prompt": "", "post_prompt": ""}}, mirrors=("lmms-lab-encoder/RealWorldQA",),
))
register(Task(
    name="videomme", dataset="lmms-lab/Video-MME", split="test", id_field="question_id", image=None, video=True,
    video_field="videoID", options="options", meta_fields=("duration", "domain", "sub_category", "task_type"),
    fmt="videomme", scorer="choice_given", primary="videomme_perception_score",
    prompts={"default": {"pre_prompt": "", "post_prompt": "\nAnswer with the option's letter from the given choices directly."}},
    mirrors=("lmms-eval/Video-MME",),
))

# SynthVQA: the seeded synthetic benchmark the reference checkpoints (evaluation/reference/) are trained on.
# No Hub copy: the split is drawn by `builder` (evaluation/tasks/synthetic.py writes it for --data_dir,
# as the default run does) or read from any save_to_disk copy of `synthvqa.build_split("test")`.
# The reference training uses prompts with and without lmms-eval's short-answer suffix.
register(Task(
    name="synthvqa", dataset="local:synthvqa", split="test", answer="answers", id_field="question_id",
    meta_fields=("question_type",), target="list", scorer="synthvqa", primary="exact_match",
    prompts={family: {"pre_prompt": "", "post_prompt": SHORT_ANSWER}
             for family in ("default", "qwen2_vl", "llava_onevision")},
    # the longest answers ("big red circle", "47") are 3 tokens; 8 leaves room for <|im_end|> and slack
    max_new_tokens=8, builder="evaluation.reference.synthvqa:build_split",
))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def resolve_tasks(spec: str | list[str]) -> list[Task]:
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    if not names:
        raise ValueError(f"no task given; available: {', '.join(sorted(TASKS))}")
    return [get_task(n) for n in names]
