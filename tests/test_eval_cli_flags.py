"""lmms-eval's flags on evaluation/run.py (issue 22): each one's effect, and each bad value rejected up front with one
line (exit 2) before any model loads. Runs use a runner without a model, except where a chat template is rendered."""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import flags, loggers  # noqa: E402
from evaluation import run as cli  # noqa: E402
from evaluation.runner import BatchSizer, ModelRunner, seed_everything  # noqa: E402
from evaluation.tasks import TASKS  # noqa: E402
from evaluation.tasks.synthetic import write_local_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_checks import in_a_scratch_folder, no_model, rejected  # noqa: E402, F401 - fixtures

REPO = Path(__file__).resolve().parent.parent
N = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vlmcompress.testing import save_tiny_model

    root = tmp_path_factory.mktemp("cli_flags")
    model = save_tiny_model("qwen2_vl", root / "model")
    write_local_dataset("docvqa_val", root / "data", n=N)
    write_local_dataset("synthvqa", root / "data", n=N)
    return {"model": str(model), "data": str(root / "data"), "root": root}


def argv(env, *extra, tasks="docvqa_val"):
    return ["--model_args", f"pretrained={env['model']}", "--tasks", tasks, "--data_dir", env["data"],
            "--gen_kwargs", "max_new_tokens=2", "--device", "cpu", "--verbosity", "ERROR", *extra]


class Echo:
    """A runner without a model: answers with the first reference; remembers every batch it was given."""

    model_type = "qwen2_vl"
    batches: list[list[dict]] = []

    def __init__(self, base, compression, device=None):
        Echo.batches = []

    def generate(self, samples, gen_kwargs):
        Echo.batches.append(samples)
        return [(s["answers"][0], {"latency_s": 0.01}) for s in samples]

    def close(self):
        pass


class OutOfMemoryAboveTwo(Echo):
    def generate(self, samples, gen_kwargs):
        Echo.batches.append(samples)
        if len(samples) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [(s["answers"][0], {"latency_s": 0.01}) for s in samples]


def prompts_seen() -> list[dict]:
    return [s for batch in Echo.batches for s in batch]


# --------------------------------------------------------------------------- bad values


