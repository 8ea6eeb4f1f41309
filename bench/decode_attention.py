"""Time of one decoding step's attention, per SDPA backend, at the shapes static decoding gives.

    python bench/decode_attention.py --out bench/results/decode_attention.json

One query token per sample; its grouped-query heads viewed as `groups` rows per KV head (as
`vlmcompress_sdpa` does), an additive mask `[b, kv_heads, 1, slots]` (static decoding masks its unfilled
room), bf16. For each backend torch can run under that mask, for the plain matmul-softmax-matmul form,
and for vlmcompress's split-KV kernels (`vlmcompress/decoding/split_kv.py`, what `vlmcompress_sdpa` runs on CUDA), it
reports microseconds per layer call and the bandwidth of reading K and V once, from CUDA
events over many calls (median of 5 rounds).

    python bench/decode_attention.py --tune --shapes qwen2_7b_b8_full,qwen2_7b_b8_10pct --out results/tune.json

`--tune` times instead every candidate launch of the split-KV kernels (`split_kv.AttentionLaunch`: slots per
step, programs per multiprocessor, warps, stages) as a decoding step runs them: replayed from a CUDA graph,
over copies of K and V that together exceed the L2 cache (one per layer, as the layers' caches do).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import announce_cuda_run
from quant_kernels import copies_beyond_l2
from quant_kernels import time_us as graphed_time_us
from vlmcompress.decoding import split_kv

# (name, batch, kv_heads, groups, slots): Qwen2-7B at batch 8 and InternLM2.5-7B at batch 32, with a
# prompt of 2408 / 2664 tokens, uncompressed or at a 10 % budget, plus 128 / 64 slots of room.
SHAPES = [
    ("qwen2_7b_b8_full", 8, 4, 7, 2408 + 128),
    ("qwen2_7b_b8_10pct", 8, 4, 7, 241 + 128),
    ("qwen2_7b_b8_llava_onevision_full", 8, 4, 7, 7473 + 64),  # LLaVA-OneVision-7B's 7473-token prompt
    ("qwen2_7b_b8_llava_onevision_10pct", 8, 4, 7, 747 + 64),
    ("internlm2_7b_b32_full", 32, 8, 4, 2664 + 64),
    ("internlm2_7b_b32_10pct", 32, 8, 4, 266 + 64),
]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def matmul_softmax(query, key, value, mask, scale):
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale + mask
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype), value)


def time_us(fn, calls: int = 200) -> float:
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(rounds)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tune", action="store_true", help="time every split-KV launch instead of the backends")
    parser.add_argument("--shapes", default=",".join(shape[0] for shape in SHAPES))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    unknown = set(args.shapes.split(",")) - {shape[0] for shape in SHAPES}
    if unknown:
        raise SystemExit(f"unknown --shapes {', '.join(sorted(unknown))}: choose from "
                         f"{', '.join(shape[0] for shape in SHAPES)}")
    command, machine = announce_cuda_run("decode_attention.py", argv)
    rows = []
    for shape in [shape for shape in SHAPES if shape[0] in args.shapes.split(",")]:
        rows += tune(*shape) if args.tune else compare_backends(*shape)
        if args.out:  # after each shape: a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"command": command, "machine": machine, "rows": rows}, f, indent=1)
    return rows


def decoding_case(batch: int, kv_heads: int, groups: int, slots: int):
    query = torch.randn(batch, kv_heads, groups, 128, dtype=torch.bfloat16, device="cuda")
    key, value = (torch.randn(batch, kv_heads, slots, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mask = torch.zeros(batch, kv_heads, 1, slots, dtype=torch.bfloat16, device="cuda")
    mask[..., slots - 64:] = torch.finfo(torch.bfloat16).min  # unfilled room
    return query, key, value, mask


def candidate_launches() -> list[split_kv.AttentionLaunch]:
    return [split_kv.AttentionLaunch(block, programs, warps, stages) for block in (32, 64, 128)
            for programs in (1, 2, 4, 8) for warps in (2, 4, 8) for stages in (1, 2, 3, 4)]


def tune(name: str, batch: int, kv_heads: int, groups: int, slots: int) -> list[dict]:
    scale = 128 ** -0.5
    cases = [decoding_case(batch, kv_heads, groups, slots)
             for _ in range(copies_beyond_l2(2 * batch * kv_heads * slots * 128 * 2))]
    query, key, value, mask = cases[0]
    reference = matmul_softmax(query.float(), key.float(), value.float(), mask.float(), scale)
    kv_bytes = 2 * key.numel() * key.element_size()
    rows, timed = [], []
    for launch in candidate_launches():
        row = {"shape": name, "batch": batch, "kv_heads": kv_heads, "groups": groups, "slots": slots,
               "launch": dataclasses.asdict(launch), "default": launch == split_kv.LAUNCH}
        try:
            error = (split_kv.split_kv_attention(query, key, value, mask, scale, launch=launch).float()
                     - reference).abs().max().item()
            us = graphed_time_us([functools.partial(split_kv.split_kv_attention, *case, scale, launch=launch)
                                  for case in cases])
            row.update(us=us, gb_s=kv_bytes / us / 1e3, max_abs_error=error)
            timed.append(row)
        except Exception as failure:  # noqa: BLE001 - e.g. out of shared memory: reported, the others run
            row["error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:160]}"
        rows.append(row)
    default = next(row for row in timed if row["default"])
    for row in sorted(timed, key=lambda row: row["us"])[:3] + [default]:
        print(json.dumps(row), flush=True)
    del cases
    torch.cuda.empty_cache()
    return rows


def compare_backends(name: str, batch: int, kv_heads: int, groups: int, slots: int) -> list[dict]:
    query, key, value, mask = decoding_case(batch, kv_heads, groups, slots)
    scale = 128 ** -0.5
    reference = matmul_softmax(query.float(), key.float(), value.float(), mask.float(), scale)
    kv_bytes = 2 * key.numel() * key.element_size()
    candidates = {backend: (lambda b=b: _sdpa(b, query, key, value, mask, scale)) for backend, b in BACKENDS.items()}
    candidates["matmul_softmax"] = lambda: matmul_softmax(query, key, value, mask, scale)
    candidates["split_kv"] = lambda: split_kv.split_kv_attention(query, key, value, mask, scale)
    rows = []
    for backend, fn in candidates.items():
        row = {"shape": name, "batch": batch, "kv_heads": kv_heads, "groups": groups, "slots": slots,
               "backend": backend}
        try:
            error = (fn().float() - reference).abs().max().item()
            us = time_us(fn)
            row.update(us=us, gb_s=kv_bytes / us / 1e3, max_abs_error=error)
        except RuntimeError as failure:  # a backend that cannot take this mask or shape
            row["error"] = str(failure).splitlines()[0][:160]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _sdpa(backend, query, key, value, mask, scale):
    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


if __name__ == "__main__":
    main()
