"""Speed and memory of every method at real model sizes, in one process.

    python bench/bench.py --models qwen2_vl_7b --methods none,snapkv,pyramidkv --budgets 0.1 \
        --inputs hires --batch 8 --new-tokens 128 --out results/bench

For each (model, input, batch, method, budget) it measures, with CUDA synchronisation and
warm-up excluded, medians over `--repeats`:
  prefill_s      the prompt forward (vision encoder, projector, LLM prefill, compression)
  ttft_s         `generate(max_new_tokens=1)`
  decode_tok_s   generated tokens per second over the decode steps (batch x steps / time)
  peak_gb        peak allocated GPU memory during generate
  kv_bytes       KV-cache bytes held right after prefill
  overhead       prefill time minus the uncompressed prefill time on the same input
and the decode roofline: (LLM weight bytes + mean KV bytes read per step) / HBM bandwidth,
the bandwidth measured in the same run with a large device-to-device copy.
`--decode eager,graphs` measures each row both with transformers' eager decoding and with static
decoding from a CUDA graph (`load(..., cuda_graphs=True)`; `none` then keeps every token in a `FullCache`).
`--option key=value` passes a method option to every method that takes it, typed as `--model_args` values are
(`--option merge=pivotal`, `--option head_adaptive=true`: the model is then built with the attention that
decodes per-head lengths, as `load` picks it). `--rounds R` measures the whole list R times, every other round
in reverse order, and reports each figure's median over the rounds: at batch 1 a method's place in the order
moves its prefill by as much as the method adds (docs/benchmarks.md). `--toy` runs the same code on the tiny CPU
checkpoints of `vlmcompress.testing`.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import transformers  # noqa: E402

import vlmcompress  # noqa: E402
from vlmcompress.decoding import split_kv  # noqa: E402
from vlmcompress.compilation import compile_by_default  # noqa: E402
from vlmcompress.config import accepted_options, build_settings  # noqa: E402
from vlmcompress.loading import default_attn_implementation  # noqa: E402
from vlmcompress.models import MODEL_CLASSES  # noqa: E402
from evaluation.runner import parse_value  # noqa: E402
from real_models import make_inputs  # noqa: E402


DECODE_PATHS = ("eager", "graphs")


TOY_IMAGE_SIDE = 64  # pixels of a `--toy` run's images


def reproducing_command(script: str, argv) -> str:
    return f"python bench/{script} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def machine_record(device: torch.device) -> dict:
    """What a result file says of the machine: the device's name and the library versions."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def save_rows(path: str | None, command: str, machine: dict, rows: list, **more) -> None:
    """Write a run's result file (its command, machine and rows so far, and `more`): the scripts call it after
    every row, so a run cut off by its time limit keeps what it measured."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"command": command, "machine": machine, "rows": rows, **more}, indent=1))


def announce_cuda_run(script: str, argv) -> tuple[str, dict]:
    """For a bench script that times CUDA kernels: refuse without a GPU; else print and return the command
    that reproduces the run and the machine it runs on."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} times CUDA kernels: it needs a GPU")
    command, machine = reproducing_command(script, argv), machine_record(torch.device("cuda"))
    print(f"# {command}\n# {json.dumps(machine)}", flush=True)
    return command, machine


def announce_run(script: str, argv, toy: str | None) -> tuple[torch.device, str, dict]:
    """The device, reproducing command and machine of a bench script that takes `--toy DIR`: on the CPU at toy
    size (a smoke test of the script; its timings mean nothing), else `announce_cuda_run`'s."""
    if not toy:
        return torch.device("cuda"), *announce_cuda_run(script, argv)
    cpu = torch.device("cpu")
    return cpu, reproducing_command(script, argv), machine_record(cpu)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def round_order(items: list, round_index: int) -> list:
    """`items` as given in even rounds and reversed in odd ones, so that none is always measured first or after
    the same other (at batch 1 an item's place in the order moves its times by as much as some methods add)."""
    return items[::1 if round_index % 2 == 0 else -1]