BAD_FLAGS = [
    (["--limit", "2.5"], "--limit: must be -1 (every sample), a fraction in (0, 1) or an integer >= 1, got 2.5"),
    (["--limit", "some"], "--limit: expected -1 (every sample), a fraction in (0, 1) or an integer >= 1, got 'some'"),
    (["--batch_size", "auto:0"], "--batch_size/-b: auto:N needs N >= 1 (how many times the size is searched)"),
    (["--batch_size", "big"], "--batch_size/-b: must be an integer >= 1, auto or auto:N, got 'big'"),
    (["--max_batch_size", "8"], "--max_batch_size 8 bounds --batch_size auto only: add --batch_size auto"),
    (["--max_batch_size", "0", "--batch_size", "auto"], "--max_batch_size: must be >= 1, got 0"),
    (["--seed", "1,2"], "--seed: give one value or 3-4 values (python,numpy,torch[,fewshot]), got '1,2'"),
    (["--seed", "1,x,3"], "--seed: 'x' is not an integer or None"),
    (["--num_fewshot", "2"], "--num_fewshot 2: our tasks are zero-shot"),
    (["--fewshot_as_multiturn"], "--fewshot_as_multiturn needs --apply_chat_template (as in lmms-eval)"),
    (["--fewshot_as_multiturn", "--apply_chat_template"], "--fewshot_as_multiturn needs --num_fewshot > 0"),
    (["--cache_requests", "true"], "--cache_requests true: requests are built per sample as it is generated"),
    (["--cache_requests", "yes"], "--cache_requests: invalid choice: 'yes' (choose from 'true', 'refresh', 'delete')"),
    (["--wandb_args", "project"], "--wandb_args: expected key=value, got 'project'"),
    (["--hf_hub_log_args", "org=me"], "--hf_hub_log_args: unknown key org; valid keys: hub_results_org, "),
    (["--hf_hub_log_args", "push_results_to_hub=maybe"], "--hf_hub_log_args: push_results_to_hub takes True or False"),
    (["--hf_hub_log_args", "push_samples_to_hub=True,hub_results_org=me"],
     "push_samples_to_hub=True pushes the per-sample logs: add --log_samples"),
    (["--include_path", "/no/such/folder"], "--include_path /no/such/folder is not a folder"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS, ids=[" ".join(c[0]) for c in BAD_FLAGS])
def test_bad_flag_values_exit_2_with_one_line_before_any_model_loads(env, capsys, no_model, extra, message):
    assert message in rejected(argv(env, *extra), capsys, no_model)


def test_pushing_needs_a_token_an_org_and_the_hub(env, capsys, no_model, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    push = "push_results_to_hub=True"
    assert "pushing needs a Hugging Face token with write access: set HF_TOKEN" in rejected(
        argv(env, "--hf_hub_log_args", push), capsys, no_model)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert "give hub_results_org=ORG" in rejected(argv(env, "--hf_hub_log_args", push), capsys, no_model)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ("pushing needs the Hugging Face Hub, which is out of reach (HF_HUB_OFFLINE is set)"
            in rejected(argv(env, "--hf_hub_log_args", push + ",hub_results_org=me"), capsys, no_model))


# --------------------------------------------------------------------------- --limit, --batch_size, --seed


def test_limit_as_a_fraction_rounds_up_and_minus_one_means_all(env, capsys):
    runs = cli.main(argv(env, "--limit", "0.5"), runner_factory=Echo)
    assert runs[0]["tasks"]["docvqa_val"]["n_samples"] == 3  # ceil(6 * 0.5), as lmms-eval's get_sample_size
    runs = cli.main(argv(env, "--limit", "0.34"), runner_factory=Echo)
    assert runs[0]["tasks"]["docvqa_val"]["n_samples"] == 3  # ceil(2.04)
    runs = cli.main(argv(env, "--limit", "-1"), runner_factory=Echo)
    assert runs[0]["tasks"]["docvqa_val"]["n_samples"] == N
    assert flags.samples_for(2, 10) == 2 and flags.samples_for(20, 10) == 10 and flags.samples_for(None, 7) == 7


def test_batch_size_auto_halves_on_out_of_memory_from_max_batch_size(env, capsys):
    runs = cli.main(argv(env, "--batch_size", "auto", "--max_batch_size", "8"), runner_factory=OutOfMemoryAboveTwo)
    # 6 samples (fewer than 8): 6 runs out of memory, then 4, then batches of 2 fit
    assert [len(b) for b in Echo.batches] == [6, 4, 2, 2, 2]
    result = runs[0]["tasks"]["docvqa_val"]
    assert result["failures"] == 0 and result["n_scored"] == N and result["batch_sizes"] == [2]
    assert [r["prediction"] for r in runs[0]["records"]["docvqa_val"]] == [
        r["answers"][0] for r in runs[0]["records"]["docvqa_val"]]


def test_batch_size_auto_n_searches_again_n_times(env, capsys):
    runs = cli.main(argv(env, "--batch_size", "auto:2", "--max_batch_size", "4"), runner_factory=OutOfMemoryAboveTwo)
    # two searches of 3 samples each: 3 does not fit, then 1 + 2 ... the second search starts at 4 again
    assert [len(b) for b in Echo.batches] == [3, 2, 1, 3, 2, 1]
    assert runs[0]["tasks"]["docvqa_val"]["batch_sizes"] == [2, 2]


def test_a_fixed_batch_size_is_not_searched(env, capsys):
    cli.main(argv(env, "--batch_size", "4"), runner_factory=Echo)
    assert [len(b) for b in Echo.batches] == [4, 2]
    sizer = BatchSizer(4, None, 10)
    assert not sizer.halve() and sizer.size == 4


def test_seed_lists_follow_lmms_eval():
    assert flags.seed_value("42") == (42, 42, 42, 42)
    assert flags.seed_value("0,None,8") == (0, None, 8, 1234)
    assert flags.seed_value("1,2,3,None") == (1, 2, 3, None)
    assert cli.build_parser().parse_args([]).seed == (0, 1234, 1234, 1234)  # lmms-eval's default


def test_a_none_seed_leaves_that_generator_alone():
    random.seed(5)
    expected_python = random.Random(5).random()
    seed_everything((None, 1, 2, 3))
    assert random.random() == expected_python
    assert np.random.random() == np.random.RandomState(1).random_sample()
    assert torch.rand(1).item() == torch.rand(1, generator=torch.Generator().manual_seed(2)).item()


def test_the_seeds_reach_the_run_and_results(env, capsys, tmp_path):
    cli.main(argv(env, "--seed", "3,None,5", "--output_path", str(tmp_path)), runner_factory=Echo)
    config = json.loads((tmp_path / "results.json").read_text())["config"]
    assert config["seed"] == [3, None, 5, 1234]


# --------------------------------------------------------------------------- prompts: --system_instruction, ...


def test_system_instruction_goes_before_the_prompt_text(env, capsys):
    cli.main(argv(env, "--limit", "2"), runner_factory=Echo)
    plain = [s["prompt"] for s in prompts_seen()]
    cli.main(argv(env, "--limit", "2", "--system_instruction", "Be terse. "), runner_factory=Echo)
    assert [s["prompt"] for s in prompts_seen()] == [f"Be terse. {p}" for p in plain]
    assert all(s.get("system") is None for s in prompts_seen())


def test_apply_chat_template_makes_it_a_system_turn(env, capsys, tmp_path):
    cache = str(tmp_path / "cache")
    cli.main(argv(env, "--limit", "2", "--use_cache", cache), runner_factory=Echo)
    plain = [s["prompt"] for s in prompts_seen()]
    cli.main(argv(env, "--limit", "2", "--use_cache", cache, "--system_instruction", "Be terse.",
                  "--apply_chat_template"), runner_factory=Echo)
    seen = prompts_seen()  # not served from the cache: the system turn is part of the cached prompt's identity
    assert [s["prompt"] for s in seen] == plain and {s["system"] for s in seen} == {"Be terse."}

    from transformers import AutoProcessor

    runner = ModelRunner.__new__(ModelRunner)  # the real prompt rendering, without loading the model
    runner.processor = AutoProcessor.from_pretrained(env["model"])
    rendered = runner.prompt(dict(seen[0], images=[]))
    assert rendered.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\n")
    assert runner.prompt(dict(seen[0], images=[], system=None)).startswith("<|im_start|>user\n")


def test_write_out_prints_each_tasks_first_prompt_and_target(env, capsys):
    cli.main(argv(env, "--write_out", "--system_instruction", "Hi. ", tasks="docvqa_val,synthvqa"),
             runner_factory=Echo)
    out = capsys.readouterr().out
    assert out.count("Task: ") == 2
    for task in ("docvqa_val", "synthvqa"):
        assert f"Task: {task}; document 0; context prompt (starting on next line):\n" in out
    first = prompts_seen()[0]  # docvqa_val's document 0, as the model got it
    assert first["prompt"].startswith("Hi. ")
    assert f"context prompt (starting on next line):\n{first['prompt']}\n(end of prompt on previous line)" in out
    assert f"(starting on next line):\n{first['answers']}\n(end of target on previous line)" in out


def test_show_config_prints_the_results_with_every_task_definition(env, capsys):
    cli.main(argv(env, "--show_config", "--limit", "2"), runner_factory=Echo)
    out = capsys.readouterr().out
    document, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
    assert document["configs"]["docvqa_val"]["dataset"] == TASKS["docvqa_val"].dataset
    assert document["configs"]["docvqa_val"]["scorer"] == "anls"
    assert document["runs"][0]["tasks"]["docvqa_val"]["n_samples"] == 2


# --------------------------------------------------------------------------- --include_path


TASK_UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc):
    return doc["answers"]
"""
TASK_YAML = """
task: my_synthvqa
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answers
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  version: 0.0
"""


@pytest.fixture
def yaml_tasks(env, tmp_path):
    """A folder with one lmms-eval task YAML (and its utils.py) over a local copy of SynthVQA's first questions."""
    folder = tmp_path / "tasks" / "mine"
    folder.mkdir(parents=True)
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / "my_synthvqa.yaml").write_text(TASK_YAML.format(data=Path(env["data"]) / "synthvqa"))
    return folder.parent


