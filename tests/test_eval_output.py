"""What a run leaves for a person: `--tasks synthvqa` runs as listed, results in ./results with the
umask's modes and their path printed, one progress bar, library bars silenced."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from evaluation import report  # noqa: E402
from evaluation import run as cli  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from vlmcompress.testing import save_tiny_model

    return str(save_tiny_model("qwen2_vl", tmp_path_factory.mktemp("eval_output") / "model"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_plain_run_draws_synthvqa_writes_results_with_the_umask_and_shows_one_bar(model, tmp_path):
    """As a user types it, from a fresh folder: no --data_dir, no --output_path, umask 027."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "evaluation" / "run.py"), "--model_args", f"pretrained={model}",
         "--tasks", "synthvqa", "--limit", "2", "--sweep", "kv=snapkv", "kv_budget=0.5", "--log_samples",
         "--gen_kwargs", "max_new_tokens=4", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o027),
        env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = tmp_path / "results"
    *_, where, tally = completed.stdout.rstrip().splitlines()
    assert where.startswith(f"results: {results} (results.json, results.md")
    assert tally == "4 samples of 2 (task, config) pairs, none failed"
    doc = json.loads((results / "results.json").read_text())
    assert [r["tasks"]["synthvqa"]["n_scored"] for r in doc["runs"]] == [2, 2]  # drawn by the task's builder
    files = sorted(p.name for p in results.iterdir())
    assert files == ["pareto.png", "results.json", "results.md", "samples_baseline_synthvqa.jsonl",
                     "samples_kv-snapkv_kv_budget-0.5_synthvqa.jsonl"]
    assert {p.name: mode(p) for p in results.iterdir()} == dict.fromkeys(files, 0o640)
    ids = [json.loads(line)["id"] for line in (results / files[3]).read_text().splitlines()]
    assert ids == ["test-000000", "test-000001"]  # the split's first questions
    # one bar for the whole run, 2 configs x 2 samples, with its ETA; no per-load or per-config bars
    assert "Loading weights" not in completed.stderr
    bars = re.findall(r"(\d+)/(\d+) \[[0-9:]+<([0-9:?]+)", completed.stderr)
    assert bars and {total for _, total, _ in bars} == {"4"} and ("4", "4") in {(n, t) for n, t, _ in bars}


def test_synthvqa_is_drawn_when_the_data_dir_has_no_copy_and_read_when_it_has(model, tmp_path):
    from evaluation.reference.synthvqa import build_split

    args = ["--model_args", f"pretrained={model}", "--tasks", "synthvqa", "--limit", "3", "--gen_kwargs",
            "max_new_tokens=2", "--device", "cpu", "--verbosity", "ERROR", "--log_samples"]
    empty = tmp_path / "data"
    empty.mkdir()
    drawn = cli.main(args + ["--data_dir", str(empty), "--output_path", str(tmp_path / "a")])
    assert [r["id"] for r in drawn[0]["records"]["synthvqa"]] == ["test-000000", "test-000001", "test-000002"]
    # a copy under --data_dir is what is read: here one that starts further into the split
    build_split("test", 3, start=10).save_to_disk(str(empty / "synthvqa"))
    read = cli.main(args + ["--data_dir", str(empty), "--output_path", str(tmp_path / "b")])
    assert [r["id"] for r in read[0]["records"]["synthvqa"]] == ["test-000010", "test-000011", "test-000012"]


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = report.atomic_write(tmp_path / "a.json", "{}")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(previous)
    assert mode(written) == mode(tmp_path / "plain") == 0o666 & ~umask
    assert written.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "plain"]


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".results.json.{dead.stdout.strip()}.k2j_x9.tmp"
    live = tmp_path / f".results.md.{os.getpid()}.abc123.tmp"
    stale.write_text('{"half')
    live.write_text("| half")
    report.remove_stale_temporaries(tmp_path)
    assert not stale.exists() and live.exists()


def test_the_default_run_writes_to_results_in_the_working_folder(tmp_path, monkeypatch):
    import evaluation.default as default
    from vlmcompress.testing import save_tiny_model

    save_tiny_model("qwen2_vl", tmp_path / "checkpoints" / "qwen2_vl")
    monkeypatch.setattr(default, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.delenv("VLMCOMPRESS_EVAL_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    d = default.prepare(echo=False)
    assert d["output_path"] == "results" and Path(d["cache_dir"]).parent == Path("results") / "cache"
    assert d["data_dir"] is None and d["limit"] == default.DEFAULT["reference"]["samples_per_task"]  # drawn
    assert "output:  results " in d["header"]


def test_verbosity_warning_shows_no_bar(model, tmp_path, capsys):
    cli.main(["--model_args", f"pretrained={model}", "--tasks", "synthvqa", "--limit", "1", "--gen_kwargs",
              "max_new_tokens=1", "--device", "cpu", "--verbosity", "WARNING", "--output_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert "1/1" not in err and "Loading weights" not in err