def timed_answers(generate, prompts: list, new_tokens: int, device) -> list[tuple[float, float]]:
    """Per prompt, `generate(prompt, new_tokens)` and `generate(prompt, 1)` timed back to back: their difference
    is the prompt's decoding time."""
    return [(timed(functools.partial(generate, prompt, new_tokens), device)[0],
             timed(functools.partial(generate, prompt, 1), device)[0]) for prompt in prompts]


def answer_figures(pairs: list[tuple[float, float]], batch: int, new_tokens: int) -> dict:
    """From `timed_answers`' pairs: `generate_s` and `ttft_s`, medians over the prompts, and `decode_tok_s`,
    batch x (new tokens - 1) over the median of each prompt's difference (drift between a prompt's two times
    cancels, as it does not between two medians)."""
    decoding = statistics.median(call - ttft for call, ttft in pairs)
    return {"generate_s": statistics.median(call for call, _ in pairs),
            "ttft_s": statistics.median(ttft for _, ttft in pairs),
            "decode_tok_s": batch * (new_tokens - 1) / max(decoding, 1e-9)}


def hbm_bandwidth(device) -> float | None:
    """Bytes/s of a 4 GiB device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 31, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        seconds, _ = timed(functools.partial(dst.copy_, src), device)
        times.append(seconds)
    del src, dst
    return 2 * (1 << 32) / statistics.median(times)


def parse_method(spec: str) -> dict:
    """`snapkv`, `visionzip`, `visionzip+snapkv`, `none` -> load() keyword arguments (without budgets)."""
    from vlmcompress.cache import KV_METHODS

    kv = prune = None
    parts = spec.replace("prumerge+", "prumerge_plus").split("+")
    for part in parts:
        if part == "none":
            continue
        if part in KV_METHODS:
            kv = part
        else:
            prune = part
    return {"kv": kv, "prune": prune}


def build_model(name: str, device, toy_dir: str | None, attn: str | None = None):
    """attn: an `attn_implementation`; None for `vlmcompress.load`'s default."""
    if toy_dir:
        from transformers import AutoProcessor

        model = vlmcompress.load(toy_dir, dtype=torch.float32, attn_implementation=attn)
        return model, AutoProcessor.from_pretrained(toy_dir)
    from real_models import build

    model_type, config, processor = build(name)
    with torch.device(device):
        model = MODEL_CLASSES[model_type]._from_config(
            config, dtype=torch.bfloat16, attn_implementation=attn or default_attn_implementation()
        )
    return model.eval(), processor