def edit_yaml(folder: Path, old: str, new: str) -> Path:
    path = folder / "mine" / "my_synthvqa.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


def test_an_include_path_yaml_runs_like_our_own_task(env, capsys, yaml_tasks):
    ours = cli.main(argv(env, "--limit", "3", tasks="synthvqa"), runner_factory=Echo)
    ours_samples = prompts_seen()
    runs = cli.main(argv(env, "--limit", "3", "--include_path", str(yaml_tasks), tasks="my_synthvqa"),
                    runner_factory=Echo)
    # the YAML's functions, called with its prompt kwargs, give our SynthVQA prompts and images
    assert [s["prompt"] for s in prompts_seen()] == [s["prompt"] for s in ours_samples]
    for theirs, mine in zip(prompts_seen(), ours_samples):
        assert [np.asarray(i).tolist() for i in theirs["images"]] == [np.asarray(i).tolist() for i in mine["images"]]
    result = runs[0]["tasks"]["my_synthvqa"]
    assert result["primary"] == {"name": "exact_match", "value": 1.0} and result["n_scored"] == 3
    assert [r["answers"] for r in runs[0]["records"]["my_synthvqa"]] == [
        r["answers"] for r in ours[0]["records"]["synthvqa"]]
    cli.main(["--tasks", "list", "--include_path", str(yaml_tasks)])
    assert "my_synthvqa" in capsys.readouterr().out


