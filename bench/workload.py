"""A benchmark's own workload: many prompts in a row, each a high-resolution image and a short answer
(DocVQA-shaped), at batch 1 and 8, against transformers' eager `generate` and its static cache + torch.compile,
with the same weights in the same process.

    python bench/workload.py --model qwen2_vl_7b --batches 1,8 --prompts 5 --new-tokens 16

Paths (`--paths`): `transformers` is the upstream class with SDPA and its default cache; `transformers-static`
the same with `cache_implementation="static"`, whose decoding step transformers compiles on CUDA; any other
name is a `bench.py` method (`none`, `snapkv`, `h2o`, `visionzip`, `visionzip+snapkv`, ...) through
`vlmcompress` with `cuda_graphs=True` (KV budget `--budget`, pruning budget 0.25). For each batch size and path,
one `generate` at the timed shapes runs first (it compiles or captures what the path compiles or captures),
then `--prompts` different prompts are timed, each on its own (`--rounds R`: the paths R times, every other round
in reverse order, since a path's place in the order moves its times), medians reported:
  generate_s     one `generate` of `--new-tokens` tokens (what an evaluation pays per batch of questions)
  ttft_s         one `generate` of one token
  decode_tok_s   batch x (new tokens - 1) / the median over prompts of a prompt's generate_s - ttft_s (the two
                 timed back to back: drift between them cancels, as it does not between two medians)
  answers_per_s  batch / generate_s
and, per batch size, each path's `generate_s` against both transformers paths. CUDA only; `--toy DIR` runs the
same code on a tiny CPU checkpoint with small images (a smoke test of the script; timings mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import transformers

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from bench import (TOY_IMAGE_SIDE, announce_run, answer_figures, build_model, parse_method, round_order,  # noqa: E402
                   save_rows, timed_answers)
from real_models import make_inputs  # noqa: E402
from vlmcompress.architectures import ARCHITECTURES  # noqa: E402
from vlmcompress.config import accepted_options, build_settings  # noqa: E402

TRANSFORMERS_PATHS = ("transformers", "transformers-static")


def upstream_copy(model):
    """The upstream transformers class with `model`'s weights, attending with transformers' own SDPA."""
    upstream_class = getattr(transformers, ARCHITECTURES[model.config.model_type].class_name)
    with torch.device(model.device):
        upstream = upstream_class._from_config(copy.deepcopy(model.config), dtype=model.dtype,
                                               attn_implementation="sdpa")
    upstream.load_state_dict(model.state_dict())
    return upstream.eval()


def generator(path: str, model, upstream, budget: float):
    """`generate(inputs, new_tokens)` of one path."""
    if path in TRANSFORMERS_PATHS:
        cache = {"cache_implementation": "static"} if path == "transformers-static" else {}
        return lambda inputs, new_tokens: upstream.generate(
            **inputs, do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **cache)
    method = parse_method(path)
    options = {"window_size": 32} if "window_size" in accepted_options(method["kv"], method["prune"]) else {}
    model.compression = build_settings(kv=method["kv"], kv_budget=budget if method["kv"] else None,
                                       prune=method["prune"], prune_budget=0.25 if method["prune"] else None,
                                       cuda_graphs=True, **options)
    return lambda inputs, new_tokens: model.generate(
        **inputs, do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2_vl_7b")
    parser.add_argument("--paths", default="transformers,transformers-static,none,snapkv")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompts", type=int, default=5, help="different prompts timed per batch size and path")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.1, help="KV budget of the vlmcompress paths")
    parser.add_argument("--hires", type=int, default=1344, help="side of the prompt's image, pixels")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time every path this many times, every other round in reverse order; each figure is "
                             "the median over all of a path's prompts")
    parser.add_argument("--toy", default=None, help="a tiny checkpoint folder: run on the CPU at toy size")
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device, command, machine = announce_run("workload.py", argv, args.toy)
    model, processor = build_model(args.model, device, args.toy)
    upstream = upstream_copy(model)
    rows = []
    for batch in map(int, args.batches.split(",")):
        side = args.hires if not args.toy else TOY_IMAGE_SIDE
        prompts = [make_inputs(processor, "hires", batch, side, first_image=k * batch).to(device)
                   for k in range(args.prompts + 1)]
        paths = args.paths.split(",")
        pairs = {path: [] for path in paths}
        for round_index in range(args.rounds):
            # every other round in reverse, so that no path is always timed first or after another
            for path in round_order(paths, round_index):
                generate = generator(path, model, upstream, args.budget)
                # compile / capture at these shapes (again in later rounds: the model keeps a few graphs only)
                generate(prompts[0], args.new_tokens), generate(prompts[0], 1)
                pairs[path] += timed_answers(generate, prompts[1:], args.new_tokens, device)
        for path in paths:
            figures = answer_figures(pairs[path], batch, args.new_tokens)
            row = {"model": args.model, "batch": batch, "path": path, "new_tokens": args.new_tokens,
                   "prompt_tokens": prompts[0]["input_ids"].shape[1], **figures,
                   "answers_per_s": batch / figures["generate_s"], "generate_s_each": [call for call, _ in pairs[path]]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            save_rows(args.out, command, machine, rows)
    for row in rows:
        for peer in TRANSFORMERS_PATHS:
            base = next((r for r in rows if r["batch"] == row["batch"] and r["path"] == peer), None)
            if base is not None:
                row[f"speedup_vs_{peer}"] = base["generate_s"] / row["generate_s"]
    print("| batch | path | generate s | TTFT s | decode tok/s | answers/s | x transformers | x static+compile |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['path']} | {r['generate_s']:.3f} | {r['ttft_s']:.3f} | {r['decode_tok_s']:.1f} | "
              f"{r['answers_per_s']:.2f} | {r.get('speedup_vs_transformers', float('nan')):.2f} | "
              f"{r.get('speedup_vs_transformers-static', float('nan')):.2f} |")
    save_rows(args.out, command, machine, rows)
    return rows


if __name__ == "__main__":
    main()
