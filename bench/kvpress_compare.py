"""vlmcompress against NVIDIA's kvpress on the methods both have, on the same language model.

kvpress 0.5.5 pins transformers < 5.3, so this runs in its own process with transformers 5.2.0
and kvpress on PYTHONPATH (wheels carried to the GPU machine). Both libraries compress the same
Qwen2-7B language model (random bf16 weights, the LLM of Qwen2-VL-7B and LLaVA-OneVision-7B) on the
same prompt of `--prompt` tokens at the same compression, and are timed the same way. vlmcompress is
measured twice: decoding eagerly as transformers does, and statically from a CUDA graph (what
`load(..., cuda_graphs=True)` does; `decode: graphs`), with an uncompressed graphed row for reference:

    PYTHONPATH=/tmp/site python bench/kvpress_compare.py --prompt 2408 --batch 8 --budget 0.1

kvpress's `compression_ratio` is the share removed, so budget 0.1 = compression_ratio 0.9.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=2408)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/kvpress")
    args = parser.parse_args()

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    import types

    # kvpress imports these at package import for presses and command lines we do not use (DuoAttention,
    # ExpectedAttention statistics); the GPU image has neither.
    for module, names in (("datasets", {"load_dataset": None}), ("fire", {"Fire": None})):
        try:
            __import__(module)
        except ImportError:
            sys.modules[module] = types.SimpleNamespace(**names)
    import kvpress
    from real_models import QWEN2_7B
    from vlmcompress.cache import PyramidKVCache, SnapKVCache, StreamingLLMCache
    from vlmcompress.glue import language_model_of
    from vlmcompress.cache.full import FullCache
    from vlmcompress.decoding.static import StaticDecoding, deferred_stop_check
    from vlmcompress.decoding.grouped_sdpa import GROUPED_SDPA

    config = AutoConfig.for_model("qwen2", **QWEN2_7B, vocab_size=152064, rope_theta=1e6)
    config.eos_token_id = None
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly, whatever from_config's dtype argument is called
    # load()'s attention: transformers' SDPA, except that a masked grouped-query decoding step (every static
    # step) does not copy K and V per query head. kvpress's unmasked steps go to transformers' SDPA unchanged.
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=GROUPED_SDPA).eval()
    torch.set_default_dtype(torch.float32)
    print(f"# model {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {model.dtype}", flush=True)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 150000, (args.batch, args.prompt), generator=generator).cuda()
    window = 32
    ratio = 1.0 - args.budget
    pairs = {
        "snapkv": (lambda: SnapKVCache(args.budget, window_size=window, kernel_size=5),
                   kvpress.SnapKVPress(compression_ratio=ratio, window_size=window, kernel_size=5)),
        "streamingllm": (lambda: StreamingLLMCache(args.budget, sink_tokens=4),
                         kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4)),
        "pyramidkv": (lambda: PyramidKVCache(args.budget, window_size=window, kernel_size=5),
                      kvpress.PyramidKVPress(compression_ratio=ratio, window_size=window, kernel_size=5)),
    }
    generate = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)

    @torch.no_grad()
    def measure(run_prefill, run_generate):
        run_prefill(), run_generate()  # warm-up
        prefill = statistics.median(timed(run_prefill) for _ in range(args.repeats))
        total = statistics.median(timed(run_generate) for _ in range(args.repeats))
        return {"prefill_s": prefill, "total_s": total,
                "decode_tok_s": args.batch * (args.new_tokens - 1) / max(total - prefill, 1e-9)}

    def static_generate(make_cache):
        """`generate` as `load(..., cuda_graphs=True)` runs it, for this plain language model."""
        cache = make_cache().attach(model)
        static = StaticDecoding(cache, language_model_of(model), room=args.new_tokens).install()
        try:
            with deferred_stop_check():
                return model.generate(input_ids, past_key_values=cache, **generate)
        finally:
            static.close()

    def ours(name, make_cache):
        prefill = lambda: model(input_ids, past_key_values=make_cache().attach(model), logits_to_keep=1)  # noqa: E731
        paths = {"eager": lambda: model.generate(input_ids, past_key_values=make_cache().attach(model), **generate),
                 "graphs": lambda: static_generate(make_cache)}
        for decode, run in paths.items():
            if name == "none" and decode == "eager":
                continue  # that is transformers' own row
            try:
                rows.append({"library": "vlmcompress", "method": name, "decode": decode, "budget": args.budget,
                             **measure(prefill, run)})
            except Exception as error:
                rows.append({"library": "vlmcompress", "method": name, "decode": decode,
                             "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(rows[-1]), flush=True)

    rows = []
    from transformers import DynamicCache

    baseline = measure(lambda: model(input_ids, past_key_values=DynamicCache(), logits_to_keep=1),
                       lambda: model.generate(input_ids, **generate))
    rows.append({"library": "transformers", "method": "none", "decode": "eager", **baseline})
    print(json.dumps(rows[-1]), flush=True)
    ours("none", FullCache)
    for name, (make_cache, press) in pairs.items():
        ours(name, make_cache)

        def press_prefill(press=press):
            with press(model):
                model(input_ids, past_key_values=DynamicCache(), logits_to_keep=1)

        def press_generate(press=press):
            with press(model):
                model.generate(input_ids, **generate)

        try:
            theirs = measure(press_prefill, press_generate)
            rows.append({"library": f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}",
                         "method": name, "decode": "eager", "budget": args.budget, **theirs})
        except Exception as error:  # report, don't lose the other rows
            rows.append({"library": "kvpress", "method": name, "error": f"{type(error).__name__}: {error}"})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "device": torch.cuda.get_device_name(), "prompt": args.prompt, "batch": args.batch}
    (out / "kvpress.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