def test_field_and_template_forms_read_as_lmms_eval_reads_them(env, capsys, yaml_tasks):
    # a field: the field's text, the prompt kwargs unused (lmms-eval passes them to a !function only)
    edit_yaml(yaml_tasks, "doc_to_text: !function utils.doc_to_text", "doc_to_text: question")
    edit_yaml(yaml_tasks, "doc_to_visual: !function utils.doc_to_visual", "doc_to_visual: image")
    edit_yaml(yaml_tasks, "doc_to_target: answers", "doc_to_target: !function utils.doc_to_target")
    runs = cli.main(argv(env, "--limit", "2", "--include_path", str(yaml_tasks), tasks="my_synthvqa"),
                    runner_factory=Echo)
    import datasets

    questions = datasets.load_from_disk(str(Path(env["data"]) / "synthvqa"))["question"]  # a Dataset, one split
    assert [s["prompt"] for s in prompts_seen()] == questions[:2]
    assert all(len(s["images"]) == 1 for s in prompts_seen())
    assert runs[0]["tasks"]["my_synthvqa"]["primary"]["value"] == 1.0
    # a template around one field: the text around it
    edit_yaml(yaml_tasks, "doc_to_text: question", 'doc_to_text: "Q: {{question}}\\nA:"')
    cli.main(argv(env, "--limit", "1", "--include_path", str(yaml_tasks), tasks="my_synthvqa"), runner_factory=Echo)
    assert prompts_seen()[0]["prompt"] == f"Q: {questions[0]}\nA:"


@pytest.mark.parametrize("extra,message", [
    ("process_results: !function utils.process_results\n", "process_results is not supported by evaluation/run.py"),
    ("filter_list: []\n", "filter_list is not supported"),
    ("num_fewshot: 2\n", "num_fewshot is not supported"),
])
def test_a_yaml_key_we_do_not_support_is_named(env, capsys, no_model, yaml_tasks, extra, message):
    path = edit_yaml(yaml_tasks, "metadata:", extra + "metadata:")
    line = rejected(argv(env, "--include_path", str(yaml_tasks), tasks="my_synthvqa"), capsys, no_model)
    assert f"--include_path {path}: {message}" in line


@pytest.mark.parametrize("old,new,message", [
    ("!function utils.doc_to_text", "!function utils.no_such_function",
     "doc_to_text: !function utils.no_such_function cannot be loaded from "),
    ("!function utils.doc_to_visual", "!function helpers.doc_to_visual", "helpers.py (FileNotFoundError"),
    ("doc_to_target: answers", "doc_to_target: '{{answers}}'", "a template maps only in doc_to_text"),
    ("ignore_punctuation: true", "ignore_punctuation: false", "metric_list exact_match"),
    ("temperature: 0", "temperature: 0.7", "generation_kwargs.temperature=0.7 is not supported"),
    ("output_type: generate_until", "output_type: loglikelihood", "output_type 'loglikelihood' is not supported"),
    ("load_from_disk: true", "streaming: true", "dataset_kwargs.streaming is not supported"),
    ("test_split: test", "test_split: [test", "not readable YAML"),
])
def test_a_yaml_value_we_cannot_map_is_named(env, capsys, no_model, yaml_tasks, old, new, message):
    edit_yaml(yaml_tasks, old, new)
    assert message in rejected(argv(env, "--include_path", str(yaml_tasks), tasks="my_synthvqa"), capsys, no_model)


def test_a_yaml_task_named_as_one_of_ours_is_not_used(env, capsys, yaml_tasks, caplog):
    edit_yaml(yaml_tasks, "task: my_synthvqa", "task: synthvqa")
    edit_yaml(yaml_tasks, "doc_to_text: !function utils.doc_to_text", "doc_to_text: question")
    cli.main(argv(env, "--limit", "1", "--include_path", str(yaml_tasks), "--verbosity", "WARNING", tasks="synthvqa"),
             runner_factory=Echo)
    assert prompts_seen()[0]["prompt"].endswith("Answer the question using a single word or phrase.")  # ours
    assert "task synthvqa is already defined here, so its YAML is not used" in caplog.text


