"""End to end on a tiny model and local datasets: sweep, baseline reuse, loyalty, resume, failures, sharding, reports."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import run as cli  # noqa: E402
from evaluation.runner import (  # noqa: E402
    ModelRunner, Settings, generate_task, merge_records, parse_kv_list, parse_sweep, run_name, score_task, shard_ids,
    build_configs,
)
from evaluation.data import TaskData  # noqa: E402
from evaluation.tasks import get_task  # noqa: E402
from evaluation.tasks.synthetic import corrupt_image, write_local_dataset  # noqa: E402

TASKS = "docvqa_val,textvqa_val"
N = 4
GEN = "max_new_tokens=4"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vlmcompress.testing import save_tiny_model

    root = tmp_path_factory.mktemp("eval_run")
    model = save_tiny_model("qwen2_vl", root / "model")
    for name in TASKS.split(","):
        write_local_dataset(name, root / "data", n=N)
    return {"model": str(model), "data": str(root / "data"), "root": root}


def argv(env, out, *extra, model_args=""):
    args = ["--model_args", f"pretrained={env['model']}{',' + model_args if model_args else ''}", "--tasks", TASKS,
            "--data_dir", env["data"], "--gen_kwargs", GEN, "--output_path", str(out), "--verbosity", "ERROR",
            "--device", "cpu"]
    return args + list(extra)


class Counting(ModelRunner):
    """The real runner, counting generated samples per config (class-level, reset by the tests)."""

    calls: Counter = Counter()

    def __init__(self, base, compression, device=None):
        super().__init__(base, compression, device)
        self.name = run_name(compression)

    def generate(self, samples, gen_kwargs):
        Counting.calls[self.name] += len(samples)
        return super().generate(samples, gen_kwargs)


def test_parsing():
    assert parse_kv_list("pretrained=/a/b,kv=snapkv,kv_budget=0.1,n=64,flag=true,x=none") == {
        "pretrained": "/a/b", "kv": "snapkv", "kv_budget": 0.1, "n": 64, "flag": True, "x": None}
    combos = parse_sweep(["kv=snapkv,pyramidkv,vlcache", "kv_budget=0.01,0.1,0.4"])
    assert len(combos) == 9 and {"kv": "vlcache", "kv_budget": 0.4} in combos
    configs = build_configs({"pretrained": "p", "window_size": 8}, combos)
    assert configs[0] == {} and len(configs) == 10 and all(c["window_size"] == 8 for c in configs[1:])
    assert build_configs({"pretrained": "p"}) == [{}]


def test_tasks_list(capsys):
    assert cli.main(["--tasks", "list"]) is None
    out = capsys.readouterr().out
    assert "lmms-lab-encoder/DocVQA" in out and "videomme" in out


def test_sweep_writes_reports_and_pareto(env, tmp_path):
    out = tmp_path / "out"
    runs = cli.main(argv(env, out, "--sweep", "kv=streamingllm,h2o", "kv_budget=0.5,0.25", "--log_samples"))
    assert [r["name"] for r in runs][0] == "baseline" and len(runs) == 5
    doc = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in doc["runs"]] == [r["name"] for r in runs]
    assert doc["versions"]["transformers"] and doc["machine"]["cpu_count"] and doc["failures"] == 0
    for run in doc["runs"]:
        for task in TASKS.split(","):
            t = run["tasks"][task]
            assert t["n_scored"] == N and t["efficiency"]["kv_bytes"] > 0 and t["efficiency"]["latency_s"] > 0
            if run["baseline"]:
                assert "loyalty" not in t
            else:
                assert 0.0 <= t["loyalty"] <= 1.0 and 0.0 <= t["agreement"] <= 1.0
                # the eviction really shrinks the cache by the budget
                budget = run["compression"]["kv_budget"]
                assert t["efficiency"]["kv_bytes_ratio"] == pytest.approx(budget, abs=0.05)
    assert set(doc["pareto"]["kv_bytes"]) <= {r["name"] for r in runs} and doc["pareto"]["kv_bytes"]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text()
    assert "kv=h2o,kv_budget=0.25" in table and "docvqa_val" in table
    samples = sorted(out.glob("samples_*.jsonl"))
    assert len(samples) == 5 * 2
    first = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(first) == N and {"doc_id", "prediction", "answers", "stats"} <= set(first[0])
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files


class CompressedFailsToLoad(ModelRunner):
    def __init__(self, base, compression, device=None):
        if compression:
            raise RuntimeError("out of memory while loading the pruned model")
        super().__init__(base, compression, device)


def test_a_config_that_fails_to_load_fails_alone(env, tmp_path):
    runs = cli.main(argv(env, tmp_path / "o", model_args="prune=fastv,prune_budget=0.5"),
                    runner_factory=CompressedFailsToLoad)
    assert runs[0]["name"] == "baseline" and runs[0]["error"] is None
    assert "out of memory" in runs[1]["error"] and runs[1]["tasks"] == {}
    assert "config failed" in (tmp_path / "o" / "results.md").read_text()


def test_baseline_reused_from_cache(env, tmp_path):
    cache = tmp_path / "cache"
    Counting.calls.clear()
    cli.main(argv(env, tmp_path / "a", "--use_cache", str(cache), model_args="kv=streamingllm,kv_budget=0.5"),
             runner_factory=Counting)
    assert Counting.calls["baseline"] == 2 * N
    Counting.calls.clear()
    runs = cli.main(argv(env, tmp_path / "b", "--use_cache", str(cache), model_args="kv=h2o,kv_budget=0.5"),
                    runner_factory=Counting)
    assert Counting.calls["baseline"] == 0  # served by the cache
    assert Counting.calls["kv=h2o,kv_budget=0.5"] == 2 * N
    assert runs[1]["tasks"]["docvqa_val"]["loyalty_samples"] == N


class Perturbed(ModelRunner):
    """Generates with the uncompressed model under a compressed name; rewrites the answers of PERTURB doc ids."""

    PERTURB = {0, 2}

    def __init__(self, base, compression, device=None):
        super().__init__(base, {}, device)
        self.compressed = bool(compression)
        self.count = 0

    def generate(self, samples, gen_kwargs):
        out = super().generate(samples, gen_kwargs)
        if self.compressed:
            out = [("qqqqqqqqqqqqqqqqqqqqqqqqqqqqqq" if s["doc_id"] in self.PERTURB else t, st)
                   for s, (t, st) in zip(samples, out)]
        return out


@pytest.mark.parametrize("perturb", [set(), {0, 2}])
def test_loyalty(env, tmp_path, perturb, monkeypatch):
    monkeypatch.setattr(Perturbed, "PERTURB", perturb)
    runs = cli.main(argv(env, tmp_path / "o", model_args="kv=streamingllm,kv_budget=0.5"), runner_factory=Perturbed)
    expected = 1.0 - len(perturb) / N
    for task in TASKS.split(","):
        t = runs[1]["tasks"][task]
        assert t["loyalty"] == pytest.approx(expected)
        assert t["agreement"] == pytest.approx(expected)
        assert t["loyalty_samples"] == N


class Crashing(Counting):
    LIMIT = 3

    def generate(self, samples, gen_kwargs):
        if sum(Counting.calls.values()) + len(samples) > Crashing.LIMIT:
            raise KeyboardInterrupt("simulated kill")
        return super().generate(samples, gen_kwargs)


def test_resume_after_crash(env, tmp_path):
    cache = tmp_path / "cache"
    Counting.calls.clear()
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv(env, tmp_path / "o", "--use_cache", str(cache)), runner_factory=Crashing)
    assert sum(Counting.calls.values()) == Crashing.LIMIT
    Counting.calls.clear()
    runs = cli.main(argv(env, tmp_path / "o", "--use_cache", str(cache), "--log_samples"), runner_factory=Counting)
    assert sum(Counting.calls.values()) == 2 * N - Crashing.LIMIT  # finished samples were not regenerated
    records = runs[0]["records"]["docvqa_val"]
    assert [r["cached"] for r in records] == [True] * Crashing.LIMIT + [False] * (N - Crashing.LIMIT)
    # the resumed run gives the predictions of an uninterrupted one
    fresh = cli.main(argv(env, tmp_path / "p"))
    for task in TASKS.split(","):
        assert [r["prediction"] for r in runs[0]["records"][task]] == [r["prediction"] for r in fresh[0]["records"][task]]


class FailsOnDoc3(ModelRunner):
    def generate(self, samples, gen_kwargs):
        if any(s["doc_id"] == 3 for s in samples):
            raise RuntimeError("boom on doc 3")
        return super().generate(samples, gen_kwargs)


def test_bad_data_is_counted_and_the_run_goes_on(env, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(env["data"], data)
    corrupt_image(data, "docvqa_val", [1])
    args = argv(env, tmp_path / "o", "--batch_size", "2")
    args[args.index("--data_dir") + 1] = str(data)
    runs = cli.main(args, runner_factory=FailsOnDoc3)
    t = runs[0]["tasks"]["docvqa_val"]
    assert t["failures"] == 2 and t["n_scored"] == N - 2
    assert {f["doc_id"] for f in t["failed_samples"]} == {1, 3}
    assert any("image" in f["error"] for f in t["failed_samples"])
    assert any("boom" in f["error"] for f in t["failed_samples"])
    assert runs[0]["tasks"]["textvqa_val"]["failures"] == 1  # doc 3 raises there too
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["failures"] == 3


def test_two_rank_sharding_matches_one_process(env):
    base = {"pretrained": env["model"]}
    runner = ModelRunner(base, {}, "cpu")
    task = get_task("docvqa_val")
    data = TaskData(task, env["data"])
    gen = parse_kv_list(GEN)

    def records(rank, world):
        s = Settings(tasks=[task], model_args=base, gen_kwargs=gen, rank=rank, world=world, progress=False)
        return generate_task(runner, data, s, {}, None, "qwen2_vl", base)

    assert shard_ids(5, 0, 2) == [0, 2, 4] and shard_ids(5, 1, 2) == [1, 3]
    single = records(0, 1)
    parts = [records(0, 2), records(1, 2)]
    assert [r["doc_id"] for r in parts[0]] == [0, 2] and [r["doc_id"] for r in parts[1]] == [1, 3]
    merged = merge_records(parts[::-1])  # gather order does not matter
    assert [r["doc_id"] for r in merged] == list(range(N))
    assert [r["prediction"] for r in merged] == [r["prediction"] for r in single]
    assert score_task(task, merged)["metrics"] == score_task(task, single)["metrics"]


def test_default_run_without_arguments(tmp_path, monkeypatch, capsys):
    import evaluation.default as default

    small = dict(default.DEFAULT, tasks=["mme", "ai2d"], samples_per_task=2,
                 configs=[{"kv": "snapkv", "kv_budget": 0.5, "window_size": 4}], prune_configs=[])
    monkeypatch.setattr(default, "DEFAULT", small)
    monkeypatch.setattr(default, "CHECKPOINTS", tmp_path / "none")  # the tiny fallback, whatever is committed
    monkeypatch.setenv("VLMCOMPRESS_EVAL_HOME", str(tmp_path))
    runs = cli.main([])
    assert [r["name"] for r in runs] == ["baseline", "kv=snapkv,kv_budget=0.5,window_size=4"]
    assert all(r["tasks"]["mme"]["n_scored"] == 2 for r in runs)
    assert (tmp_path / "results.json").exists() and (tmp_path / "models" / "qwen2_vl").is_dir()
    assert "| baseline | mme |" in capsys.readouterr().out


def test_default_run_uses_a_trained_reference_checkpoint_when_one_is_there(tmp_path, monkeypatch, capsys):
    import evaluation.default as default
    from vlmcompress.testing import save_tiny_model

    # a stand-in for evaluation/reference/checkpoints/qwen2_vl (random weights, but the same files)
    checkpoints = tmp_path / "checkpoints"
    save_tiny_model("qwen2_vl", checkpoints / "qwen2_vl")
    reference = dict(default.DEFAULT["reference"], samples_per_task=5, batch_size=5,
                     configs=[{"kv": "streamingllm", "kv_budget": 0.5}], prune_configs=[])
    monkeypatch.setattr(default, "DEFAULT", dict(default.DEFAULT, reference=reference))
    monkeypatch.setattr(default, "CHECKPOINTS", checkpoints)
    monkeypatch.setenv("VLMCOMPRESS_EVAL_HOME", str(tmp_path / "home"))
    runs = cli.main([])
    out = capsys.readouterr().out
    assert "TRAINED SynthVQA reference checkpoint, qwen2_vl" in out and "TINY RANDOM-WEIGHT" not in out
    assert "| config | synthvqa: attribute | count | long_context | ocr | relation |" in out  # the per-type table
    assert [r["name"] for r in runs] == ["baseline", "kv=streamingllm,kv_budget=0.5"]
    metrics = runs[0]["tasks"]["synthvqa"]["metrics"]
    # the first five test questions are one of each type: each per-type accuracy is a 0/1 of one answer
    assert {f"exact_match_{t}" for t in ("attribute", "count", "relation", "ocr", "long_context")} <= set(metrics)
    assert all(metrics[f"exact_match_{t}"] in (0.0, 1.0) for t in ("attribute", "count", "ocr"))
    # another checkpoint (retrained) gets its own answer cache
    first = default.prepare(echo=False)["cache_dir"]
    save_tiny_model("qwen2_vl", checkpoints / "qwen2_vl", seed=1)
    assert default.prepare(echo=False)["cache_dir"] != first


def test_default_run_falls_back_to_the_tiny_model_and_says_so(tmp_path, monkeypatch):
    import evaluation.default as default

    monkeypatch.setattr(default, "CHECKPOINTS", tmp_path / "none")
    d = default.prepare(tmp_path / "home", echo=False)
    assert d["mode"] == "tiny" and "TINY RANDOM-WEIGHT qwen2_vl" in d["header"]
    assert str(tmp_path / "none" / "qwen2_vl" / "model.safetensors") in d["header"]


def test_cuda_graphs_is_a_decoding_path_for_every_config(env, tmp_path, monkeypatch):
    """`cuda_graphs=true` in --model_args decodes every config statically, the baseline included, under the
    same run names, and predicts what eager decoding predicts."""
    from vlmcompress.decoding.static import StaticDecoding

    static_caches = []  # the cache class of every statically decoded generate
    original = StaticDecoding.install
    monkeypatch.setattr(StaticDecoding, "install",
                        lambda self: static_caches.append(type(self.cache).__name__) or original(self))
    runs = {}
    for path, extra in (("eager", ""), ("graphs", ",cuda_graphs=true")):
        runs[path] = cli.main(argv(env, tmp_path / path, "--log_samples", model_args="kv=snapkv,kv_budget=0.5" + extra))
        if path == "eager":
            assert not static_caches
    assert set(static_caches) == {"FullCache", "SnapKVCache"}  # the baseline too
    assert [r["name"] for r in runs["graphs"]] == [r["name"] for r in runs["eager"]] == ["baseline",
                                                                                           "kv=snapkv,kv_budget=0.5"]
    for eager_file, graphs_file in zip(sorted((tmp_path / "eager").glob("samples_*.jsonl")),
                                       sorted((tmp_path / "graphs").glob("samples_*.jsonl"))):
        eager = [json.loads(line) for line in eager_file.read_text().splitlines()]
        graphs = [json.loads(line) for line in graphs_file.read_text().splitlines()]
        assert [s["prediction"] for s in graphs] == [s["prediction"] for s in eager]