def profile_generate(generate, device, top: int, new_tokens: int) -> dict:
    """One more `generate` under torch.profiler: kernel launches and the `top` operators by self time
    (device time on CUDA, CPU time otherwise), each per generated token (prefill included)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        generate()
        synchronize(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    return {
        "kernel_launches_per_token": launches / new_tokens,
        "top": [{"name": e.key[:120], "calls_per_token": e.count / new_tokens,
                 "self_us_per_token": getattr(e, attr) / new_tokens} for e in ranked],
    }


def run_one(model, inputs, method: dict, budget, options: dict, new_tokens: int, repeats: int, device,
            profile_top: int = 0, cuda_graphs: bool = False) -> dict:
    kv_budget = budget if method["kv"] else None
    prune_budget = (0.25 if method["kv"] else budget) if method["prune"] else None
    options = {k: v for k, v in options.items() if k in accepted_options(method["kv"], method["prune"])}
    model.compression = build_settings(kv=method["kv"], kv_budget=kv_budget, prune=method["prune"],
                                       prune_budget=prune_budget, cuda_graphs=cuda_graphs, **options)
    generate = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)

    def prefill():
        with torch.no_grad():
            return model(**inputs, past_key_values=model.make_cache(), use_cache=True, logits_to_keep=1)

    def first_token():
        return model.generate(**inputs, do_sample=False, max_new_tokens=1)

    def full():
        return model.generate(**inputs, **generate)

    prefill(), first_token(), full()  # warm-up
    prefills, ttfts, totals, peaks = [], [], [], []
    for _ in range(repeats):
        prefills.append(timed(prefill, device)[0])
        ttfts.append(timed(first_token, device)[0])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        totals.append(timed(full, device)[0])
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device))
    profile = profile_generate(full, device, profile_top, new_tokens) if profile_top else None
    stats = model.compression_stats
    batch = inputs["input_ids"].shape[0]
    ttft, total = statistics.median(ttfts), statistics.median(totals)
    decode_seconds = max(total - ttft, 1e-9)
    return {
        "prompt_tokens": stats.get("prompt_tokens"),
        "visual_tokens": stats.get("visual_tokens"),
        "kv_bytes": stats.get("kv_bytes"),
        "prefill_s": statistics.median(prefills),
        "ttft_s": ttft,
        "decode_tok_s": batch * (new_tokens - 1) / decode_seconds,
        "decode_step_s": decode_seconds / (new_tokens - 1),
        "peak_gb": statistics.median(peaks) / 2**30 if peaks else None,
        **({"profile": profile} if profile else {}),
    }


def decode_floor(model, row: dict, new_tokens: int, bandwidth: float | None) -> float | None:
    """Seconds per decode step that moving the LLM weights and the KV read once would take. The weights are
    the language model's and `lm_head`'s parameters and buffers (a quantized layer's codes, scales and zeros are
    buffers); of the input embedding table a step reads only its tokens' rows, so the table counts only where
    `lm_head` shares it."""
    if not bandwidth or row.get("kv_bytes") is None:
        return None
    embedding = model.get_input_embeddings().weight
    language_model = model.model.language_model
    weights = {id(t): t for module in (language_model, model.lm_head)
               for t in [*module.parameters(), *module.buffers()] if t is not embedding}
    if getattr(model.lm_head, "weight", None) is embedding:
        weights[id(embedding)] = embedding
    weight_bytes = sum(p.numel() * p.element_size() for p in weights.values())
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2  # bf16 K and V
    batch = row["batch"]
    mean_kv = row["kv_bytes"] + per_token * batch * new_tokens / 2  # KV grows by one token a step
    return (weight_bytes + mean_kv) / bandwidth


def rows_of(model, configurations: list[dict], measured: list[list[dict]], errors: dict, new_tokens: int,
            bandwidth: float | None) -> list[dict]:
    """One row per configuration measured so far: each figure the median over its rounds, the prefill overhead
    against the first `none` configuration's, and the decode step against the roofline floor."""
    rows = []
    for index, (config, rounds) in enumerate(zip(configurations, measured)):
        if index in errors:
            rows.append({**config, "error": errors[index]})
        elif rounds:
            row = {**config, **rounds[0], "rounds": len(rounds)}
            for key, value in rounds[0].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = statistics.median(r[key] for r in rounds)
            rows.append(row)
    baseline = next((row["prefill_s"] for row in rows if row["method"] == "none" and "error" not in row), None)
    for row in rows:
        if "error" not in row:
            row["overhead_s"] = row["prefill_s"] - baseline if baseline else None
            floor = decode_floor(model, row, new_tokens, bandwidth)
            row["roofline_ratio"] = row["decode_step_s"] / floor if floor else None
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="qwen2_vl_7b")
    parser.add_argument("--methods", default="none,streamingllm,h2o,snapkv,pyramidkv,vlcache",
                        help="comma-separated; `a+b` combines a pruning and a KV method; `name@0.25` sets its budget")
    parser.add_argument("--budgets", default="0.01,0.1,0.4")
    parser.add_argument("--inputs", default="hires")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every configuration this many times, every other round in reverse order; "
                             "each figure is the median over the rounds")
    parser.add_argument("--hires", type=int, default=1344, help="side of the high-resolution image, pixels")
    parser.add_argument("--option", action="append", default=[], help="method option, e.g. window_size=32")
    parser.add_argument("--out", default="results/bench")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="profile one more generate per row: kernel launches and the TOP operators, per token")
    parser.add_argument("--toy", default=None, help="a tiny checkpoint folder: run on the CPU at toy size")
    parser.add_argument("--decode", default="eager",
                        help="comma-separated decoding paths: eager (transformers' generate), graphs (cuda_graphs=True: "
                             "static decoding replayed from a CUDA graph)")
    parser.add_argument("--attn", default=None,
                        help="attn_implementation, e.g. sdpa (transformers' own); default: vlmcompress.load's")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.toy or not torch.cuda.is_available() else "cuda")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if any("=" not in option for option in args.option):
        parser.error(f"--option takes key=value, got {args.option}")
    # typed as the evaluation CLI types --model_args: 32 -> int, 0.5 -> float, true -> True
    options = {k.strip(): parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    # head-adaptive caches decode through the attention load() picks for them; it is chosen when the model is built
    attn = args.attn or default_attn_implementation(head_adaptive=options.get("head_adaptive") is True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {
        **machine_record(device), "vlmcompress": vlmcompress.__version__, "attn_implementation": attn,
        "compiled_kernels": compile_by_default(device),
        "split_kv_attention": device.type == "cuda" and split_kv.split_kv_works(device, torch.bfloat16),
    }
    bandwidth = hbm_bandwidth(device)
    machine["hbm_bandwidth_gb_s"] = bandwidth / 1e9 if bandwidth else None
    command = reproducing_command("bench.py", argv)
    print(f"# {command}\n# {json.dumps(machine)}", flush=True)
    rows = []

    def save(more_rows):
        save_rows(str(out / "bench.json"), command, machine, rows + more_rows)

    for name in args.models.split(","):
        model, processor = build_model(name, device, args.toy, attn)
        for kind in args.inputs.split(","):
            for batch in map(int, args.batch.split(",")):
                inputs = make_inputs(processor, kind, batch, args.hires if not args.toy else TOY_IMAGE_SIDE).to(device)
                configurations = []
                for spec in args.methods.split(","):
                    spec, _, own_budget = spec.partition("@")  # "method@budget" overrides --budgets
                    budget_list = own_budget or args.budgets
                    budgets = [None] if spec == "none" else [float(b) if "." in b else int(b) for b in budget_list.split(",")]
                    configurations += [{"model": name, "input": kind, "batch": batch, "method": spec, "budget": budget,
                                        "decode": decode}
                                       for budget, decode in itertools.product(budgets, args.decode.split(","))]
                measured = [[] for _ in configurations]  # each configuration's measurements, one a round
                errors, group_rows = {}, []
                for round_index in range(args.rounds):
                    # every other round in reverse, so that no method is always measured first or after another
                    order = round_order(list(range(len(configurations))), round_index)
                    for index in order:
                        if index in errors:
                            continue
                        config = configurations[index]
                        try:
                            if config["decode"] not in DECODE_PATHS:
                                raise ValueError(f"unknown --decode {config['decode']!r}; choose from {DECODE_PATHS}")
                            measured[index].append(run_one(
                                model, inputs, parse_method(config["method"]), config["budget"], options,
                                args.new_tokens, args.repeats, device, args.profile,
                                cuda_graphs=config["decode"] == "graphs"))
                        except Exception as error:  # one failing configuration must not lose the others
                            errors[index] = f"{type(error).__name__}: {error}"
                        print(json.dumps({**config, "round": round_index,
                                          **({"error": errors[index]} if index in errors else measured[index][-1])}),
                              flush=True)
                        group_rows = rows_of(model, configurations, measured, errors, args.new_tokens, bandwidth)
                        save(group_rows)
                rows += group_rows
                del inputs
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save([])
    return rows


if __name__ == "__main__":
    main()
