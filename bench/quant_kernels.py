"""Time of one W4A16 matrix product per kernel, against bf16, at Qwen2-VL-7B's language-model shapes.

    PYTHONPATH=$PWD python bench/quant_kernels.py --out $OUT/quant_kernels.json

The four products of a decoder layer (hidden 3584, intermediate 18944, 28 heads and 4 KV heads of 128): the fused
q/k/v (3584 -> 4608), o_proj (3584 -> 3584), the fused gate/up (3584 -> 37888) and down_proj (18944 -> 3584), and
the output head (3584 -> 152064, quantized with `targets="language_model+lm_head"`), with
random 4-bit codes in groups of 128 and bf16 scales (`vlmcompress.quantization`'s stored form). At decoding's
rows (`--decode-rows`, 1, 8, 16 and 32) it times bf16 `F.linear` (cuBLAS), tinygemm (`aten._weight_int4pack_mm`:
`QuantizedLinear`s with `cuda_kernel = "tinygemm"`, their codes repacked into its layout) and vlmcompress's
few-rows triton product (`kernels.quantized_product`, with `product_config`'s launch); at prefill's rows
(`--prefill-rows`, 680 and 2408: the prompts of a 672-px image and of a hires one, docs/benchmarks.md) bf16
`F.linear`, dequantize + `F.linear` (what `QuantizedLinear` runs there) and the tinygemm layer (which there
dequantizes its tiles for `F.linear`, `kernels.tinygemm_tile_order`, where its probe passes; tinygemm's own
product otherwise).
Then (`--tune-rows`, 1 and 8) every launch of `kernels.candidate_configs`, and the fastest per shape.

Each time is the median over 5 replays of a CUDA graph of many calls, measured with CUDA events (no Python
launch cost, as in static decoding); the calls cycle through enough copies of the weight to exceed 3x the L2
cache, so that each reads its weight from memory as a decoding step does. `gb_s` is the bytes read (weight,
scales and zeros, and the input) over the time; `max_rel_error` the largest difference from the product with
the dequantized weight in float32, over the largest value of that product.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics

import torch
import torch.nn.functional as F

from bench import machine_record, reproducing_command, save_rows
from vlmcompress.quantization import QuantizedLinear, dequantize_groups, kernels, unpack_codes

# (name, out_features, in_features) of Qwen2-VL-7B's language model, and its output head (`targets=...+lm_head`)
SHAPES = [("qkv", 4608, 3584), ("o_proj", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944),
          ("lm_head", 152064, 3584)]
GROUP_SIZE = 128
DTYPE = torch.bfloat16
GRAPH_MS = 2.0  # each timed graph holds at least this much work


@dataclasses.dataclass
class Weights:
    """One copy of a layer's weight in the stored form."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def random_weights(out_features: int, in_features: int, generator: torch.Generator) -> Weights:
    groups = in_features // GROUP_SIZE
    qweight = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, device="cuda",
                            generator=generator)
    zeros = torch.randint(0, 16, (out_features, groups), dtype=torch.uint8, device="cuda", generator=generator)
    scales = (torch.rand(out_features, groups, device="cuda", generator=generator) / 64 + 1e-3).to(DTYPE)
    return Weights(qweight, scales, zeros)


def tinygemm_layer(weights: Weights) -> QuantizedLinear:
    """A `QuantizedLinear` of these codes on tinygemm (`cuda_kernel`), which repacks them into its layout now."""
    out_features, in_features = weights.qweight.shape[0], 2 * weights.qweight.shape[1]
    layer = QuantizedLinear(in_features, out_features, GROUP_SIZE, 4, dtype=DTYPE, device="cuda")
    layer.cuda_kernel = "tinygemm"
    layer.qweight.copy_(weights.qweight)
    layer.scales.copy_(weights.scales)
    layer.zeros.copy_(weights.zeros)
    layer(torch.zeros(1, in_features, dtype=DTYPE, device="cuda"))
    assert layer.layout == "cuda", "tinygemm did not take the layer"
    return layer


def copies_beyond_l2(bytes_per_copy: int) -> int:
    l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    return max(2, min(64, math.ceil(3 * l2 / bytes_per_copy)))


def time_us(calls: list) -> float:
    """Median µs of one call over 5 replays of a CUDA graph that cycles through `calls` (one per weight copy),
    repeated to at least GRAPH_MS of work."""
    for call in calls:  # build (triton compiles) and warm up outside the capture
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls:
        call()
    end.record()
    torch.cuda.synchronize()
    per_call_ms = max(start.elapsed_time(end) / len(calls), 1e-3)
    repeats = max(1, math.ceil(GRAPH_MS / per_call_ms / len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) * 1000 / (repeats * len(calls)))
    del graph
    return statistics.median(rounds)


