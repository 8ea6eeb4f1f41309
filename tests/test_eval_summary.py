"""EffiVLM-Bench's summary metrics (evaluation/summary.py) and the report step over several runs
(evaluation/compare.py): hand-computed values on made-up runs, bad inputs, and a real CLI run of the two
trained reference checkpoints."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import compare  # noqa: E402
from evaluation.report import effivlm_table  # noqa: E402
from evaluation.summary import config_metrics, generalization  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "evaluation" / "reference" / "checkpoints"


def task(score, loyalty=None, speedup=None):
    """A task result as runner.score_task writes it (only what the summary reads)."""
    return {"primary": {"name": "exact_match", "value": score}, "loyalty": loyalty,
            "efficiency": {"speedup": speedup}}


# Model A: baseline t1 0.80, t2 0.50; snapkv t1 0.60 (r 0.75), t2 0.50 (r 1.0), loyalty 0.7 / 0.9, speed-up 1.5 / 2.5
A_BASE = {"t1": task(0.80), "t2": task(0.50)}
A_SNAP = {"t1": task(0.60, 0.7, 1.5), "t2": task(0.50, 0.9, 2.5)}
# Model B: baseline t1 0.40, t2 0.25; snapkv t1 0.40 (r 1.0), t2 0.20 (r 0.8), loyalty 1.0 / 0.6, speed-up 1.2 / 1.8
B_BASE = {"t1": task(0.40), "t2": task(0.25)}
B_SNAP = {"t1": task(0.40, 1.0, 1.2), "t2": task(0.20, 0.6, 1.8)}
# OG over r = 0.75, 1.0, 1.0, 0.8: mean 0.8875, squared deviations 0.01890625 + 0.01265625 + 0.01265625 + 0.00765625
OG_AB = math.sqrt(0.051875 / 4)


def test_op_ol_oe_of_one_config():
    m = config_metrics(A_SNAP, A_BASE)
    assert m["relative_performance"] == pytest.approx({"t1": 0.75, "t2": 1.0})
    assert m["OP"] == pytest.approx(0.875)
    assert m["OL"] == pytest.approx(0.8)
    assert m["OE"] == pytest.approx(2.0)
    assert config_metrics(B_SNAP, B_BASE)["OP"] == pytest.approx(0.9)


def test_a_task_without_a_relative_score_is_left_out():
    # t3's baseline scored 0 (no ratio), t4 has no score (predict_only): OP is over t1 and t2 only
    base = dict(A_BASE, t3=task(0.0), t4=task(None))
    snap = dict(A_SNAP, t3=task(0.3, 0.5, 1.0), t4=task(None))
    m = config_metrics(snap, base)
    assert m["relative_performance"]["t3"] is None and m["relative_performance"]["t4"] is None
    assert m["OP"] == pytest.approx(0.875)
    assert m["OL"] == pytest.approx((0.7 + 0.9 + 0.5) / 3)
    assert m["OE"] == pytest.approx((1.5 + 2.5 + 1.0) / 3)


def test_the_baseline_has_no_summary_metrics():
    assert config_metrics(A_BASE, None) == {"OP": None, "OL": None, "OE": None, "relative_performance": {}}


def test_generalization_is_the_population_spread_over_models_and_tasks():
    assert generalization({"a": {"t1": 0.75, "t2": 1.0}, "b": {"t1": 1.0, "t2": 0.8}}) == pytest.approx(OG_AB)
    # undefined cells are skipped; equal relative scores everywhere spread by 0
    assert generalization({"a": {"t1": 0.75, "t2": None}, "b": {"t1": 0.25}}) == pytest.approx(0.25)
    assert generalization({"a": {"t1": 0.9, "t2": 0.9}}) == 0.0
    assert generalization({"a": {"t1": None}}) is None


def test_results_table_lists_compressed_configs_only():
    runs = [{"name": "baseline", "baseline": True, "tasks": A_BASE, "summary": config_metrics(A_BASE, None)},
            {"name": "kv=snapkv", "baseline": False, "tasks": A_SNAP, "summary": config_metrics(A_SNAP, A_BASE)}]
    lines = effivlm_table(runs)
    assert lines[1] == "| config | OP | OL | OE | t1 relative | t2 relative |"
    assert lines[3:] == ["| kv=snapkv | 0.875 | 0.800 | 2.00 | 0.750 | 1.000 |"]
    assert effivlm_table(runs[:1]) == []


# --------------------------------------------------------------------------- the report step


def write_run(folder: Path, pretrained: str, configs: dict[str, dict], tasks=("t1", "t2"), baseline_error=None) -> Path:
    """A results.json as evaluation/run.py writes it: the baseline (first) and compressed configs."""
    runs = [{"name": name, "baseline": name == "baseline", "error": baseline_error if name == "baseline" else None,
             "tasks": results} for name, results in configs.items()]
    folder.mkdir(parents=True, exist_ok=True)
    document = {"config": {"model_args": {"pretrained": pretrained}, "tasks": list(tasks)}, "runs": runs}
    (folder / "results.json").write_text(json.dumps(document))
    return folder


@pytest.fixture
def two_models(tmp_path):
    a = write_run(tmp_path / "a", "org/model-a", {"baseline": A_BASE, "kv=snapkv": A_SNAP, "kv=h2o": A_SNAP})
    b = write_run(tmp_path / "b", "org/model-b", {"baseline": B_BASE, "kv=snapkv": B_SNAP})
    return a, b


def test_compare_two_models(two_models, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main([str(two_models[0]), str(two_models[1] / "results.json"), "--output_path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "comparison.md").read_text()
    assert f"| kv=snapkv | 0.887 | {OG_AB:.3f} | 0.800 | 1.75 | 0.875 | 0.900 |" in printed
    assert "not in every run, not compared: kv=h2o" in printed
    doc = json.loads((out / "comparison.json").read_text())
    assert [r["model"] for r in doc["runs"]] == ["model-a", "model-b"]
    (row,) = doc["configs"]
    assert row["OP"] == pytest.approx((0.875 + 0.9) / 2)
    assert row["OG"] == pytest.approx(OG_AB)
    assert row["OL"] == pytest.approx(0.8)
    assert row["OE"] == pytest.approx((2.0 + 1.5) / 2)
    assert row["per_model"]["model-b"]["relative_performance"] == pytest.approx({"t1": 1.0, "t2": 0.8})


def test_runs_of_models_with_one_name_are_told_apart_by_path(tmp_path, capsys):
    a = write_run(tmp_path / "a", "x/model", {"baseline": A_BASE, "kv=snapkv": A_SNAP})
    b = write_run(tmp_path / "b", "y/model", {"baseline": B_BASE, "kv=snapkv": B_SNAP})
    assert compare.main([str(a), str(b)]) == 0
    assert f"| OP {a} | OP {b} |" in capsys.readouterr().out


def bad(tmp_path, two_models):
    a, b = two_models
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "results.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "afile").write_text("")
    failed = write_run(tmp_path / "failed", "m", {"baseline": {}, "kv=snapkv": A_SNAP}, baseline_error="OSError: x")
    unscored = write_run(tmp_path / "unscored", "m", {"baseline": {"t1": task(None)}, "kv=snapkv": {"t1": task(None)}})
    three = write_run(tmp_path / "three", "m", {"baseline": A_BASE, "kv=snapkv": A_SNAP}, tasks=("t1", "t2", "t3"))
    lone = write_run(tmp_path / "lone", "m", {"baseline": B_BASE, "prune=fastv": B_SNAP})
    return {
        "missing": ([str(a), str(tmp_path / "nowhere")], "nowhere: no results.json there"),
        "not json": ([str(a), str(tmp_path / "garbage")], "not readable JSON"),
        "not ours": ([str(a), str(tmp_path / "other.json")], "not a results.json of evaluation/run.py"),
        "failed baseline": ([str(a), str(failed)], "no scored baseline run"),
        "predict only": ([str(a), str(unscored)], "no scored baseline run"),
        "tasks differ": ([str(a), str(three)], "has tasks t1,t2,t3 but"),
        "twice": ([str(a), str(a / "results.json")], "name the same results.json"),
        "nothing shared": ([str(a), str(lone)], "no compressed config appears in every run"),
        "output is a file": ([str(a), str(b), "--output_path", str(tmp_path / "afile")], "is a file; give a folder"),
    }


@pytest.mark.parametrize("case", ["missing", "not json", "not ours", "failed baseline", "predict only", "tasks differ",
                                  "twice", "nothing shared", "output is a file"])
def test_bad_inputs_exit_2_with_one_line(case, tmp_path, two_models, capsys):
    argv, message = bad(tmp_path, two_models)[case]
    assert compare.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("compare: error: ")
    assert message in captured.err


# --------------------------------------------------------------------------- a real run of two models


def samples(folder: Path, config: str) -> list[dict]:
    safe = config.replace("/", "_").replace("=", "-").replace(",", "_")
    return [json.loads(line) for line in (folder / f"samples_{safe}_synthvqa.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not all((CHECKPOINTS / a / "model.safetensors").is_file() for a in ("qwen2_vl", "llava_onevision")),
                    reason="the trained reference checkpoints are not there")
def test_real_runs_of_the_two_reference_checkpoints(tmp_path, capsys):
    from evaluation import run as cli
    from evaluation.tasks.synthetic import write_local_dataset

    write_local_dataset("synthvqa", tmp_path / "data", n=6)
    config = "prune=fastv,prune_budget=0.25"
    relative = {}
    for arch in ("qwen2_vl", "llava_onevision"):
        out = tmp_path / arch
        cli.main(["--model_args", f"pretrained={CHECKPOINTS / arch},{config}", "--tasks", "synthvqa",
                  "--data_dir", str(tmp_path / "data"), "--gen_kwargs", "max_new_tokens=8", "--batch_size", "6",
                  "--output_path", str(out), "--log_samples", "--verbosity", "ERROR", "--device", "cpu"])
        base, comp = samples(out, "baseline"), samples(out, config)
        # expected from the per-sample log: exact-match counts, loyalty per sample, mean latencies
        expected_op = sum(s["scores"]["exact_match"] for s in comp) / sum(s["scores"]["exact_match"] for s in base)
        expected_ol = sum(s["loyalty"]["exact_match"] for s in comp) / len(comp)
        mean_latency = [sum(s["stats"]["latency_s"] for s in log) / len(log) for log in (base, comp)]
        expected_oe = mean_latency[0] / mean_latency[1]
        (run,) = [r for r in json.loads((out / "results.json").read_text())["runs"] if r["name"] == config]
        assert run["summary"]["OP"] == pytest.approx(expected_op)
        assert run["summary"]["OL"] == pytest.approx(expected_ol)
        assert run["summary"]["OE"] == pytest.approx(expected_oe)
        assert f"| {config} | {run['summary']['OP']:.3f} | {expected_ol:.3f} |" in (out / "results.md").read_text()
        relative[arch] = expected_op
    capsys.readouterr()
    assert compare.main([str(tmp_path / "qwen2_vl"), str(tmp_path / "llava_onevision")]) == 0
    printed = capsys.readouterr().out
    # one task per model: the population spread of two values is half their distance
    og = abs(relative["qwen2_vl"] - relative["llava_onevision"]) / 2
    op = (relative["qwen2_vl"] + relative["llava_onevision"]) / 2
    assert f"| {config} | {op:.3f} | {og:.3f} |" in printed
