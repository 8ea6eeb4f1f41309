"""Decoding speed of 4-bit weights (W4A16, `vlmcompress.quantization`) against bf16, same process, at real size.

    python bench/quant.py --model qwen2_vl_7b --batches 1,8 --paths eager,graphs,snapkv,graphs+snapkv \
        --new-tokens 64 --out results/quant.json

The model is built from its real configuration with random bf16 weights (`real_models.py`): first as it is, then
a copy per `--targets` set whose Linear layers there (the language model's by default) are quantized by
round-to-nearest (`--bits`, `--group-size`; speed does not depend on the method or the values) into
`QuantizedLinear` layers, timed with each CUDA kernel of
`--kernels` (`triton`: ours, on the stored layout; `tinygemm`: PyTorch's `_weight_int4pack_mm`, repacked). For
each weights kind and kernel, batch size and path (`eager`: transformers' decoding; `graphs`:
`cuda_graphs=True`, static decoding replayed from a CUDA graph; `snapkv`: SnapKV at `--budget`, eager or with
`graphs+`), one `generate` at the timed shapes runs first (it captures what the path captures), then `--repeats`
timed pairs, medians reported:
  generate_s     one `generate` of `--new-tokens` tokens
  ttft_s         one `generate` of one token
  decode_tok_s   batch x (new tokens - 1) / the median over prompts of a prompt's generate_s - ttft_s (timed
                 back to back)
  linear_gb      bytes held by the language model's Linear weights and the output head (codes, scales and
                 zeros when quantized)
and each quantized row's `speedup` (its decode_tok_s over the bf16 row of the same batch and path).
`--toy DIR` runs the same code on a tiny CPU checkpoint (a smoke test of the script; timings mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from bench import (TOY_IMAGE_SIDE, announce_run, answer_figures, build_model, save_rows, synchronize,  # noqa: E402
                   timed_answers)
from real_models import make_inputs  # noqa: E402
from vlmcompress.config import accepted_options, build_settings  # noqa: E402
from vlmcompress.quantization import QuantizedLinear, quantize  # noqa: E402


def linear_bytes(model) -> int:
    total = 0
    for module in [*model.model.language_model.modules(), model.lm_head]:
        if isinstance(module, QuantizedLinear):
            total += sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def generator(model, path: str, budget: float):
    """`generate(inputs, new_tokens)` of one path: `eager`, `graphs`, a KV method, or `graphs+` a KV method."""
    graphs = path.startswith("graphs")
    kv = path.removeprefix("graphs").lstrip("+")
    kv = None if kv in ("", "eager") else kv
    options = {"window_size": 32} if kv and "window_size" in accepted_options(kv) else {}
    model.compression = build_settings(kv=kv, kv_budget=budget if kv else None, cuda_graphs=graphs, **options)
    return lambda inputs, new_tokens: model.generate(
        **inputs, do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)


def measure(model, prompts, path, args, device) -> dict:
    generate = generator(model, path, args.budget)
    generate(prompts[0], args.new_tokens), generate(prompts[0], 1)  # capture / compile at these shapes
    pairs = timed_answers(generate, prompts[1:], args.new_tokens, device)
    return {**answer_figures(pairs, prompts[0]["input_ids"].shape[0], args.new_tokens),
            "prompt_tokens": prompts[0]["input_ids"].shape[1]}


def measure_weights(model, processor, weights: str, kernel: str | None, held: dict, args, device):
    """One row per batch size and path for the model as it is now (its weights, its CUDA kernel), yielded as
    soon as it is measured."""
    for batch in map(int, args.batches.split(",")):
        prompts = [make_inputs(processor, "hires", batch, args.hires if not args.toy else TOY_IMAGE_SIDE,
                               first_image=k * batch).to(device) for k in range(args.repeats + 1)]
        for path in args.paths.split(","):
            row = {"model": args.model, "weights": weights, "kernel": kernel, "batch": batch, "path": path,
                   "new_tokens": args.new_tokens, **held}
            try:
                row.update(measure(model, prompts, path, args, device))
            except Exception as exc:  # noqa: BLE001 - one failing row is reported, the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(row), flush=True)
            yield row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_vl_7b")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--paths", default="eager,graphs,snapkv,graphs+snapkv")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="different prompts timed per row")
    parser.add_argument("--budget", type=float, default=0.1, help="KV budget of the snapkv paths")
    parser.add_argument("--hires", type=int, default=672, help="side of the prompt's image, pixels")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--targets", default="language_model",
                        help="comma-separated target sets to quantize, each timed (`quantize`'s targets, joined by +: "
                             "language_model+lm_head quantizes the output head too)")
    parser.add_argument("--kernels", default="triton,tinygemm",
                        help="CUDA kernels of the quantized model (QuantizedLinear.cuda_kernel), each timed")
    parser.add_argument("--toy", default=None, help="a tiny checkpoint folder: run on the CPU at toy size")
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    args = parser.parse_args(argv)
    if not set(args.kernels.split(",")) <= {"triton", "tinygemm"}:
        parser.error(f"--kernels takes triton and tinygemm, got {args.kernels!r}")
    device, command, machine = announce_run("quant.py", argv, args.toy)
    kernels = args.kernels.split(",") if device.type == "cuda" else [None]  # the CPU has one int4 path
    rows = []
    quantized = {f"w{args.bits}-rtn-g{args.group_size}" + ("" if targets == "language_model" else f"-{targets}"):
                 targets for targets in args.targets.split(",")}
    for weights in ["bf16", *quantized]:
        model, processor = build_model(args.model, device, args.toy)
        if weights != "bf16":
            report = quantize(model, processor, "rtn", args.bits, args.group_size, targets=quantized[weights],
                              progress=False)
            print(f"# {report}", flush=True)
        synchronize(device)
        held = {"linear_gb": linear_bytes(model) / 1e9,
                "allocated_gb": torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else None}
        for kernel in [None] if weights == "bf16" else kernels:
            if kernel is not None:
                QuantizedLinear.cuda_kernel = kernel
            for row in measure_weights(model, processor, weights, kernel, held, args, device):
                rows.append(row)
                save_rows(args.out, command, machine, rows)  # after every row: a run cut off keeps them
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        base = next((r for r in rows if r["weights"] == "bf16" and r["batch"] == row["batch"]
                     and r["path"] == row["path"] and "decode_tok_s" in r), None)
        if row["weights"] != "bf16" and base is not None and "decode_tok_s" in row:
            row["speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
    print("| weights | kernel | batch | path | decode tok/s | x bf16 | TTFT s | Linear GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['kernel'] or ''} | {r['batch']} | {r['path']} | "
              f"{r.get('decode_tok_s', float('nan')):.1f} | "
              f"{r.get('speedup', 1.0 if r['weights'] == 'bf16' else float('nan')):.2f} | "
              f"{r.get('ttft_s', float('nan')):.3f} | {r['linear_gb']:.2f} |")
    save_rows(args.out, command, machine, rows)
    return rows


if __name__ == "__main__":
    main()
