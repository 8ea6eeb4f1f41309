"""The GPU benchmark script runs end to end at toy size on the CPU (correctness of the script, not timings)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench  # noqa: E402
from vlmcompress.quantization import QuantizedLinear, quantize  # noqa: E402


def test_benchmark_script_runs_at_toy_size(tiny_dirs, tmp_path):
    rows = bench.main([
        "--toy", tiny_dirs["qwen2_vl"], "--models", "toy", "--methods", "none,snapkv,pyramidkv,unknownmethod",
        "--budgets", "0.25", "--new-tokens", "4", "--repeats", "1", "--option", "window_size=4",
        "--out", str(tmp_path),
    ])
    by_method = {row["method"]: row for row in rows}
    assert set(by_method) == {"none", "snapkv", "pyramidkv", "unknownmethod"}
    assert "error" in by_method["unknownmethod"]  # one bad configuration is reported, the rest still run
    for name in ("none", "snapkv", "pyramidkv"):
        row = by_method[name]
        assert row["prefill_s"] > 0 and row["ttft_s"] > 0 and row["decode_tok_s"] > 0
    prompt = by_method["none"]["prompt_tokens"]
    assert by_method["snapkv"]["kv_bytes"] * prompt == by_method["none"]["kv_bytes"] * round(0.25 * prompt)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["command"].startswith("python bench/bench.py") and saved["machine"]["device"]
    assert len(saved["rows"]) == 4


def test_benchmark_rounds_alternate_the_order_and_report_medians(tiny_dirs, tmp_path, capsys):
    rows = bench.main([
        "--toy", tiny_dirs["qwen2_vl"], "--models", "toy", "--methods", "none,snapkv,unknownmethod",
        "--budgets", "0.25", "--new-tokens", "3", "--repeats", "1", "--option", "window_size=4", "--rounds", "3",
        "--out", str(tmp_path),
    ])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    order = [[p["method"] for p in printed if p["round"] == r] for r in range(3)]
    assert order == [["none", "snapkv", "unknownmethod"], ["snapkv", "none"], ["none", "snapkv"]]
    by_method = {row["method"]: row for row in rows}
    assert "error" in by_method["unknownmethod"] and "rounds" not in by_method["unknownmethod"]
    for method in ("none", "snapkv"):
        measured = [p for p in printed if p["method"] == method]
        row = by_method[method]
        assert row["rounds"] == 3
        assert row["ttft_s"] == sorted(p["ttft_s"] for p in measured)[1]
        assert row["prefill_s"] == sorted(p["prefill_s"] for p in measured)[1]
    assert by_method["snapkv"]["overhead_s"] == by_method["snapkv"]["prefill_s"] - by_method["none"]["prefill_s"]
    assert json.loads((tmp_path / "bench.json").read_text())["rows"] == json.loads(json.dumps(rows))
    with pytest.raises(SystemExit):
        bench.main(["--toy", tiny_dirs["qwen2_vl"], "--rounds", "0", "--out", str(tmp_path)])


def test_benchmark_options_are_typed_as_the_evaluation_cli_types_them(tiny_dirs, tmp_path):
    """`--option head_adaptive=true merge=pivotal` reach the method as a bool and a name (a row per new
    method option, as the benchmark tables have them)."""
    rows = bench.main(["--toy", tiny_dirs["qwen2_vl"], "--models", "toy", "--methods", "snapkv,lookm",
                       "--budgets", "0.25", "--new-tokens", "3", "--repeats", "1", "--option", "window_size=4",
                       "--option", "head_adaptive=true", "--option", "merge=pivotal", "--out", str(tmp_path)])
    assert [row.get("error") for row in rows] == [None, None] and all(row["decode_tok_s"] > 0 for row in rows)
    with pytest.raises(SystemExit):
        bench.main(["--toy", tiny_dirs["qwen2_vl"], "--option", "head_adaptive", "--out", str(tmp_path)])


def test_benchmark_measures_eager_and_static_decoding(tiny_dirs, tmp_path):
    rows = bench.main([
        "--toy", tiny_dirs["qwen2_vl"], "--models", "toy", "--methods", "none,snapkv,h2o", "--budgets", "0.25",
        "--new-tokens", "4", "--repeats", "1", "--option", "window_size=4", "--decode", "eager,graphs,jit",
        "--out", str(tmp_path),
    ])
    by_row = {(row["method"], row["decode"]): row for row in rows}
    assert len(rows) == 9
    for method in ("none", "snapkv", "h2o"):
        eager, graphs = by_row[method, "eager"], by_row[method, "graphs"]
        assert graphs["decode_tok_s"] > 0 and graphs["kv_bytes"] == eager["kv_bytes"]
        assert "unknown --decode 'jit'" in by_row[method, "jit"]["error"]  # refused, the other rows still run


def test_benchmark_profile_reports_operators_per_token(tiny_dirs, tmp_path):
    rows = bench.main([
        "--toy", tiny_dirs["qwen2_vl"], "--models", "toy", "--methods", "none,snapkv", "--budgets", "0.25",
        "--new-tokens", "4", "--repeats", "1", "--option", "window_size=4", "--profile", "5", "--out", str(tmp_path),
    ])
    for row in rows:
        top = row["profile"]["top"]
        assert len(top) == 5 and all(op["calls_per_token"] > 0 for op in top)
        assert [op["self_us_per_token"] for op in top] == sorted((op["self_us_per_token"] for op in top), reverse=True)
        assert any(op["name"].startswith("aten::") for op in top)


def test_report_reads_every_bench_run_and_skips_other_result_files(tmp_path, capsys):
    import report

    row = {"model": "m", "input": "hires", "batch": 8, "method": "none", "budget": None, "prompt_tokens": 10,
           "prefill_s": 1.0, "ttft_s": 1.1, "decode_tok_s": 100.0, "kv_bytes": 2**20}
    one = {"command": "python bench/bench.py", "machine": {}, "rows": [row]}
    files = {"one.json": one, "two.json": {"note": "two calls", "runs": [one, dict(one, rows=[dict(row, batch=1)])]},
             "sparse.json": {"meta": {}, "rows": [{"part": "mlp", "speedup": 1.2}]}, "multi.json": {"command": "x"}}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    runs = report.load(sorted(str(tmp_path / name) for name in files))
    assert [name for name, _ in runs] == ["one.json", "two.json", "two.json"]
    assert capsys.readouterr().err.count("not a bench.py result") == 2
    assert report.table(runs).count("| m | hires |") == 3


def test_report_plot_draws_both_decoding_paths_against_their_own_baseline(tmp_path):
    import report

    def row(method, decode, budget, tok_s, kv, peak):
        return {"model": "qwen2_vl_7b", "input": "hires", "batch": 8, "method": method, "budget": budget,
                "decode": decode, "decode_tok_s": tok_s, "kv_bytes": kv, "peak_gb": peak}

    rows = [row("none", "eager", None, 400.0, 1000, 20.0), row("snapkv", "eager", 0.1, 420.0, 100, 19.0),
            row("none", "graphs", None, 700.0, 1000, 20.1), row("snapkv", "graphs", 0.1, 840.0, 100, None)]
    target = tmp_path / "plot.png"
    report.plot([("run.json", {"command": "x", "rows": rows})], str(target))
    assert target.read_bytes().startswith(b"\x89PNG")
    assert [report.baseline_of(rows, r)["decode_tok_s"] for r in rows[1::2]] == [400.0, 700.0]


def test_multi_gpu_script_runs_at_toy_size_with_two_cpu_ranks(tmp_path):
    import multi_gpu

    report = multi_gpu.main(["--toy", "--out", str(tmp_path), "--limit", "2", "--new-tokens", "3"])
    dp = report["data_parallel"]
    # two accelerate ranks on the CPU give every prediction and metric of one process
    assert dp["processes"] == 2 and dp["ok"]
    assert all(t["samples"] == 4 and t["same_predictions"] for t in dp["tasks"].values())  # baseline + snapkv
    split = report["split_model"]
    assert split["same_tokens"] and len(split["runs"]["device_map_auto"]["tokens"]) >= 1
    assert split["runs"]["one_device"]["kv_bytes"] == split["runs"]["device_map_auto"]["kv_bytes"] > 0
    assert json.loads((tmp_path / "multi_gpu.json").read_text())["command"].startswith("python bench/multi_gpu.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs instead of refusing")
@pytest.mark.parametrize("script", ["decode_attention", "decode_step", "quant", "quant_kernels", "scoring", "workload"])
def test_cuda_timers_need_a_gpu_and_say_so(script):
    module = __import__(script)

    with pytest.raises(SystemExit, match=f"{script}.py times CUDA kernels: it needs a GPU"):
        module.main([])


@pytest.mark.parametrize("script, argv, message", [
    ("decode_attention", ["--tune", "--shapes", "qwen2_7b_b8_full,qwen3"], "unknown --shapes qwen3: choose from"),
    ("decode_step", ["--rounds", "0"], "--rounds 0: at least 1")])
def test_bad_bench_options_stop_before_any_gpu_work(script, argv, message):
    with pytest.raises(SystemExit, match=message):
        __import__(script).main(argv)


def test_workload_benchmark_runs_at_toy_size(tiny_dirs, tmp_path):
    """Every kind of path (transformers' two, an uncompressed and compressed vlmcompress model, pruning) through
    the whole script on the CPU; the ratios are computed against the rows of the same batch."""
    import workload

    out = tmp_path / "workload.json"
    paths = ["transformers", "transformers-static", "none", "snapkv", "lookm", "visionzip"]
    rows = workload.main(["--toy", tiny_dirs["qwen2_vl"], "--model", "toy", "--batches", "1,2", "--prompts", "2",
                          "--new-tokens", "3", "--budget", "0.5", "--paths", ",".join(paths), "--out", str(out)])
    assert [(r["batch"], r["path"]) for r in rows] == [(b, p) for b in (1, 2) for p in paths]
    for row in rows:
        assert len(row["generate_s_each"]) == 2 and row["ttft_s"] > 0 and row["decode_tok_s"] > 0
        eager = next(r for r in rows if r["batch"] == row["batch"] and r["path"] == "transformers")
        assert row["speedup_vs_transformers"] == eager["generate_s"] / row["generate_s"]
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python bench/workload.py --toy") and saved["rows"] == rows


def test_workload_rounds_time_every_path_in_both_orders(tiny_dirs, monkeypatch):
    """`--rounds 2`: the paths once in order and once reversed, each row over both rounds' prompts."""
    import workload

    order, generator = [], workload.generator
    monkeypatch.setattr(workload, "generator", lambda path, *args: order.append(path) or generator(path, *args))
    rows = workload.main(["--toy", tiny_dirs["qwen2_vl"], "--model", "toy", "--batches", "1", "--prompts", "2",
                          "--new-tokens", "3", "--paths", "transformers,none,snapkv", "--rounds", "2"])
    assert order == ["transformers", "none", "snapkv", "snapkv", "none", "transformers"]
    assert [r["path"] for r in rows] == ["transformers", "none", "snapkv"]
    assert all(len(r["generate_s_each"]) == 4 for r in rows)
    with pytest.raises(SystemExit):
        workload.main(["--toy", tiny_dirs["qwen2_vl"], "--rounds", "0"])


def test_quantization_benchmark_runs_at_toy_size(tiny_dirs, tmp_path):
    import quant

    out = tmp_path / "quant.json"
    rows = quant.main(["--toy", tiny_dirs["qwen2_vl"], "--model", "toy", "--batches", "1,2", "--group-size", "32",
                       "--paths", "eager,graphs+snapkv,unknownmethod", "--new-tokens", "3", "--repeats", "1",
                       "--budget", "0.5", "--targets", "language_model,language_model+lm_head", "--out", str(out)])
    assert len(rows) == 3 * 2 * 3
    by_key = {(r["weights"], r["batch"], r["path"]): r for r in rows}
    with_head = by_key["w4-rtn-g32-language_model+lm_head", 1, "eager"]
    assert with_head["decode_tok_s"] > 0 and with_head["linear_gb"] < by_key["w4-rtn-g32", 1, "eager"]["linear_gb"]
    assert "unknown KV-cache method 'unknownmethod'" in by_key["w4-rtn-g32", 1, "unknownmethod"]["error"]
    for batch in (1, 2):
        for path in ("eager", "graphs+snapkv"):
            bf16, w4 = by_key["bf16", batch, path], by_key["w4-rtn-g32", batch, path]
            assert w4["decode_tok_s"] > 0 and w4["speedup"] == w4["decode_tok_s"] / bf16["decode_tok_s"]
            assert w4["linear_gb"] < 0.3 * bf16["linear_gb"]  # the toy is float32: packed is under 1/4 + scales
    saved = json.loads(out.read_text())
    assert saved["command"].startswith("python bench/quant.py --toy") and len(saved["rows"]) == 18


def test_a_run_cut_off_keeps_the_rows_it_measured(tiny_dirs, tmp_path, monkeypatch):
    """The scripts save their result file after every row: a run stopped by its time limit (here: the second
    row's timing raises) leaves the first row on disk."""
    import quant
    import workload

    for script, argv in ((workload, ["--paths", "none,snapkv", "--prompts", "2"]),
                         (quant, ["--paths", "eager,graphs", "--repeats", "1", "--group-size", "32"])):
        calls, figures = [], script.answer_figures

        def cut_off(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return figures(*args, **kwargs)

        monkeypatch.setattr(script, "answer_figures", cut_off)
        out = tmp_path / f"{script.__name__}.json"
        with pytest.raises(KeyboardInterrupt):
            script.main(["--toy", tiny_dirs["qwen2_vl"], "--model", "toy", "--batches", "1", "--new-tokens", "3",
                         *argv, "--out", str(out)])
        saved = json.loads(out.read_text())
        assert len(saved["rows"]) == 1 and saved["rows"][0]["decode_tok_s"] > 0 and saved["machine"]


@pytest.mark.parametrize("head", ["bf16", "tied", "quantized"])
def test_roofline_floor_counts_the_weights_a_step_reads(tiny_dirs, head):
    """The decoder layers (parameters and buffers: a quantized layer's codes are buffers), the final norm and
    `lm_head` once each; of the input embedding table only what `lm_head` shares (a step reads just its
    tokens' rows)."""
    model, processor = bench.build_model("toy", torch.device("cpu"), tiny_dirs["qwen2_vl"])
    tied = head == "tied"
    if tied:
        model.lm_head.weight = model.get_input_embeddings().weight
    else:
        quantize(model, processor, "rtn", 4, 32, progress=False,
                 targets=("language_model", "lm_head") if head == "quantized" else ("language_model",))
    embedding = model.get_input_embeddings().weight
    language_model = model.model.language_model
    layers = sum(t.numel() * t.element_size() for name, t in [*language_model.named_parameters(),
                                                               *language_model.named_buffers()]
                 if not name.startswith("embed_tokens"))
    assert tied or any(name.endswith("qweight") for name, _ in language_model.named_buffers())
    lm_head = sum(t.numel() * t.element_size() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()])
    assert (head == "quantized") == isinstance(model.lm_head, QuantizedLinear)
    if head != "quantized":
        assert (model.lm_head.weight is embedding) == tied
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
    floor = bench.decode_floor(model, {"kv_bytes": 1000, "batch": 2}, new_tokens=4, bandwidth=1.0)
    assert floor == layers + lm_head + 1000 + kv_per_token * 2 * 4 / 2
