"""The `vlmcompress` model backend for lmms-eval (evaluation/lmms_backend.py).

In-process: the four architectures through `generate_until` (batch equals single, equals evaluation/run.py's
runner), efficiency and loyalty records, argument errors. Through lmms-eval's real CLI (a subprocess, offline):
a YAML SynthVQA task on the trained reference checkpoint, whose accuracy and answers equal evaluation/run.py's,
uncompressed, with SnapKV and with VisionZip. Needs `pip install -e ".[lmms]"` (lmms-eval and this package's
entry point); without lmms-eval the module skips, except under CI=true, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    import lmms_eval  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("lmms-eval is not installed (pip install -e '.[lmms]')", allow_module_level=True)

from lmms_eval.api.instance import Instance  # noqa: E402

from evaluation import run as cli  # noqa: E402
from evaluation.lmms_backend import VlmCompress, cli_output_path, read_baseline_samples  # noqa: E402
from evaluation.reference import synthvqa  # noqa: E402
from evaluation.runner import ModelRunner, generate_kwargs  # noqa: E402
from vlmcompress.testing import ARCHITECTURES, random_image  # noqa: E402

CHECKPOINT = ROOT / "evaluation" / "reference" / "checkpoints" / "qwen2_vl"
QUESTIONS = ("What is in the picture?", "Describe the colours of this image in detail, please.", "Count the dots.")
GEN = {"max_new_tokens": 5, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


def requests(docs: dict, task: str = "toy", split: str = "test", gen: dict = GEN) -> list[Instance]:
    """lmms-eval's generate_until instances for `docs` (doc_id -> {question, image})."""
    return [Instance(request_type="generate_until", idx=0, metadata={"task": task, "doc_id": i, "repeats": 1},
                     arguments=(d["question"], dict(gen), lambda doc: [doc["image"]], i, task, split))
            for i, d in docs.items()]


def toy_docs() -> dict:
    return {i: {"question": q, "image": random_image(i, size=(64 + 16 * i, 48))} for i, q in enumerate(QUESTIONS)}


