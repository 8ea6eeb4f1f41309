"""Time of one decoding step's attention, per SDPA backend, at the shapes static decoding gives.

    python bench/decode_attention.py --out bench/results/decode_attention.json

One query token per sample; its grouped-query heads viewed as `groups` rows per KV head (as
`vlmcompress_sdpa` does), an additive mask `[b, kv_heads, 1, slots]` (static decoding masks its unfilled
room), bf16. For each backend torch can run under that mask, for the plain matmul-softmax-matmul form,
and for vlmcompress's split-KV kernels (`vlmcompress/decoding/split_kv.py`, what `vlmcompress_sdpa` runs on CUDA), it
reports microseconds per layer call and the bandwidth of reading K and V once, from CUDA
events over many calls (median of 5 rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import announce_cuda_run
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
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    command, machine = announce_cuda_run("decode_attention.py", argv)
    rows = []
    for name, batch, kv_heads, groups, slots in SHAPES:
        query = torch.randn(batch, kv_heads, groups, 128, dtype=torch.bfloat16, device="cuda")
        key, value = (torch.randn(batch, kv_heads, slots, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        mask = torch.zeros(batch, kv_heads, 1, slots, dtype=torch.bfloat16, device="cuda")
        mask[..., slots - 64:] = torch.finfo(torch.bfloat16).min  # unfilled room
        scale = 128 ** -0.5
        reference = matmul_softmax(query.float(), key.float(), value.float(), mask.float(), scale)
        kv_bytes = 2 * key.numel() * key.element_size()
        candidates = {backend: (lambda b=b: _sdpa(b, query, key, value, mask, scale)) for backend, b in BACKENDS.items()}
        candidates["matmul_softmax"] = lambda: matmul_softmax(query, key, value, mask, scale)
        candidates["split_kv"] = lambda: split_kv.split_kv_attention(query, key, value, mask, scale)
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
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command, "machine": machine, "rows": rows}, f, indent=1)
    return rows


def _sdpa(backend, query, key, value, mask, scale):
    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


if __name__ == "__main__":
    main()
