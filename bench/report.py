"""Tables and a plot from `bench.py` result files.

    python bench/report.py bench/results/*.json --plot docs/benchmarks.png > table.md

Each file holds one `bench.py` run (its command, machine and rows); ratios compare a row with the
uncompressed ("none") row of the same run, model, input and batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ["model", "input", "batch", "method", "decode", "budget", "prompt", "visual→LLM", "prefill s", "TTFT s",
           "prefill ×", "decode tok/s", "decode ×", "KV MB", "KV %", "peak GB", "overhead s", "step ÷ floor"]


def load(paths):
    """`(file name, run)` for every `bench.py` run in `paths`: a file holds one run (its command, machine and
    rows) or several under "runs". Files of the other scripts (kvpress_compare, decode_step, sparse24,
    multi_gpu) have their own layouts and are skipped with a note on stderr."""
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        found = [run for run in data.get("runs", [data]) if "command" in run and "rows" in run
                 and all("model" in row and "method" in row and "input" in row for row in run["rows"])]
        if not found:
            print(f"{path}: not a bench.py result, skipped", file=sys.stderr)
        runs += [(Path(path).name, run) for run in found]
    return runs


def decode_path(row) -> str:
    return row.get("decode", "eager")  # runs before --decode existed decoded eagerly


def baseline_of(rows, row):
    """The uncompressed row of the same model, input, batch and decoding path."""
    for other in rows:
        if other["method"] == "none" and (other["model"], other["input"], other["batch"], decode_path(other)) == (
            row["model"], row["input"], row["batch"], decode_path(row)
        ) and "error" not in other:
            return other
    return None


def fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(runs) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for _, data in runs:
        rows = data["rows"]
        for row in rows:
            if "error" in row:
                lines.append(f"| {row['model']} | {row['input']} | {row['batch']} | {row['method']} | "
                             f"{decode_path(row)} | {fmt(row['budget'])} | error: {row['error'][:80]} |"
                             + " |" * (len(COLUMNS) - 7))
                continue
            base = baseline_of(rows, row)
            prefill_x = base["prefill_s"] / row["prefill_s"] if base else None
            decode_x = row["decode_tok_s"] / base["decode_tok_s"] if base else None
            kv_pct = 100 * row["kv_bytes"] / base["kv_bytes"] if base and row.get("kv_bytes") else None
            cells = [row["model"], row["input"], row["batch"], row["method"], decode_path(row), fmt(row["budget"]), row["prompt_tokens"],
                     row.get("visual_tokens"), fmt(row["prefill_s"], 3), fmt(row["ttft_s"], 3), fmt(prefill_x),
                     fmt(row["decode_tok_s"], 1), fmt(decode_x), fmt(row["kv_bytes"] / 2**20 if row.get("kv_bytes") else None, 1),
                     fmt(kv_pct, 1), fmt(row.get("peak_gb")), fmt(row.get("overhead_s"), 3), fmt(row.get("roofline_ratio"), 1)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(runs, path: str, model="qwen2_vl_7b", batch=8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4))
    # Decode speed as a ratio to the uncompressed row of the same run and decoding path: runs on the same
    # machine spread by +-15 % in absolute tokens/s, the ratio within a run does not carry that spread.
    series: dict[tuple, dict] = {}  # (method, decoding path) -> {budget: (row, its run's baseline)}
    baseline = None
    devices = set()
    for _, data in runs:
        for row in data["rows"]:
            if ("error" in row or row["model"] != model or row["batch"] != batch or row["input"] != "hires"
                    or row["budget"] is None or "+" in row["method"]):
                continue
            base = baseline_of(data["rows"], row)
            if base is None:
                continue
            if decode_path(base) == "eager":
                baseline = base
            devices.add(data.get("machine", {}).get("device", "GPU"))
            points = series.setdefault((row["method"], decode_path(row)), {})
            earlier = points.get(row["budget"])
            if earlier is None or "decode" in row or "decode" not in earlier[0]:
                points[row["budget"]] = (row, base)  # runs that record their decoding path are the newer ones
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(sorted({m for m, _ in series}))}
    for (method, decoding), by_budget in sorted(series.items()):
        budgets = sorted(by_budget)
        pairs = [by_budget[b] for b in budgets]
        label = method + (" (CUDA graphs)" if decoding == "graphs" else "")
        style = "-" if decoding == "graphs" else "--"
        left.plot(budgets, [row["decode_tok_s"] / base["decode_tok_s"] for row, base in pairs],
                  style, marker="o", color=colors[method], label=label)
        peaks = [(budget, row["peak_gb"]) for budget, (row, _) in zip(budgets, pairs) if row.get("peak_gb")]
        if peaks:  # CPU runs measure no peak
            middle.plot(*zip(*peaks), style, marker="o", color=colors[method], label=label)
        if decoding == "eager":
            right.plot(budgets, [row["kv_bytes"] / 2**20 for row, _ in pairs], marker="o", color=colors[method],
                       label=label)
    left.axhline(1.0, color="black", linestyle=":", label="uncompressed, same decoding")
    if baseline:
        if baseline.get("peak_gb"):
            middle.axhline(baseline["peak_gb"], color="black", linestyle=":", label="uncompressed")
        right.axhline(baseline["kv_bytes"] / 2**20, color="black", linestyle=":", label="uncompressed")
    for axis, label in ((left, "decode speed ÷ uncompressed (same run)"), (middle, "peak GPU memory (GB)"),
                        (right, "KV cache after prefill (MiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("budget (share of prompt tokens kept)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"{model}, batch {batch}, one high-resolution image ({', '.join(sorted(devices))}, "
                 "random bf16 weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    runs = load(args.files)
    print(table(runs))
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main()