def test_the_entry_point_is_installed_and_resolves_to_the_backend():
    declared = [e for e in entry_points(group="lmms_eval.models") if e.name == "vlmcompress"]
    assert declared, "no `vlmcompress` lmms_eval.models entry point: pip install -e '.[lmms]'"
    assert declared[0].value == "vlmcompress.integrations.lmms_eval:manifests"
    from lmms_eval.models import get_model

    assert get_model("vlmcompress") is VlmCompress


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generate_until_batches_as_single_and_as_run_py(arch, tiny_dirs, tmp_path):
    docs = toy_docs()
    model = VlmCompress(pretrained=tiny_dirs[arch], batch_size=3, device="cpu", output_path=str(tmp_path))
    model.task_dict = {"toy": {"test": docs}}
    batched = model.generate_until(requests(docs))
    model.batch_size_per_gpu = 1
    single = model.generate_until(requests(docs))
    assert batched == single
    # evaluation/run.py's runner on the same sample, with the chat template and the visuals first
    runner = ModelRunner({"pretrained": tiny_dirs[arch]}, {}, "cpu")
    gen = generate_kwargs(GEN["max_new_tokens"], {})
    assert single == [runner.generate([{"prompt": d["question"], "images": [d["image"]], "video": None}], gen)[0][0]
                      for d in docs.values()]
    rows = [json.loads(line) for f in tmp_path.rglob("*_efficiency_toy.jsonl") for line in f.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == [0, 0, 1, 1, 2, 2]
    assert sorted(r["batch_size"] for r in rows) == [1, 1, 1, 3, 3, 3]
    assert all(r["visual_tokens"] > 0 and r["kv_bytes"] > 0 and r["ttft_s"] > 0 for r in rows)


def test_model_args_reach_vlmcompress_load(tiny_dirs):
    """Compression and cuda_graphs pass through (typed as lmms-eval parses them, 'none' meaning None); on the CPU
    static decoding runs its steps eagerly and answers as the default decoding does."""
    docs = toy_docs()
    outputs = {}
    for cuda_graphs in (False, True):
        model = VlmCompress(pretrained=tiny_dirs["qwen2_vl"], device="cpu", kv="snapkv", kv_budget=0.5, window_size=4,
                            prune="none", cuda_graphs=cuda_graphs)
        expected = {"kv": {"method": "snapkv", "budget": 0.5, "window_size": 4}}
        expected.update({"cuda_graphs": True} if cuda_graphs else {})
        assert model.runner.model.compression.describe() == expected
        model.task_dict = {"toy": {"test": docs}}
        outputs[cuda_graphs] = model.generate_until(requests(docs))
    assert outputs[True] == outputs[False]


def test_a_video_file_is_sampled_as_run_py_samples_it(tiny_dirs, tmp_path):
    from evaluation.data import load_video_frames

    video = tmp_path / "clip.gif"
    frames = [random_image(i) for i in range(6)]
    frames[0].save(video, save_all=True, append_images=frames[1:], duration=100)
    model = VlmCompress(pretrained=tiny_dirs["qwen2_vl"], device="cpu", num_frames=4)
    model.task_dict = {"clips": {"test": {0: {"question": "What happens?", "video": str(video)}}}}
    request = Instance(request_type="generate_until", idx=0, metadata={"task": "clips", "doc_id": 0, "repeats": 1},
                       arguments=("What happens?", dict(GEN), lambda doc: [doc["video"]], 0, "clips", "test"))
    sample = {"prompt": "What happens?", "images": [], "video": load_video_frames(video, 4)}
    gen = generate_kwargs(GEN["max_new_tokens"], {})
    assert model.generate_until([request]) == [model.runner.generate([sample], gen)[0][0]]
    assert model.rows["clips"][0]["visual_tokens"] > 0


def test_stop_strings_truncate_and_placeholders_are_not_text(tiny_dirs):
    docs = toy_docs()
    model = VlmCompress(pretrained=tiny_dirs["qwen2_vl"], device="cpu", output_path=None)
    model.task_dict = {"toy": {"test": docs}}
    full = model.generate_until(requests(docs, gen=dict(GEN, until=[])))
    stops = {i: text[1:3] for i, text in enumerate(full) if len(text) >= 3}  # a stop string inside the answer
    assert stops
    cut = {i: model.generate_until(requests({i: docs[i]}, gen=dict(GEN, until=[stop])))[0] for i, stop in stops.items()}
    assert cut == {i: full[i].split(stop)[0] for i, stop in stops.items()}
    with_placeholder = {i: dict(d, question="<image>" + d["question"]) for i, d in docs.items()}
    model.task_dict = {"toy": {"test": with_placeholder}}
    assert model.generate_until(requests(with_placeholder, gen=dict(GEN, until=[]))) == full


def test_loyalty_against_a_baseline_samples_file(tiny_dirs, tmp_path):
    """Agreement for every task; for a task evaluation/ defines (synthvqa), run.py's loyalty (its scorer)."""
    rows = synthvqa.build_split("test", 3)
    docs = {i: rows[i] for i in range(3)}
    model = VlmCompress(pretrained=tiny_dirs["qwen2_vl"], device="cpu")
    model.task_dict = {"synthvqa": {"test": docs}}
    ours = model.generate_until(requests({i: d for i, d in docs.items()}, task="synthvqa"))
    # a baseline (lmms-eval's --log_samples layout) that agrees on doc 0, differs in case only on 1, differs on 2
    baseline = [ours[0], ours[1].upper() + " ", ours[2] + " extra"]
    samples = tmp_path / "m" / "20260101_000000_samples_synthvqa.jsonl"
    samples.parent.mkdir()
    samples.write_text("".join(json.dumps({"doc_id": i, "filtered_resps": b, "target": "x"}) + "\n"
                               for i, b in enumerate(baseline)))
    assert read_baseline_samples(tmp_path) == {"synthvqa": dict(enumerate(baseline))}
    model = VlmCompress(pretrained=tiny_dirs["qwen2_vl"], device="cpu", baseline_samples=str(tmp_path),
                        output_path=str(tmp_path / "out"))
    model.task_dict = {"synthvqa": {"test": docs}}
    assert model.generate_until(requests(docs, task="synthvqa")) == ours
    by_id = {r["doc_id"]: r for r in model.rows["synthvqa"]}
    # agreement: the same text up to white space; loyalty: SynthVQA's scorer (case and outer punctuation blind)
    expected_agreement = [float(" ".join(o.split()) == " ".join(b.split())) for o, b in zip(ours, baseline)]
    assert [by_id[i]["agreement"] for i in range(3)] == expected_agreement
    assert [by_id[i]["loyalty"] for i in range(3)] == [1.0, 1.0, 0.0]
    summary = json.loads(next((tmp_path / "out").rglob("*_efficiency.json")).read_text())["synthvqa"]
    assert summary["agreement"] == pytest.approx(1 / 3) and summary["loyalty_samples"] == 3


def test_bad_arguments_fail_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no_model")  # a load would fail on this path: the argument error must come first
    with pytest.raises(ValueError, match="--batch_size N"):
        VlmCompress(pretrained=missing, batch_size="auto")
    with pytest.raises(ValueError, match="baseline_samples=.*no such file"):
        VlmCompress(pretrained=missing, baseline_samples=str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no lmms-eval samples file"):
        VlmCompress(pretrained=missing, baseline_samples=str(tmp_path / "empty"))


def test_the_output_path_is_read_from_lmms_eval_s_command_line():
    assert cli_output_path(["--model", "vlmcompress", "--output_path", "out/x", "--log_samples"]) == "out/x"
    assert cli_output_path(["--output_path=out/y"]) == "out/y"
    assert cli_output_path(["--tasks", "mme", "--output_path"]) is None  # no value: nothing, and no exit


def test_unsupported_request_kinds_name_the_task(tiny_dirs):
    model = VlmCompress(pretrained=tiny_dirs["qwen2_vl"], device="cpu")
    loglik = Instance(request_type="loglikelihood", arguments=("q", "a", None, 0, "mmbench_mc", "test"), idx=0,
                      metadata={"task": "mmbench_mc", "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError, match="mmbench_mc.*log-likelihood"):
        model.loglikelihood([loglik])
    model.task_dict = {"audio": {"test": {0: {"question": "q", "image": {"array": [0.0], "sampling_rate": 16000}}}}}
    with pytest.raises(ValueError, match="task audio.*images and one video"):
        model.generate_until(requests({0: model.task_dict["audio"]["test"][0]}, task="audio"))


# --------------------------------------------------------------------------- lmms-eval's CLI vs evaluation/run.py

N_SAMPLES = 10  # two questions of each SynthVQA type
CONFIGS = {"baseline": "", "snapkv": "kv=snapkv,kv_budget=0.2,window_size=16",
           "visionzip": "prune=visionzip,prune_budget=0.25"}
TASK_UTILS = '''
from evaluation.reference.synthvqa import exact_match


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answers"])}
'''
TASK_YAML = '''
task: synthvqa
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
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
'''


@pytest.fixture(scope="module")
def synthvqa_task(tmp_path_factory):
    """SynthVQA's first test questions as a local DatasetDict, and an lmms-eval task folder reading it."""
    import datasets

    root = tmp_path_factory.mktemp("lmms_synthvqa")
    data = root / "data" / "synthvqa"  # also evaluation/run.py's --data_dir layout
    datasets.DatasetDict({"test": synthvqa.build_split("test", N_SAMPLES)}).save_to_disk(str(data))
    tasks = root / "tasks" / "synthvqa"
    tasks.mkdir(parents=True)
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "synthvqa.yaml").write_text(TASK_YAML.format(data=data))
    return root


def lmms_eval_cli(root: Path, name: str, model_args: str, baseline: Path | None = None) -> Path:
    """`python -m lmms_eval` from outside the repository, offline; returns the folder of its results."""
    args = f"pretrained={CHECKPOINT}" + (f",{model_args}" if model_args else "")
    if baseline is not None:
        args += f",baseline_samples={baseline}"
    out = root / "lmms" / name
    # one thread, as the tests' own process (conftest): several threads on a shared CPU only wait for each other
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "vlmcompress", "--model_args", args, "--tasks", "synthvqa",
         "--include_path", str(root / "tasks"), "--limit", str(N_SAMPLES), "--batch_size", "2", "--device", "cpu",
         "--output_path", str(out), "--log_samples", "--verbosity", "WARNING"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    results = list(out.rglob("*_results.json"))
    assert proc.returncode == 0 and results, proc.stdout[-3000:] + proc.stderr[-3000:]
    return results[0].parent


@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").exists(), reason="no trained reference checkpoint")
def test_lmms_eval_cli_equals_run_py_on_synthvqa(synthvqa_task, tmp_path):
    root = synthvqa_task
    folders = {"baseline": lmms_eval_cli(root, "baseline", "")}
    for name in ("snapkv", "visionzip"):
        folders[name] = lmms_eval_cli(root, name, CONFIGS[name], baseline=folders["baseline"])

    for name, model_args in CONFIGS.items():
        runs = cli.main(["--model_args", f"pretrained={CHECKPOINT}" + (f",{model_args}" if model_args else ""),
                         "--tasks", "synthvqa", "--data_dir", str(root / "data"), "--limit", str(N_SAMPLES),
                         "--batch_size", "2", "--device", "cpu", "--use_cache", str(tmp_path / "cache"),
                         "--output_path", str(tmp_path / name), "--verbosity", "ERROR"])
        ours = runs[-1]["tasks"]["synthvqa"]
        records = {r["doc_id"]: r for r in runs[-1]["records"]["synthvqa"]}
        folder = folders[name]
        results = json.loads(next(folder.glob("*_results.json")).read_text())["results"]["synthvqa"]
        samples = [json.loads(line) for line in next(folder.glob("*_samples_synthvqa.jsonl")).read_text().splitlines()]
        rows = {r["doc_id"]: r for line in next(folder.glob("*_efficiency_synthvqa.jsonl")).read_text().splitlines()
                for r in [json.loads(line)]}
        # the same answers, hence the same accuracy
        assert {s["doc_id"]: s["filtered_resps"] for s in samples} == {i: r["prediction"] for i, r in records.items()}
        assert results["exact_match,none"] == pytest.approx(ours["accuracy"], abs=1e-12)
        # per-sample efficiency beside lmms-eval's results (the folder its --output_path gives), one row per sample
        assert sorted(rows) == list(range(N_SAMPLES))
        assert all(row["visual_tokens"] == records[i]["stats"]["visual_tokens"] for i, row in rows.items())
        if name != "baseline":  # loyalty to the baseline run's samples equals run.py's loyalty
            summary = json.loads(next(folder.glob("*_efficiency.json")).read_text())["synthvqa"]
            assert summary["loyalty_samples"] == N_SAMPLES
            assert summary["loyalty"] == pytest.approx(ours["loyalty"], abs=1e-12)
            assert summary["agreement"] == pytest.approx(ours["agreement"], abs=1e-12)
            # the baseline run's efficiency rows sit beside its samples: the KV share is measured against them
            base = [json.loads(line) for line in next(folders["baseline"].glob("*_efficiency_synthvqa.jsonl")).open()]
            ratio = summary["efficiency"]["kv_bytes"] / (sum(r["kv_bytes"] for r in base) / len(base))
            assert summary["efficiency"]["kv_bytes_ratio"] == pytest.approx(ratio, rel=1e-9)
    base_rows = [json.loads(line) for line in next(folders["baseline"].glob("*_efficiency_synthvqa.jsonl")).open()]
    kv_rows = [json.loads(line) for line in next(folders["snapkv"].glob("*_efficiency_synthvqa.jsonl")).open()]
    pruned_rows = [json.loads(line) for line in next(folders["visionzip"].glob("*_efficiency_synthvqa.jsonl")).open()]
    assert sum(r["kv_bytes"] for r in kv_rows) < 0.5 * sum(r["kv_bytes"] for r in base_rows)
    assert max(r["visual_tokens"] for r in pruned_rows) < min(r["visual_tokens"] for r in base_rows)
