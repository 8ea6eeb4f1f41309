"""The reference benchmark: every KV-cache and visual-token pruning method at small budgets on the trained
SynthVQA reference models, accuracy with 95 % Wilson intervals (docs/reference_benchmark.md).

    python evaluation/reference_benchmark.py --archs qwen2_vl,llava_onevision --task synthvqa --limit 200

Each architecture is one evaluation/run.py run (`run.main` with the grid below as its configs: the baseline,
then every method at every budget), with its results.json under --output_path/<arch>-<task>; the table of
all of them is printed and written to --output_path/table.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python evaluation/reference_benchmark.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation import run  # noqa: E402
from evaluation.default import CHECKPOINTS, grid  # noqa: E402

# the methods of EffiVLM-Bench's token-compression tables that vlmcompress has; the question-aware KV methods
# look at the last 16 prompt tokens (the question), as in the default run and the reference tests
WINDOW = {"window_size": 16}
KV_METHODS = {"streamingllm": {}, "h2o": {}, "snapkv": WINDOW, "pyramidkv": WINDOW, "vlcache": WINDOW,
              "random": WINDOW, "lookm": {}}
# options of one method, listed as their own rows
KV_VARIANTS = [("snapkv+merge=pivotal", {"kv": "snapkv", **WINDOW, "merge": "pivotal"}),
               ("snapkv+head_adaptive", {"kv": "snapkv", **WINDOW, "head_adaptive": True})]
PRUNE_METHODS = ("fastv", "visionzip", "prumerge", "prumerge+")
BUDGETS = (0.01, 0.05, 0.1)


def configs(budgets) -> list[tuple[str, dict]]:
    """(row label, compression config) for every method at every budget, the baseline first."""
    rows = [("uncompressed", {})]
    rows += [(c["kv"], c) for c in grid("kv", KV_METHODS, list(budgets))]
    rows += [(label, dict(options, kv_budget=b)) for label, options in KV_VARIANTS for b in budgets]
    rows += [(c["prune"], c) for c in grid("prune", {method: {} for method in PRUNE_METHODS}, list(budgets))]
    return rows


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell(result: dict | None) -> str:
    """'0.62 [0.55, 0.68]' from one (task, config) result; exact match is 0/1, so accuracy x n counts successes."""
    if not result or "error" in result or not result.get("n_scored"):
        return "n/a"
    acc, n = result["accuracy"], result["n_scored"]
    lo, hi = wilson(round(acc * n), n)
    return f"{acc:.2f} [{lo:.2f}, {hi:.2f}]"


def table(results: dict[str, dict[tuple[str, float | None], dict]], budgets) -> str:
    """Markdown: one row per method, one column per (architecture, budget)."""
    archs = list(results)
    head = ["method"] + [f"{arch} @ {b:g}" for arch in archs for b in budgets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    labels = list(dict.fromkeys(label for per_arch in results.values() for label, _ in per_arch))
    for label in labels:
        if label == "uncompressed":
            cells = [cell(results[arch].get((label, None))) for arch in archs for _ in budgets]
        else:
            cells = [cell(results[arch].get((label, b))) for arch in archs for b in budgets]
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="qwen2_vl,llava_onevision", help="checkpoints under evaluation/reference/checkpoints")
    p.add_argument("--task", default="synthvqa", choices=("synthvqa", "synthvqa_hard"))
    p.add_argument("--limit", type=int, default=200, help="the first N questions (N/5 of each type)")
    p.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS), help="kv_budget and prune_budget shares")
    p.add_argument("--batch_size", type=int, default=10)
    p.add_argument("--output_path", default="results/reference_benchmark")
    p.add_argument("--use_cache", default=None, metavar="DIR", help="evaluation/run.py's response cache")
    args = p.parse_args(argv)
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets takes shares in (0, 1], comma-separated; got {args.budgets!r}")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    missing = [a for a in archs if not (CHECKPOINTS / a / "model.safetensors").is_file()]
    if missing:
        p.error(f"no trained checkpoint for {', '.join(missing)} in {CHECKPOINTS}; see evaluation/reference/README.md")
    rows = configs(budgets)
    results = {}
    for arch in archs:
        argv_run = ["--model_args", f"pretrained={CHECKPOINTS / arch}", "--tasks", args.task, "--limit", str(args.limit),
                    "--batch_size", str(args.batch_size), "--device", "cpu",
                    "--output_path", str(Path(args.output_path) / f"{arch}-{args.task}")]
        if args.use_cache:
            argv_run += ["--use_cache", args.use_cache]
        runs = run.main(argv_run, configs=[config for _, config in rows])
        results[arch] = {(label, config.get("kv_budget", config.get("prune_budget"))): r["tasks"].get(args.task)
                         for (label, config), r in zip(rows, runs)}
    text = table(results, budgets)
    out = Path(args.output_path) / "table.md"
    out.write_text(text + "\n")
    print(text)
    print(f"table: {out.resolve()}")
    return text


if __name__ == "__main__":
    main()