def test_a_yaml_include_is_merged_under_the_task(env, capsys, yaml_tasks):
    path = yaml_tasks / "mine" / "my_synthvqa.yaml"
    base, own = path.read_text().split("output_type: generate_until\n")
    (path.parent / "_template.yaml").write_text(own)  # no task key: read only through include
    path.write_text(base + "include: _template.yaml\n")
    runs = cli.main(argv(env, "--limit", "2", "--include_path", str(yaml_tasks), tasks="my_synthvqa"),
                    runner_factory=Echo)
    assert runs[0]["tasks"]["my_synthvqa"]["n_scored"] == 2


# --------------------------------------------------------------------------- --tasks list_with_num


def test_list_with_num_counts_local_data_and_names_what_is_missing(env, capsys, yaml_tasks):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tasks", "list_with_num", "--data_dir", env["data"], "--include_path", str(yaml_tasks)])
    out = capsys.readouterr().out
    assert re.search(rf"^docvqa_val +{N}  --data_dir ", out, re.M)
    assert re.search(rf"^my_synthvqa +{N}  ", out, re.M)
    assert re.search(r"^chartqa +-  no local or cached copy", out, re.M)
    message = str(exit_info.value.code)
    assert message.startswith("error: --tasks list_with_num counts local or cached data only, and chartqa, ")
    assert "no readable copy: pass --data_dir DIR with DIR/<task> copies" in message and "docvqa_val" not in message


def test_list_with_num_never_downloads_and_names_an_unreadable_cache(env, capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    hub_cache = tmp_path / "hub"  # a Hub cache entry for ChartQA with nothing usable in it
    (hub_cache / "datasets--lmms-lab-encoder--ChartQA").mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tasks", "list_with_num", "--data_dir", env["data"]])
    assert re.search(r"^chartqa +-  Hub cache cannot be read: ", capsys.readouterr().out, re.M)
    assert "chartqa" in str(exit_info.value.code)


# --------------------------------------------------------------------------- --check_integrity


def test_check_integrity_runs_the_tasks_tests_before_any_model(env, capsys, monkeypatch, no_model):
    calls = []
    monkeypatch.setattr(pytest, "main", lambda args: calls.append(args) or pytest.ExitCode.TESTS_FAILED)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv(env, "--check_integrity", tasks="docvqa_val,synthvqa"), runner_factory=no_model)
    assert str(exit_info.value.code).startswith("error: --check_integrity: the tests of docvqa_val, synthvqa failed")
    files, selection = calls[0][:3], calls[0][calls[0].index("-k") + 1]
    assert [Path(f).name for f in files] == ["test_eval_tasks.py", "test_lmms_parity.py", "test_lmms_parity_scores.py"]
    assert selection == "docvqa_val or synthvqa"
    monkeypatch.setattr(pytest, "main", lambda args: pytest.ExitCode.OK)
    runs = cli.main(argv(env, "--check_integrity", "--limit", "1"), runner_factory=Echo)
    assert runs[0]["tasks"]["docvqa_val"]["n_scored"] == 1


# --------------------------------------------------------------------------- --wandb_args, --hf_hub_log_args


READ_OFFLINE_RUN = """
import json, sys
from wandb.proto import wandb_internal_pb2
from wandb.sdk.internal import datastore

store = datastore.DataStore()
store.open_for_scan(sys.argv[1])
out = {"run": {}, "config": {}, "summary": {}, "history": {}, "exit": False}
while (data := store.scan_data()) is not None:
    record = wandb_internal_pb2.Record()
    record.ParseFromString(data)
    kind = record.WhichOneof("record_type")
    out["exit"] = out["exit"] or kind == "exit"
    if kind == "run":
        out["run"] = {"project": record.run.project, "name": record.run.display_name}
    elif kind in ("config", "summary", "history"):
        for item in record.history.item if kind == "history" else getattr(record, kind).update:
            out[kind]["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
print(json.dumps(out))
"""


def offline_run_records(folder: Path) -> dict[str, dict]:
    """The config, summary and history a W&B offline run wrote: its .wandb record file, read as `wandb sync` reads
    it, in a fresh interpreter, once wandb's service process has written the run's exit record."""
    import subprocess
    import time

    files = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1
    for _ in range(60):
        done = subprocess.run([sys.executable, "-c", READ_OFFLINE_RUN, str(files[0])], capture_output=True,
                              text=True, timeout=300, check=True)
        records = json.loads(done.stdout)
        if records.pop("exit"):
            return records
        time.sleep(0.5)
    pytest.fail(f"{files[0]} has no exit record: the W&B run was not finished")


