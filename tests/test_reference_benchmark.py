"""evaluation/reference_benchmark.py: the grid it runs, its Wilson intervals, and its table from evaluation/run.py's runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluation import reference_benchmark as bench  # noqa: E402
from evaluation import run as cli  # noqa: E402
from evaluation.runner import run_name  # noqa: E402
from evaluation.tasks.synthetic import write_local_dataset  # noqa: E402


def test_wilson_interval_matches_the_closed_form():
    # 5 of 10: centre 0.5, half-width z*sqrt(0.025 + z^2/400)/(1 + z^2/10) = 0.2634
    assert bench.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = bench.wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # never below 0, above 0 for 0 successes
    low, high = bench.wilson(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=1e-4)
    # narrower with more samples, and always containing the estimate
    assert bench.wilson(100, 200)[1] - bench.wilson(100, 200)[0] < bench.wilson(5, 10)[1] - bench.wilson(5, 10)[0]
    for k in range(0, 41, 5):
        low, high = bench.wilson(k, 40)
        assert low <= k / 40 <= high


def test_the_grid_has_every_method_at_every_budget():
    budgets = [0.01, 0.05, 0.1]
    rows = bench.configs(budgets)
    assert rows[0] == ("uncompressed", {})
    labels = [label for label, _ in rows[1:]]
    expected = list(bench.KV_METHODS) + [label for label, _ in bench.KV_VARIANTS] + list(bench.PRUNE_METHODS)
    assert sorted(set(labels)) == sorted(expected) and all(labels.count(m) == len(budgets) for m in expected)
    for label, config in rows[1:]:
        budget = config.get("kv_budget", config.get("prune_budget"))
        assert budget in budgets and ("kv" in config) != ("prune" in config)
    options = {label: c for label, c in rows if label.startswith("snapkv+")}
    assert options["snapkv+head_adaptive"]["head_adaptive"] is True and options["snapkv+merge=pivotal"]["merge"] == "pivotal"
    assert all(c["kv"] == "snapkv" and c["window_size"] == 16 for c in options.values())
    assert len({run_name(c) for _, c in rows}) == len(rows)  # no config runs twice


def test_table_marks_missing_and_failed_cells():
    results = {"a": {("uncompressed", None): {"accuracy": 1.0, "n_scored": 20},
                     ("snapkv", 0.1): {"accuracy": 0.5, "n_scored": 10},
                     ("snapkv", 0.2): {"error": "boom", "n_samples": 0}}}
    lines = bench.table(results, [0.1, 0.2]).splitlines()
    assert lines[0] == "| method | a @ 0.1 | a @ 0.2 |"
    assert lines[2].startswith("| uncompressed | 1.00 [0.84, 1.00] | 1.00 [0.84, 1.00]")
    assert lines[3] == "| snapkv | 0.50 [0.24, 0.76] | n/a |"


def test_run_main_runs_exactly_the_configs_given(tmp_path):
    """The benchmark hands its grid to evaluation/run.py's main, which runs those configs (baseline first)."""
    from vlmcompress.testing import save_tiny_model

    model = save_tiny_model("qwen2_vl", tmp_path / "model")
    write_local_dataset("docvqa_val", tmp_path / "data", n=2)
    configs = [{}, {"kv": "snapkv", "kv_budget": 0.5, "window_size": 4}, {"prune": "fastv", "prune_budget": 0.5}]
    runs = cli.main(["--model_args", f"pretrained={model}", "--tasks", "docvqa_val", "--data_dir",
                     str(tmp_path / "data"), "--gen_kwargs", "max_new_tokens=2", "--output_path", str(tmp_path / "o"),
                     "--verbosity", "ERROR", "--device", "cpu"], configs=configs)
    assert [r["compression"] for r in runs] == configs and runs[0]["baseline"]
    assert all(r["tasks"]["docvqa_val"]["n_scored"] == 2 for r in runs)
