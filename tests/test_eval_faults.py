"""Faults a long evaluation meets: the CLI killed with SIGKILL at seeded points of a sweep and rerun, two
processes sharing one response cache at once, an output folder that becomes unwritable mid-run.

The CLI's `main` runs in forked processes (the imports are paid once, by the test process), each killed
for real with SIGKILL at a chosen event: after the k-th answer committed to the cache, at the start of
the k-th generation, halfway through the k-th output file (its temporary half written, not renamed), or
from outside after a seeded delay.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import run as cli  # noqa: E402
from evaluation.cache import ResponseCache  # noqa: E402
from evaluation.runner import ModelRunner  # noqa: E402
from test_eval_run import Counting  # noqa: E402  (the real runner, counting generated samples per config)

LIMIT = 4
SWEEP = ["kv=streamingllm,snapkv", "kv_budget=0.5"]
CONFIGS = 3  # the baseline and the two of SWEEP
FORK = multiprocessing.get_context("fork")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from vlmcompress.testing import save_tiny_model

    return str(save_tiny_model("qwen2_vl", tmp_path_factory.mktemp("eval_faults") / "model"))


def argv(model, out, cache) -> list[str]:
    return ["--model_args", f"pretrained={model}", "--tasks", "synthvqa", "--limit", str(LIMIT), "--sweep", *SWEEP,
            "--gen_kwargs", "max_new_tokens=3", "--device", "cpu", "--verbosity", "ERROR", "--log_samples",
            "--output_path", str(out), "--use_cache", str(cache)]


@pytest.fixture(scope="module")
def uninterrupted(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    cli.main(argv(model, root / "out", root / "cache"))
    return root / "out"


# --------------------------------------------------------------------------- killing the CLI


def cache_rows(cache: Path) -> tuple[str, int]:
    """(SQLite's integrity verdict, answers held) of a --use_cache folder; ("absent", 0) before the table exists."""
    if not (cache / "responses.sqlite").exists():
        return "absent", 0
    conn = sqlite3.connect(cache / "responses.sqlite")
    try:
        verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        return verdict, conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:  # created, the table not yet
        return "absent", 0
    finally:
        conn.close()


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kind: str, k: int) -> None:
    """In the child: SIGKILL this process at the k-th event of `kind`."""
    seen = Counter()

    def reached() -> bool:
        seen[kind] += 1
        return seen[kind] == k

    if kind == "answer":
        put = ResponseCache.put

        def put_then_die(self, *args, **kwargs):
            put(self, *args, **kwargs)
            if reached():
                _kill_self()

        ResponseCache.put = put_then_die
    elif kind == "generate":
        generate = ModelRunner.generate

        def die_while_generating(self, samples, gen_kwargs):
            if reached():
                _kill_self()
            return generate(self, samples, gen_kwargs)

        ModelRunner.generate = die_while_generating
    elif kind == "write":
        replace = os.replace

        def die_halfway(src, dst, *args, **kwargs):
            if Path(src).name.endswith(".tmp") and reached():
                os.truncate(src, os.path.getsize(src) // 2)  # the temporary file half written, never renamed
                _kill_self()
            return replace(src, dst, *args, **kwargs)

        os.replace = die_halfway


def _child(args: list[str], kill: tuple[str, int] | None) -> None:
    if kill is not None:
        _arm(*kill)
    cli.main(args)


def run_cli(args, kill=None, kill_when=None) -> int:
    """The CLI in a forked process; its exit code (-SIGKILL when killed). `kill_when()` true: killed from outside."""
    process = FORK.Process(target=_child, args=(args, kill))
    process.start()
    while kill_when is not None and process.is_alive():
        if kill_when():
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.join(300)
    assert process.exitcode is not None, "the CLI hung"
    return process.exitcode


def assert_outputs_whole(out: Path) -> None:
    """Every output file in place is complete (a half-written one would not parse)."""
    for path in out.iterdir() if out.is_dir() else []:
        if path.name.startswith("."):  # a killed writer's temporary file, never in place
            assert path.name.endswith(".tmp")
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            assert {"runs", "config"} <= set(json.loads(data))
        elif path.suffix == ".jsonl":
            assert len([json.loads(line) for line in data.decode().splitlines()]) == LIMIT
        elif path.suffix == ".md":
            assert data.startswith(b"| config |") and data.endswith(b"\n")
        elif path.suffix == ".png":
            assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
        else:
            raise AssertionError(f"unexpected output {path.name}")


def outcome(out: Path) -> tuple[list, dict]:
    """What must not depend on interruptions: per config, the scores; per samples file, the predictions."""
    doc = json.loads((out / "results.json").read_text())
    scores = [(r["name"], {task: {k: t.get(k) for k in ("metrics", "accuracy", "loyalty", "agreement", "n_scored",
                                                       "failures")} for task, t in r["tasks"].items()})
              for r in doc["runs"]]
    predictions = {p.name: [(s["doc_id"], s["prediction"]) for s in map(json.loads, p.read_text().splitlines())]
                   for p in sorted(out.glob("samples_*.jsonl"))}
    return scores, predictions


def test_sigkill_at_seeded_points_then_rerun_gives_the_uninterrupted_results(model, uninterrupted, tmp_path):
    rng = random.Random(17)
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = argv(model, out, cache)
    # first from outside, once the cache holds a random number of answers (the answer being written then is
    # wherever it is), then at random events; k <= 2 so that every kill fires before the 3 x 4 samples are
    # done (a kill costs at most one config's samples)
    answers = rng.randint(1, 3)
    assert run_cli(args, kill_when=lambda: cache_rows(cache)[1] >= answers) == -signal.SIGKILL
    assert_outputs_whole(out)
    for kind in rng.sample(["answer", "generate", "write"], 3):
        assert run_cli(args, kill=(kind, rng.randint(1, 2))) == -signal.SIGKILL, kind
        assert_outputs_whole(out)
    assert run_cli(args) == 0
    assert_outputs_whole(out)
    assert not list(out.glob(".*"))  # the killed writers' temporary files are gone
    assert outcome(out) == outcome(uninterrupted)


# --------------------------------------------------------------------------- one cache, two processes


def test_two_clis_on_one_cache_at_once_lose_nothing(model, uninterrupted, tmp_path):
    cache = tmp_path / "cache"
    processes = [FORK.Process(target=_child, args=(argv(model, tmp_path / f"out{i}", cache), None)) for i in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(300)
    assert [p.exitcode for p in processes] == [0, 0]
    assert cache_rows(cache) == ("ok", CONFIGS * LIMIT)
    assert outcome(tmp_path / "out0") == outcome(tmp_path / "out1") == outcome(uninterrupted)
    Counting.calls.clear()
    cli.main(argv(model, tmp_path / "again", cache), runner_factory=Counting)
    assert sum(Counting.calls.values()) == 0  # every answer either process generated is in the cache


def _write_answers(directory: str, writer: int, n: int, start) -> None:
    start.wait()
    cache = ResponseCache(directory)
    for i in range(n):
        cache.put(f"{writer}-{i}", "task", i, {"writer": writer}, f"answer {writer}.{i}", {"i": i})
        assert cache.get(f"{writer}-{i}")[0] == f"answer {writer}.{i}"
    cache.close()


def test_response_cache_under_concurrent_writers(tmp_path):
    """Six processes open one new cache at the same instant and commit answers one by one; repeated on fresh
    folders, since the race on creating the file (SQLite refuses the switch to WAL at once) is not won every time."""
    writers, answers = 6, 10
    for attempt in range(12):
        folder = tmp_path / f"attempt{attempt}"
        start = FORK.Event()
        processes = [FORK.Process(target=_write_answers, args=(str(folder), w, answers, start)) for w in range(writers)]
        for p in processes:
            p.start()
        start.set()
        for p in processes:
            p.join(120)
        assert [p.exitcode for p in processes] == [0] * writers, f"attempt {attempt}"
        cache = ResponseCache(folder)
        assert all(cache.get(f"{w}-{i}")[0] == f"answer {w}.{i}" for w in range(writers) for i in range(answers))
        assert len(cache) == writers * answers
        cache.close()


# --------------------------------------------------------------------------- the output folder goes away


class ReplacesTheOutputFolder(Counting):
    """Loading the second config, replaces the output folder by a file (as root, chmod would not stop a write)."""

    out: Path | None = None

    def __init__(self, base, compression, device=None):
        if compression and self.out.is_dir():
            shutil.rmtree(self.out)
            self.out.write_text("not a folder")
        super().__init__(base, compression, device)


def test_an_output_folder_that_becomes_unwritable_stops_with_one_line_and_the_rerun_resumes(
        model, uninterrupted, tmp_path, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache"
    monkeypatch.setattr(ReplacesTheOutputFolder, "out", out)
    Counting.calls.clear()
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv(model, out, cache), runner_factory=ReplacesTheOutputFolder)
    message = str(stopped.value.code)
    assert message.startswith(f"error: cannot write the results to {out}: a file is in its place; ")
    assert "\n" not in message
    assert f"response cache {cache}" in message and "rerun the same command to resume" in message
    # it stopped at the checkpoint after the second config: the third never ran; both are in the cache, intact
    assert set(Counting.calls) == {"baseline", "kv=streamingllm,kv_budget=0.5"}
    assert cache_rows(cache) == ("ok", 2 * LIMIT)
    out.unlink()
    Counting.calls.clear()
    cli.main(argv(model, out, cache), runner_factory=Counting)
    assert dict(Counting.calls) == {"kv=snapkv,kv_budget=0.5": LIMIT}  # only what was missing
    assert outcome(out) == outcome(uninterrupted)
