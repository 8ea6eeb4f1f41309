"""The evaluation CLI's contract for bad input: each bad argument is one line naming the fix and exit 2, before
any model is loaded; a run that did not evaluate every requested (task, config) pair exits 1 with a counting line."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import run as cli  # noqa: E402
from evaluation import validation  # noqa: E402
from evaluation.cache import ResponseCache  # noqa: E402
from evaluation.runner import build_configs, parse_kv_list, parse_sweep  # noqa: E402
from evaluation.tasks.synthetic import write_local_dataset  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_checks import in_a_scratch_folder, no_model, rejected  # noqa: E402, F401 - fixtures

REPO = Path(__file__).resolve().parent.parent
N = 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from vlmcompress.testing import save_tiny_model

    root = tmp_path_factory.mktemp("cli_validation")
    model = save_tiny_model("qwen2_vl", root / "model")
    write_local_dataset("docvqa_val", root / "data", n=N)
    llama = root / "llama"  # a checkpoint folder of a text-only model
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {"model": str(model), "data": str(root / "data"), "llama": str(llama), "root": root}


def argv(env, *extra, model_args="", tasks="docvqa_val"):
    return ["--model_args", f"pretrained={env['model']}{',' + model_args if model_args else ''}", "--tasks", tasks,
            "--data_dir", env["data"], "--gen_kwargs", "max_new_tokens=2", "--device", "cpu",
            "--verbosity", "ERROR", *extra]




BAD_ARGUMENTS = [
    # (extra argv, extra model_args, what the message must say)
    (["--limit", "0"], "", "--limit: must be -1 (every sample), a fraction in (0, 1) or an integer >= 1, got 0"),
    (["--limit", "-3"], "", "--limit: must be -1 (every sample), a fraction in (0, 1) or an integer >= 1, got -3"),
    (["--batch_size", "0"], "", "--batch_size/-b: must be an integer >= 1, auto or auto:N, got '0'"),
    (["--model", "wrongmodel"], "", "invalid choice: 'wrongmodel' (choose from 'auto', 'llava_onevision'"),
    (["--model", "internvl"], "", "--model internvl does not match the checkpoint's model_type 'qwen2_vl': use --model qwen2_vl"),
    (["--sweep", "kv"], "", "--sweep items are key=v1,v2,...; got 'kv'"),
    (["--sweep", "kv="], "", "--sweep 'kv=' has an empty key or no value"),
    (["--sweep", "kv=h2o", "kv=snapkv"], "", "--sweep gives kv twice: list all its values in one kv=v1,v2"),
    (["--sweep", "kv_budget=0.1,0.2"], "", "--sweep config kv_budget=0.1: kv_budget=0.1 was given without kv=..."),
    (["--sweep", "dtype=float16,bfloat16"], "", "--sweep dtype: only compression settings are swept"),
    (["--sweep", "kv=snapkv", "kv_budget=0.5,2.5"], "", "--sweep config kv=snapkv,kv_budget=2.5: kv_budget=2.5 is out of range"),
    ([], "foo=1", "--model_args: unknown option foo=1: no method is chosen to take it"),
    ([], "kv=h2o,window_size=8", "--model_args: unknown option window_size=8 for the chosen methods (kv=h2o)"),
    ([], "kv=snapkv,kernel_size=4", "--model_args: kernel_size must be an odd int >= 1, got 4"),
    ([], "kv=snapkv,merge=pivo", "--model_args: unknown KV-merge method 'pivo'; choose one of ['average', 'pivotal', "
                                 "'weighted']"),
    ([], "kv=snapkv,kv_budget=0", "--model_args: kv_budget=0 keeps no token"),
    ([], "prune=no_such_pruner,prune_budget=0.5", "no_such_pruner"),
    ([], "kv=snapkv,kv=h2o", "--model_args: kv is given twice"),
    ([], "dtype=float99", "--model_args dtype='float99' is not a torch dtype"),
    (["--gen_kwargs", "max_new_tokens"], "", "--gen_kwargs: expected key=value, got 'max_new_tokens'"),
    (["--gen_kwargs", "max_new_tokens=-1"], "", "`max_new_tokens` must be greater than 0"),
    (["--gen_kwargs", "do_sample=true,temperature=-1"], "", "`temperature` (=-1) has to be a strictly positive float"),
    (["--gen_kwargs", "do_sample=true,top_k=-3"], "", "`top_k` has to be a strictly positive integer"),
    (["--gen_kwargs", "max_new_tokns=4"], "", "are not used by the model: ['max_new_tokns']"),
    (["--gen_kwargs", "num_beams=0"], "", "--gen_kwargs 'num_beams=0': ZeroDivisionError"),
    (["--device", "banana"], "", "--device 'banana' is not a device: use cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("extra,model_args,message", BAD_ARGUMENTS, ids=[" ".join(c[0]) + c[1] for c in BAD_ARGUMENTS])
def test_bad_arguments_exit_2_with_one_line_before_any_model_loads(env, capsys, no_model, extra, model_args, message):
    assert message in rejected(argv(env, *extra, model_args=model_args), capsys, no_model)


def test_bad_checkpoints(env, capsys, no_model, tmp_path):
    def error(pretrained, *extra):
        args = argv(env, *extra)
        args[1] = f"pretrained={pretrained}"
        return rejected(args, capsys, no_model)

    assert "pretrained=/no/such/model: no such folder (and not a Hub id like org/name): check the path" in error(
        "/no/such/model")
    assert f"pretrained={env['data']} has no config.json: pass a checkpoint folder" in error(env["data"])
    assert f"pretrained={env['llama']} is a 'llama' model (config.json); vlmcompress evaluates llava_onevision" in error(
        env["llama"])


def test_a_hub_checkpoint_offline_and_not_cached_is_named(env, capsys, no_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = argv(env)
    args[1] = "pretrained=someone/not-cached-vlm"
    message = rejected(args, capsys, no_model)
    assert "pretrained=someone/not-cached-vlm: no such folder, and not in the Hub cache" in message
    assert "HF_HUB_OFFLINE is set" in message


def test_unknown_task_lists_close_matches(env, capsys, no_model):
    message = rejected(argv(env, tasks="docvqa_val,chartqaa"), capsys, no_model)
    assert "--tasks: unknown task 'chartqaa'; did you mean chartqa?" in message


def test_output_path_that_is_a_file(env, capsys, no_model, tmp_path):
    file = tmp_path / "results.json"
    file.write_text("{}")
    for path in (file, file / "sub"):
        message = rejected(argv(env, "--output_path", str(path)), capsys, no_model)
        assert f"--output_path {path}: {file} is a file, not a folder" in message
    assert file.read_text() == "{}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_output_path_that_is_not_writable(env, capsys, no_model, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    message = rejected(argv(env, "--output_path", str(locked / "out")), capsys, no_model)
    assert f"{locked} is not writable" in message


def test_use_cache_that_is_not_a_cache_folder_is_named_and_left_alone(env, capsys, no_model, tmp_path):
    real = tmp_path / "real"
    cache = ResponseCache(real)
    cache.put("k", "t", 0, {}, "answer", {})
    cache.close()
    database = real / "responses.sqlite"
    message = rejected(argv(env, "--use_cache", str(database)), capsys, no_model)
    assert f"--use_cache {database} is a SQLite database, not a folder" in message
    assert f"(here --use_cache {real})" in message

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "responses.sqlite").write_bytes(b"not a database at all" * 100)
    message = rejected(argv(env, "--use_cache", str(corrupt)), capsys, no_model)
    assert "responses.sqlite is not a SQLite database (corrupt or another file)" in message

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "responses.sqlite").write_bytes(database.read_bytes()[:100] + b"\xff" * 8000)
    assert "is a damaged SQLite database" in rejected(argv(env, "--use_cache", str(damaged)), capsys, no_model)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    connection = sqlite3.connect(foreign / "responses.sqlite")
    connection.execute("CREATE TABLE invoices (id INTEGER)")
    connection.commit()
    connection.close()
    message = rejected(argv(env, "--use_cache", str(foreign)), capsys, no_model)
    assert "is a SQLite database of another program (tables ['invoices']), not a response cache" in message

    for folder in (corrupt, damaged, foreign):  # never overwritten, never joined by a journal
        assert sorted(p.name for p in folder.iterdir()) == ["responses.sqlite"]
    assert (corrupt / "responses.sqlite").read_bytes() == b"not a database at all" * 100
    reopened = ResponseCache(real)  # the real cache, refused as a file, is intact
    assert reopened.get("k") == ("answer", {})
    reopened.close()


def test_a_cache_another_run_is_creating_is_accepted(tmp_path):
    """ResponseCache writes the database's header (WAL mode) before its table: a second run starting at that
    moment sees a SQLite database without tables, which is a cache being created, not another program's."""
    connection = sqlite3.connect(tmp_path / "responses.sqlite", isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.close()
    assert (tmp_path / "responses.sqlite").stat().st_size > 0 and not (tmp_path / "responses.sqlite-wal").exists()
    validation.check_cache_folder(str(tmp_path))
    cache = ResponseCache(tmp_path)
    cache.put("k", "task", 0, {}, "answer", {})
    assert cache.get("k") == ("answer", {})
    cache.close()


def test_missing_local_data(env, capsys, no_model, tmp_path):
    message = rejected(argv(env, tasks="docvqa_val,chartqa"), capsys, no_model)
    assert f"--data_dir {env['data']} has no copy of chartqa: expected {Path(env['data']) / 'chartqa'}" in message
    args = argv(env)
    args[args.index("--data_dir") + 1] = str(tmp_path / "absent")
    assert f"--data_dir {tmp_path / 'absent'} is not a folder" in rejected(args, capsys, no_model)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_hub_dataset_while_offline_fails_within_seconds(env, capsys, no_model, monkeypatch, tmp_path, how):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a closed local port: the connection is refused at once
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    args = argv(env, tasks="chartqa")
    data = args.index("--data_dir")
    del args[data:data + 2]
    started = time.perf_counter()
    message = rejected(args, capsys, no_model)
    assert time.perf_counter() - started < 30  # the checks, not a download's retries (a loaded CI machine)
    assert "task chartqa reads lmms-lab-encoder/ChartQA from the Hub, which is out of reach" in message
    assert "--data_dir DIR with a copy at DIR/chartqa" in message and "HF_HUB_OFFLINE" in message
    # a cached copy is enough, also of the older lmms-lab mirror
    (tmp_path / "hf" / "hub" / "datasets--lmms-lab--ChartQA").mkdir(parents=True)
    validation.check_data(validation.check_tasks("chartqa"), None, validation.HubAccess())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu(env, capsys, no_model):
    message = rejected(argv(env, "--device", "cuda"), capsys, no_model)
    assert "--device cuda: this machine cannot use it" in message and "use --device cpu" in message


def test_the_compression_check_leaves_no_hook_behind(env):
    hooks = dict(torch.nn.modules.module._global_forward_pre_hooks)
    validation.check_configs(parse_kv_list(f"pretrained={env['model']}"), ["kv=snapkv,h2o,vlcache", "kv_budget=0.5"])
    assert dict(torch.nn.modules.module._global_forward_pre_hooks) == hooks


def test_sweep_parsing_keeps_every_value():
    combos = parse_sweep(["kv=snapkv,pyramidkv", "kv_budget=0.1,0.4"])
    assert len(combos) == 4 and {"kv": "pyramidkv", "kv_budget": 0.4} in combos
    assert build_configs({"pretrained": "p"}, combos)[0] == {}


def test_the_command_line_process_exits_2_with_one_line_and_no_traceback(env):
    done = subprocess.run([sys.executable, str(REPO / "evaluation" / "run.py"), *argv(env, "--limit", "0")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "run.py: error: argument --limit: must be -1 (every sample), a fraction in (0, 1) or an integer >= 1, got 0"
    assert "Traceback" not in done.stderr and not done.stdout


# --------------------------------------------------------------------------- exit status after a run


class Echo:
    """A runner without a model: answers every sample with its first reference answer."""

    model_type = "qwen2_vl"

    def __init__(self, base, compression, device=None):
        self.compression = compression

    def generate(self, samples, gen_kwargs):
        return [(s["answers"][0], {"latency_s": 0.01}) for s in samples]

    def close(self):
        pass


class FailsOnDoc1(Echo):
    def generate(self, samples, gen_kwargs):
        if any(s["doc_id"] == 1 for s in samples):
            raise RuntimeError("boom on doc 1")
        return super().generate(samples, gen_kwargs)


class CompressedFailsToLoad(Echo):
    def __init__(self, base, compression, device=None):
        if compression:
            raise RuntimeError("out of memory while loading")
        super().__init__(base, compression, device)


def status(args, runner_factory, capsys) -> tuple[int, str]:
    code = cli.cli(args, runner_factory=runner_factory)
    return code, capsys.readouterr().out.strip().splitlines()[-1]


def test_a_complete_run_exits_0(env, capsys):
    code, last = status(argv(env), Echo, capsys)
    assert (code, last) == (0, f"{N} samples of 1 (task, config) pairs, none failed")


def test_failed_samples_exit_1_and_are_counted(env, capsys, tmp_path):
    code, last = status(argv(env, "--output_path", str(tmp_path), "--sweep", "kv=snapkv,h2o"), FailsOnDoc1, capsys)
    assert code == 1
    assert last == f"3 of {3 * N} samples failed in 3 (task, config) pairs; see {tmp_path / 'results.json'} and the log above"


def test_predict_only_counts_predictions(env, capsys):
    assert status(argv(env, "--predict_only"), Echo, capsys) == (0, f"{N} predictions of 1 (task, config) pairs, none failed")
    code, last = status(argv(env, "--predict_only"), FailsOnDoc1, capsys)
    assert (code, last) == (1, f"1 of {N} predictions failed in 1 (task, config) pair; see results/results.json and the log above")


def test_a_config_that_fails_to_load_exits_1(env, capsys):
    code, last = status(argv(env, model_args="kv=snapkv,kv_budget=0.5"), CompressedFailsToLoad, capsys)
    assert (code, last) == (1, "1 of 2 (task, config) pairs produced no scored sample; see results/results.json and the log above")


def test_an_empty_dataset_exits_1_and_says_it_is_empty(env, capsys, tmp_path):
    import datasets

    datasets.load_from_disk(str(Path(env["data"]) / "docvqa_val")).select([]).save_to_disk(str(tmp_path / "docvqa_val"))
    args = argv(env)
    args[args.index("--data_dir") + 1] = str(tmp_path)
    code, last = status(args, Echo, capsys)
    assert (code, last) == (1, "1 of 1 (task, config) pairs produced no scored sample; see results/results.json and the log above")


def test_a_share_below_one_token_fails_each_sample_and_exits_1(env, capsys):
    """kv_budget=0.001 passes the up-front checks (it is a valid share) and raises per prompt, where its length is known."""
    code, last = status(argv(env, model_args="kv=streamingllm,kv_budget=0.001"), None, capsys)
    assert (code, last) == (1, f"{N} of {2 * N} samples failed in 1 (task, config) pair; "
                               "1 of 2 (task, config) pairs produced no scored sample; see results/results.json and the log above")