def int4_bytes(weights: Weights) -> int:
    """Bytes of the stored form (tinygemm's layout holds as many codes, and a scale-and-offset table twice the
    scales)."""
    return sum(t.numel() * t.element_size() for t in (weights.qweight, weights.scales, weights.zeros))


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference).abs().max() / reference.abs().max()).item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-rows", default="1,8,16,32")
    parser.add_argument("--prefill-rows", default="680,2408")
    parser.add_argument("--tune-rows", default="1,8", help="rows at which every candidate launch is timed ('': none)")
    parser.add_argument("--shapes", default=",".join(name for name, _, _ in SHAPES))
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("quant_kernels.py times CUDA kernels: it needs a GPU")
    import triton

    command, machine = reproducing_command("quant_kernels.py", argv), machine_record(torch.device("cuda"))
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    machine.update(triton=triton.__version__, multiprocessors=properties.multi_processor_count,
                   l2_mb=properties.L2_cache_size / 2**20)
    print(f"# {command}\n# {json.dumps(machine)}", flush=True)
    decode_rows, prefill_rows, tune_rows = (
        [int(r) for r in text.split(",") if r] for text in (args.decode_rows, args.prefill_rows, args.tune_rows))
    generator = torch.Generator(device="cuda").manual_seed(0)
    results, tuning = [], []

    def record(row: dict) -> None:
        results.append(row)
        print(json.dumps(row), flush=True)
        save_rows(args.out, command, machine, results, tuning=tuning)

    for name, out_features, in_features in SHAPES:
        if name not in args.shapes.split(","):
            continue
        int4 = [random_weights(out_features, in_features, generator) for _ in range(copies_beyond_l2(
            out_features * in_features // 2))]
        tinygemm = [tinygemm_layer(weights) for weights in int4]
        bf16 = [torch.randn(out_features, in_features, device="cuda", dtype=DTYPE, generator=generator)
                for _ in range(copies_beyond_l2(2 * out_features * in_features))]
        first = int4[0]
        reference_weight = dequantize_groups(unpack_codes(first.qweight), first.scales, first.zeros)
        shape = {"shape": name, "out_features": out_features, "in_features": in_features, "group_size": GROUP_SIZE,
                 "int4_copies": len(int4), "bf16_copies": len(bf16)}

        def run_layer(x, layer):
            return layer(x)

        def ours(x, weights, config=None):
            return kernels.quantized_product(x, weights.qweight, weights.scales, weights.zeros, None, GROUP_SIZE,
                                             config)

        def dequantize_then_cublas(x, weights):
            return F.linear(x, kernels.dequantize(weights.qweight, weights.scales, weights.zeros, GROUP_SIZE))

        for rows in decode_rows + prefill_rows:
            x = torch.randn(rows, in_features, device="cuda", dtype=DTYPE, generator=generator)
            reference = x.float() @ reference_weight.t()
            input_bytes = x.numel() * x.element_size()
            # path -> (product(x, weight copy), the copies)
            paths = {"bf16": (F.linear, bf16), "tinygemm": (run_layer, tinygemm)}
            if rows <= kernels.MAX_PRODUCT_ROWS:
                paths["triton"] = (ours, int4)
            else:
                paths["dequantize+cublas"] = (dequantize_then_cublas, int4)
            bf16_us = None
            for path, (product, copies) in paths.items():
                weight_bytes = 2 * out_features * in_features if path == "bf16" else int4_bytes(int4[0])
                row = {**shape, "rows": rows, "path": path}
                try:
                    us = time_us([functools.partial(product, x, copy) for copy in copies])
                    row.update(us=us, gb_s=(weight_bytes + input_bytes) / us / 1e3)
                    if path == "bf16":
                        bf16_us = us
                    else:
                        row.update(x_bf16=bf16_us / us if bf16_us else None,
                                   max_rel_error=relative_error(product(x, copies[0]), reference))
                    if path == "triton":
                        row["config"] = dataclasses.asdict(kernels.product_config(rows, out_features, in_features)
                                                           .fitted(in_features, GROUP_SIZE))
                except Exception as failure:  # noqa: BLE001 - a kernel that fails here: reported, the others run
                    row["error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
                record(row)

        for rows in tune_rows:
            x = torch.randn(rows, in_features, device="cuda", dtype=DTYPE, generator=generator)
            reference = x.float() @ reference_weight.t()
            default = kernels.product_config(rows, out_features, in_features).fitted(in_features, GROUP_SIZE)
            fitted = list(dict.fromkeys([default] + [config.fitted(in_features, GROUP_SIZE)
                                                     for config in kernels.candidate_configs(rows)]))
            timed = []
            for config in fitted:
                row = {**shape, "rows": rows, "config": dataclasses.asdict(config), "default": config == default}
                try:
                    row.update(us=time_us([functools.partial(ours, x, copy, config) for copy in int4]),
                               max_rel_error=relative_error(ours(x, first, config), reference))
                    row["gb_s"] = (int4_bytes(first) + x.numel() * x.element_size()) / row["us"] / 1e3
                    timed.append(row)
                except Exception as failure:  # noqa: BLE001 - e.g. out of registers: reported, the others run
                    row["error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}"
                tuning.append(row)
            if timed:
                best = min(timed, key=lambda r: r["us"])
                default_row = next((r for r in timed if r["default"]), None)
                print(f"# best of {len(timed)} launches for {name} at {rows} rows: {best['config']} "
                      f"{best['us']:.1f} us ({best['gb_s']:.0f} GB/s); product_config's: "
                      f"{default_row['us'] if default_row else float('nan'):.1f} us", flush=True)
            save_rows(args.out, command, machine, results, tuning=tuning)
        del int4, tinygemm, bf16, reference_weight
        torch.cuda.empty_cache()

    print("| shape | rows | path | us | GB/s | x bf16 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = 1.0 if r["path"] == "bf16" else r.get("x_bf16") or float("nan")
        print(f"| {r['shape']} | {r['rows']} | {r['path']} | {r.get('us', float('nan')):.1f} | "
              f"{r.get('gb_s', float('nan')):.0f} | {ratio:.2f} |")
    save_rows(args.out, command, machine, results, tuning=tuning)
    return {"command": command, "machine": machine, "rows": results, "tuning": tuning}


if __name__ == "__main__":
    main()
