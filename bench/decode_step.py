"""Where a statically decoded step's time goes (`cuda_graphs=True`), on one model and cache.

    python bench/decode_step.py --model qwen2_vl_7b --methods none,snapkv --budget 0.1 --batch 8

For each method, stop-check mode (`--stop-check`: `sync`, transformers' default of reading the finished flag on
the host every step; `deferred`, vlmcompress's reading of it one step late) and `--compile` mode (`on`: the step's
norms, rotary embedding and MLP gates compiled by inductor, `vlmcompress.compilation`; `off`: all eager) and
`--fuse` mode (`on`: q/k/v and gate/up as one matrix product each, `step_kernels.FusedProducts`; `off`: one
product per Linear) and `--split-kv` mode (`on`: the decoding attention through `vlmcompress/decoding/split_kv.py`;
`off`: SDPA), with the language model's weights as `--weights` says (`bf16`, as built; `w4`: round-to-nearest
4-bit in groups of 128, `vlmcompress.quantization`, on `--w4-kernel`'s CUDA kernel), it runs `generate` and
reports
per decoding step, medians in milliseconds:
  step_ms         wall time of a decoding step of `generate` (all tokens but the first; median over `--rounds`)
  replay_ms       the captured language-model graph replayed back to back, device time (CUDA events)
  outside_ms      device time from the end of one replay to the start of the next one's inputs: what
                  `generate` runs outside the graph (embedding, `lm_head`, logits processing) plus idle
  host_outside_ms host time from our step's return to the next step's call (includes waiting for the
                  device where the loop synchronises)
  period_ms       host time from one step's call to the next one's: the pace of the steps themselves
  fixed_ms        what a `generate` of `--new-tokens` tokens costs beyond a one-token `generate` and its
                  steps at that pace (loading the prompt into static buffers, the first step, the cache
                  handed back at the end), in total; step_ms ≈ period_ms + fixed_ms / (new tokens - 1)
  floor_ms        (LLM weights + mean KV read) / HBM bandwidth, as in bench.py
CUDA only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]


from bench import (announce_cuda_run, build_model, decode_floor, hbm_bandwidth, parse_method, save_rows,  # noqa: E402
                   timed)
from real_models import make_inputs  # noqa: E402
from vlmcompress import DecodingOptions  # noqa: E402
from vlmcompress.decoding.static import StaticDecoding  # noqa: E402
from vlmcompress.config import accepted_options, build_settings  # noqa: E402
from vlmcompress.quantization import QuantizedLinear, quantize  # noqa: E402


class StepRecorder:
    """Wraps `StaticDecoding.decode_step` to time each step, and keeps the last graph for replays."""

    def __init__(self):
        self.decode_step, self.close = StaticDecoding.decode_step, StaticDecoding.close
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host: list[tuple[float, float]] = []
        self.kept: dict | None = None
        recorder = self

        def decode_step(static, kwargs):
            enter, leave = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            recorder.host.append((time.perf_counter(), 0.0))
            enter.record()
            output = recorder.decode_step(static, kwargs)
            leave.record()
            recorder.events.append((enter, leave))
            recorder.host[-1] = (recorder.host[-1][0], time.perf_counter())
            return output

        def close(static):
            # the graph replays buffers the cache and the step's inputs own: keep them alive with it (a one-token
            # generate decodes no step and binds no workspace)
            if static.workspace is not None:
                recorder.kept = {"graph": static.workspace.graph, "workspace": static.workspace, "cache": static.cache}
            recorder.close(static)

        StaticDecoding.decode_step, StaticDecoding.close = decode_step, close

    def reset(self):
        self.events, self.host = [], []

    def split(self) -> dict:
        torch.cuda.synchronize()
        steps = self.events[1:]  # the first step runs eagerly and captures
        outside = [a[1].elapsed_time(b[0]) for a, b in zip(steps, steps[1:])]
        inside = [enter.elapsed_time(leave) for enter, leave in steps]
        host_outside = [(b[0] - a[1]) * 1e3 for a, b in zip(self.host[1:], self.host[2:])]
        host_inside = [(leave - enter) * 1e3 for enter, leave in self.host[1:]]
        period = [(b[0] - a[0]) * 1e3 for a, b in zip(self.host[1:], self.host[2:])]
        return {"inside_ms": statistics.median(inside), "outside_ms": statistics.median(outside),
                "host_outside_ms": statistics.median(host_outside), "host_inside_ms": statistics.median(host_inside),
                "period_ms": statistics.median(period)}

    def replay(self, replays: int = 50) -> dict:
        """The kept graph replayed back to back: milliseconds per replay, and its kernels by kind."""
        graph = self.kept["graph"]
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        profiled = 10
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled):
                graph.replay()
            torch.cuda.synchronize()
        self.kept = None
        kinds: dict[str, list] = {}
        others = []
        for event in prof.key_averages():
            if event.device_time_total <= 0 or event.key.startswith(("aten::", "cuda")):
                continue
            kind = kernel_kind(event.key)
            count, micros = kinds.get(kind, (0, 0.0))
            kinds[kind] = (count + event.count / profiled, micros + event.device_time_total / profiled)
            if kind == "other":
                others.append((event.count / profiled, event.device_time_total / profiled, event.key[:120]))
        return {"replay_ms": start.elapsed_time(end) / replays,
                "kernels": {k: {"per_step": round(c, 1), "ms": round(us / 1e3, 3)} for k, (c, us) in kinds.items()},
                "top_other": [{"per_step": round(c, 1), "ms": round(us / 1e3, 3), "kernel": name}
                              for c, us, name in sorted(others, key=lambda o: -o[0])[:15]]}


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    # cuBLAS's products, tinygemm's int4 ones, and vlmcompress's W4 triton kernels (`quantization.kernels`)
    if any(tag in lowered for tag in ("nvjet", "gemm", "cutlass", "gemv", "splitk", "tinygemm", "product_one_row",
                                      "product_few_rows")):
        return "matmul"
    if any(tag in lowered for tag in ("sdpa", "attention", "fmha", "flash")):
        return "attention"
    return "other"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_vl_7b")
    parser.add_argument("--methods", default="none,snapkv", help="comma-separated KV methods; none keeps every token")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--stop-check", default="deferred")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--fuse", default="on")
    parser.add_argument("--split-kv", default="on")
    parser.add_argument("--weights", default="bf16", choices=["bf16", "w4"])
    parser.add_argument("--w4-kernel", default="triton", choices=["triton", "tinygemm"],
                        help="QuantizedLinear.cuda_kernel of --weights w4")
    parser.add_argument("--rounds", type=int, default=3, help="generates timed per row (median of the rounds)")
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: at least 1")
    command, machine = announce_cuda_run("decode_step.py", argv)
    device = torch.device("cuda")
    bandwidth = hbm_bandwidth(device)
    model, processor = build_model(args.model, device, None)
    if args.weights == "w4":
        quantize(model, processor, "rtn", 4, 128, progress=False)
        QuantizedLinear.cuda_kernel = args.w4_kernel
    inputs = make_inputs(processor, "hires", args.batch).to(device)
    recorder = StepRecorder()
    rows = []
    for spec, stop_check, compiled, fused, split in itertools.product(
            args.methods.split(","), args.stop_check.split(","), args.compile.split(","), args.fuse.split(","),
            args.split_kv.split(",")):
        if stop_check not in ("sync", "deferred") or not {compiled, fused, split} <= {"off", "on"}:
            raise SystemExit(f"unknown --stop-check {stop_check!r}, --compile {compiled!r}, --fuse {fused!r} or "
                             f"--split-kv {split!r}: choose sync or deferred, off or on")
        method = parse_method(spec)
        budget = args.budget if method["kv"] else None
        options = {"window_size": 32} if "window_size" in accepted_options(method["kv"], None) else {}
        decoding = DecodingOptions(compile=compiled == "on", split_kv=split == "on", fuse_products=fused == "on",
                                   defer_stop_check=stop_check == "deferred")
        model.compression = build_settings(kv=method["kv"], kv_budget=budget, cuda_graphs=True, decoding=decoding,
                                           **options)

        def generate(tokens):
            return model.generate(**inputs, do_sample=False, min_new_tokens=tokens, max_new_tokens=tokens)

        generate(args.new_tokens)  # warm-up
        # each round a one-token generate and a full one back to back: the median of their differences (the
        # 1.2 s prefill of a batch-8 prompt varies by more than a step's share of the difference)
        differences = []
        for _ in range(args.rounds):
            first, _ = timed(lambda: generate(1), device)
            recorder.reset()  # the last round's steps are the ones split below
            total, _ = timed(lambda: generate(args.new_tokens), device)
            differences.append(total - first)
        difference = statistics.median(differences)
        row = {"model": args.model, "weights": args.weights,
               "w4_kernel": args.w4_kernel if args.weights == "w4" else None, "method": spec, "budget": budget,
               "batch": args.batch,
               "stop_check": stop_check, "compile": compiled, "fuse": fused, "split_kv": split,
               "step_ms": difference / (args.new_tokens - 1) * 1e3, "rounds": args.rounds,
               **recorder.split(), **recorder.replay()}
        row["fixed_ms"] = difference * 1e3 - (args.new_tokens - 1) * row["period_ms"]
        row["kv_bytes"] = model.compression_stats["kv_bytes"]
        floor = decode_floor(model, row, args.new_tokens, bandwidth)
        row["floor_ms"] = floor * 1e3 if floor else None
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_rows(args.out, command, machine, rows)
    return rows


if __name__ == "__main__":
    main()