def test_wandb_args_log_the_results_offline(env, capsys, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = cli.main(argv(env, "--limit", "2", "--output_path", str(tmp_path / "out"),
                         "--wandb_args", "project=vlmcompress-test,name=flags"), runner_factory=Echo)
    logged = offline_run_records(tmp_path)
    assert logged["run"] == {"project": "vlmcompress-test", "name": "flags"}
    anls = runs[0]["tasks"]["docvqa_val"]["metrics"]["anls"]
    assert logged["summary"]["baseline/docvqa_val/anls"] == logged["history"]["baseline/docvqa_val/anls"] == anls
    assert logged["summary"]["baseline/summary/n_samples"] == 2
    assert logged["config"]["tasks"] == ["docvqa_val"] and logged["config"]["limit"] == 2
    assert loggers.wandb_init_args("project=p", "auto", "pretrained=x")["name"].startswith("auto_pretrained=x_")


class FakeHfApi:
    """Records what would be pushed; copies each folder before the run's temporaries go."""

    calls: list = []

    def __init__(self, token=None):
        FakeHfApi.calls.append(("init", token))

    def create_repo(self, **kwargs):
        FakeHfApi.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        files = {str(p.relative_to(kwargs["folder_path"])): p.read_text()
                 for p in Path(kwargs["folder_path"]).rglob("*") if p.is_file()}
        FakeHfApi.calls.append(("upload_folder", kwargs["repo_id"], files))

    def update_repo_settings(self, **kwargs):
        FakeHfApi.calls.append(("update_repo_settings", kwargs))


def test_hf_hub_log_args_push_the_results_and_samples(env, capsys, tmp_path, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(cli.HubAccess, "offline_reason", lambda self: None)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    out = tmp_path / "out"
    cli.main(argv(env, "--limit", "2", "--output_path", str(out), "--log_samples", "--hf_hub_log_args",
                  "hub_results_org=me,details_repo_name=details,push_results_to_hub=True,push_samples_to_hub=True"),
             runner_factory=Echo)
    model = Path(env["model"]).name
    assert FakeHfApi.calls[0] == ("init", "hf_secret")
    creates = [c[1] for c in FakeHfApi.calls if c[0] == "create_repo"]
    assert creates == [{"repo_id": "me/details-private", "repo_type": "dataset", "private": True, "exist_ok": True}]
    (_, repo, files), = [c for c in FakeHfApi.calls if c[0] == "upload_folder"]
    assert repo == "me/details-private"  # results go to the details repository unless results_repo_name is given
    results = {k: v for k, v in files.items() if Path(k).name.startswith("results_")}
    samples = {k: v for k, v in files.items() if Path(k).name.startswith("samples_")}
    assert len(results) == 1 and all(Path(k).parent.name == model for k in files)
    assert next(iter(results.values())) == (out / "results.json").read_text()
    assert [v for v in samples.values()] == [(out / "samples_baseline_docvqa_val.jsonl").read_text()]
    assert "hf_secret" not in (out / "results.json").read_text()  # the token is not written into the results
    assert (out / "hub_upload" / "me__details-private" / model).is_dir()  # the pushed files stay there to read


def test_hub_args_that_push_nothing_are_accepted_and_push_nothing(env, capsys, monkeypatch):
    import huggingface_hub

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    cli.main(argv(env, "--limit", "1", "--hf_hub_log_args", "hub_results_org=me,public_repo=True"), runner_factory=Echo)
    assert FakeHfApi.calls == []


# --------------------------------------------------------------------------- --help and the docs


NEW_FLAGS = ("--limit", "--batch_size", "--max_batch_size", "--system_instruction", "--apply_chat_template",
             "--write_out", "--show_config", "--include_path", "--seed", "--tasks", "--wandb_args", "--hf_hub_log_args",
             "--num_fewshot", "--fewshot_as_multiturn", "--cache_requests", "--check_integrity")


def test_help_and_the_docs_list_every_flag():
    help_text = cli.build_parser().format_help()
    docs = (REPO / "docs" / "evaluation.md").read_text()
    table = docs[docs.index("## Flags"):docs.index("## Tasks")]
    for flag in NEW_FLAGS:
        assert flag in help_text
        assert f"`{flag}" in table, flag
    assert "list_with_num" in help_text and "list_with_num" in table
