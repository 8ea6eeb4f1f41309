"""Time the prefill scoring of SnapKV and VL-Cache for one layer, at a real model's shapes, by chunk size.

    python bench/scoring.py --batch 8 --keys 7473 --post 75 --chunks 26,24,23,22 --compile off,on

The scoring pass (`vlmcompress.scoring.attention_chunks`) makes the attention of a few queries over
every key in chunks of at most 2**k scores; smaller chunks keep a chunk's scores in the L2 cache for the
reductions that follow the softmax (column sums, VL-Cache's row maxima and dense-entry counts), at the
cost of more kernel launches. `--compile on` reduces each chunk's scores with one compiled function
(`vlmcompress.compilation`), which never writes the probabilities out, as the library does on CUDA. Shapes
default to LLaVA-OneVision-7B's language model (Qwen2-7B: 28 query heads, 4 KV heads, head dim 128) on its
7473-token hires prompt with 75 post-vision queries. CUDA only; bf16 inputs, medians of CUDA-event timings
(`sparse24.cuda_time`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from bench import announce_cuda_run  # noqa: E402
from sparse24 import cuda_time  # noqa: E402
from vlmcompress.scoring import accumulated_attention, attention_chunks  # noqa: E402
from vlmcompress.cache.vlcache import post_vision_statistics  # noqa: E402
from vlmcompress.compilation import compiled_where_it_works  # noqa: E402


def vlcache_pass(queries, keys, scaling, max_elements, compile, threshold=0.01):
    """VL-Cache's per-layer scoring (`VLCache.score`): column sums, and dense entries per row."""
    statistics = compiled_where_it_works(post_vision_statistics, keys.device, keys.dtype) if compile else \
        post_vision_statistics
    scores, dense = None, 0
    chunks = attention_chunks(queries, keys, scaling, max_elements=max_elements,
                              statistics=functools.partial(statistics, threshold=threshold))
    for _, (part, kept) in chunks:
        part = part[..., :keys.shape[2]].double()
        scores = part if scores is None else scores + part
        dense = dense + kept
    return scores, dense


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--keys", type=int, default=7473)
    parser.add_argument("--post", type=int, default=75, help="VL-Cache's post-vision queries")
    parser.add_argument("--window", type=int, default=32, help="SnapKV's observation window")
    parser.add_argument("--heads", type=int, default=28)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--chunks", default="26,24,23,22", help="comma-separated k: chunks of at most 2**k scores")
    parser.add_argument("--compile", default="off,on", help="reduce the scores with compiled statistics (on) or not")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    command, machine = announce_cuda_run("scoring.py", argv)
    generator = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(args.batch, args.kv_heads, args.keys, args.head_dim, device="cuda", generator=generator,
                       dtype=torch.bfloat16)
    queries = torch.randn(args.batch, args.heads, args.post, args.head_dim, device="cuda", generator=generator,
                          dtype=torch.bfloat16)
    scaling = args.head_dim ** -0.5
    reference = vlcache_pass(queries, keys, scaling, 1 << 26, compile=False)
    window = queries[:, :, -args.window:]
    rows = []
    for compile in (mode == "on" for mode in args.compile.split(",")):
        snapkv_ms = 1e3 * cuda_time(lambda: accumulated_attention(window, keys, scaling, compile=compile))
        rows.append({"method": "snapkv", "compile": compile, "chunk_log2": 26, "ms": snapkv_ms})
        print(json.dumps(rows[-1]), flush=True)
        for k in map(int, args.chunks.split(",")):
            scores, dense = vlcache_pass(queries, keys, scaling, 1 << k, compile)
            # Chunking and compiling change no formula, but kernels differ by shape: a score moves by float32
            # rounding, and an entry right at the threshold may cross it.
            torch.testing.assert_close(scores, reference[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(dense.double(), reference[1].double(), rtol=1e-4, atol=0)
            rows.append({"method": "vlcache", "compile": compile, "chunk_log2": k,
                         "ms": 1e3 * cuda_time(lambda: vlcache_pass(queries, keys, scaling, 1 << k, compile))})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
