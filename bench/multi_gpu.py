"""Several GPUs: data-parallel evaluation equals one process, and one model split over the GPUs.

    python bench/multi_gpu.py --out results/multi_gpu            # a machine with >= 2 GPUs
    python bench/multi_gpu.py --toy --out /tmp/multi_gpu         # CPU: the same steps at toy size

1. Data parallel. `evaluation/run.py` on one checkpoint (`--checkpoint`, default a tiny random-weight
   Qwen2-VL) and local task copies, with a KV method, run once in one process and once under
   `accelerate launch --num_processes N`. Every prediction and every metric must be the same.
2. One model over the GPUs. Qwen2-VL-7B's configuration (bench/real_models.py, random bf16 weights) is
   saved once, then loaded twice with `vlmcompress.load(..., kv="snapkv", kv_budget=0.1)`: on one GPU,
   and with `device_map="auto"` over all of them. The greedy tokens of one high-resolution prompt must
   be the same; the report gives the decoder layers and the peak memory of each GPU.

Writes OUT/multi_gpu.json and prints a summary with the command and the machine. With --toy the split
step runs the tiny model on the CPU (`device_map="auto"` then places everything there): a check of
the script, not of several devices.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import vlmcompress  # noqa: E402
from vlmcompress.models import MODEL_CLASSES  # noqa: E402

TASKS = "synthvqa,mme,ai2d"


def data_parallel(checkpoint: str, out: Path, processes: int, limit: int, toy: bool) -> dict:
    """Run the evaluation CLI in one process and data-parallel; compare predictions and metrics."""
    from evaluation.tasks.synthetic import write_local_dataset

    data = out / "data"
    for task in TASKS.split(","):
        write_local_dataset(task, data, n=limit)
    common = ["evaluation/run.py", "--model_args", f"pretrained={checkpoint},kv=snapkv,kv_budget=0.5,window_size=4",
              "--tasks", TASKS, "--data_dir", str(data), "--batch_size", "4", "--gen_kwargs", "max_new_tokens=8",
              "--log_samples", "--verbosity", "WARNING"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--cpu"] if toy else ["--multi_gpu"]
    runs = {"single": [sys.executable, *common], f"{processes}_processes": [*launch, *common]}
    results, seconds = {}, {}
    for name, cmd in runs.items():
        t0 = time.time()
        subprocess.run([*cmd, "--output_path", str(out / name)], cwd=ROOT, check=True)
        seconds[name] = round(time.time() - t0, 1)
        results[name] = json.loads((out / name / "results.json").read_text())
    single, multi = (results[name] for name in runs)
    agree = {}
    for task in TASKS.split(","):
        a = _predictions(out / "single", task)
        b = _predictions(out / f"{processes}_processes", task)
        metrics = _metrics(multi, task)
        agree[task] = {"samples": len(a), "same_predictions": a == b,
                       "same_metrics": _metrics(single, task) == metrics, "metrics": metrics}
    return {"processes": processes, "wall_seconds": seconds, "tasks": agree,
            "ok": all(t["same_predictions"] and t["same_metrics"] for t in agree.values())}


def _predictions(folder: Path, task: str) -> dict:
    rows = {}
    for path in folder.rglob(f"*{task}*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            rows[(path.name, r["doc_id"])] = r["prediction"]
    return rows


def _metrics(results: dict, task: str) -> list:
    return [run["tasks"][task]["metrics"] for run in results["runs"]]


def split_model(out: Path, toy: bool, new_tokens: int) -> dict:
    """The same compressed generation on one device and spread over all GPUs with device_map="auto"."""
    from transformers import AutoProcessor

    from real_models import build, make_inputs

    path = out / "model"
    if toy:
        from vlmcompress.testing import save_tiny_model

        save_tiny_model("qwen2_vl", path)
        processor = AutoProcessor.from_pretrained(path)
        devices, dtype = ["cpu"], torch.float32
    else:
        model_type, config, processor = build("qwen2_vl_7b")
        if not (path / "config.json").exists():  # random weights, saved once (~16 GB)
            with torch.device("cuda:0"):
                model = MODEL_CLASSES[model_type]._from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(path)
            processor.save_pretrained(path)
            del model
            torch.cuda.empty_cache()
        devices, dtype = [f"cuda:{i}" for i in range(torch.cuda.device_count())], torch.bfloat16
    inputs = make_inputs(processor, "hires", 1, hires=1344 if not toy else 64)
    runs = {}
    for name, placement in (("one_device", {"device_map": devices[0]}), ("device_map_auto", {"device_map": "auto"})):
        for d in devices:
            if d.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(d)
        model = vlmcompress.load(str(path), kv="snapkv", kv_budget=0.1, dtype=dtype, **placement)
        first = next(model.parameters()).device
        t0 = time.time()
        with torch.no_grad():
            tokens = model.generate(**inputs.to(first), max_new_tokens=new_tokens, do_sample=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.time() - t0  # one cold call: a sanity figure, not a benchmark
        layers = Counter(str(next(layer.parameters()).device) for layer in model.model.language_model.layers)
        runs[name] = {
            "tokens": tokens[0, inputs["input_ids"].shape[1]:].tolist(), "generate_seconds": round(seconds, 2),
            "decoder_layers_per_device": dict(layers),
            "peak_gib_per_device": {d: round(torch.cuda.max_memory_allocated(d) / 2**30, 2)
                                    for d in devices if d.startswith("cuda")},
            "kv_bytes": model.compression_stats.get("kv_bytes"),
        }
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "runs": runs,
            "same_tokens": runs["one_device"]["tokens"] == runs["device_map_auto"]["tokens"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--toy", action="store_true", help="CPU, toy sizes: checks the script, not several devices")
    p.add_argument("--checkpoint", default=None, help="model for the data-parallel step (default: a tiny one)")
    p.add_argument("--processes", type=int, default=None, help="data-parallel processes (default: the GPUs, or 2)")
    p.add_argument("--limit", type=int, default=20, help="samples per task in the data-parallel step")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--skip", choices=["data_parallel", "split"], default=None)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.toy and torch.cuda.device_count() < 2:
        raise SystemExit(f"{torch.cuda.device_count()} GPU(s) here: this needs 2 or more (or --toy on the CPU)")
    processes = args.processes or (2 if args.toy else torch.cuda.device_count())
    report = {
        "command": " ".join(["python bench/multi_gpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__},
    }
    checkpoint = args.checkpoint
    if checkpoint is None:
        from vlmcompress.testing import save_tiny_model

        checkpoint = str(save_tiny_model("qwen2_vl", out / "tiny"))
    if args.skip != "data_parallel":
        report["data_parallel"] = data_parallel(checkpoint, out / "data_parallel", processes, args.limit, args.toy)
    if args.skip != "split":
        report["split_model"] = split_model(out / "split", args.toy, args.new_tokens)
    (out / "multi_gpu.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
