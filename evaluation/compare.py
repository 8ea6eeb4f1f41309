"""The report step over several evaluation runs (one per model): EffiVLM-Bench's OG with each model's OP, OL, OE.

    python evaluation/compare.py results/qwen2_vl results/llava_ov
    python evaluation/compare.py results/qwen2_vl/results.json results/llava_ov --output_path results/compare

Each argument is a folder written by `evaluation/run.py --output_path` (or its results.json), with a scored
baseline and the same tasks as the others. A compressed config is compared across the runs that have it
(matched by its name, e.g. `kv=snapkv,kv_budget=0.1`); configs missing from some run are listed, not
compared. Prints a Markdown table; `--output_path DIR` also writes DIR/comparison.json and DIR/comparison.md.
Formulas: evaluation/summary.py and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python evaluation/compare.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluation.report import _fmt, atomic_write  # noqa: E402
from evaluation.summary import config_metrics, generalization, mean_of_defined  # noqa: E402


class InputError(ValueError):
    """An argument that cannot be compared; its message names the fix."""


def load_run(path: str) -> dict:
    """{"path", "document", "baseline"} of one run folder or results.json, checked."""
    given = Path(path)
    file = given / "results.json" if given.is_dir() else given
    if not file.is_file():
        raise InputError(f"{path}: no results.json there; give a folder written by `evaluation/run.py --output_path` "
                         "or its results.json")
    try:
        document = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{file}: not readable JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("runs"), list) or "config" not in document:
        raise InputError(f"{file}: not a results.json of evaluation/run.py (no 'config' and 'runs')")
    baseline = next((r for r in document["runs"] if r.get("baseline") and not r.get("error")), None)
    scored = baseline is not None and any((t.get("primary") or {}).get("value") is not None
                                          for t in baseline.get("tasks", {}).values())
    if not scored:
        raise InputError(f"{file}: no scored baseline run, so nothing is relative to it; rerun it without "
                         "--predict_only, or see the baseline's 'error' in that file for why it failed")
    return {"path": str(file), "document": document, "baseline": baseline}


def check_same_tasks(loaded: list[dict]) -> list[str]:
    """The runs' common task list; InputError when the runs evaluated different tasks."""
    first = loaded[0]
    tasks = list(first["document"]["config"].get("tasks") or first["baseline"]["tasks"])
    for other in loaded[1:]:
        theirs = list(other["document"]["config"].get("tasks") or other["baseline"]["tasks"])
        if sorted(theirs) != sorted(tasks):
            raise InputError(f"{other['path']} has tasks {','.join(theirs)} but {first['path']} has {','.join(tasks)}; "
                             "OG compares the same tasks on every model: rerun with the same --tasks")
    return tasks


def labels(loaded: list[dict], paths: list[str]) -> list[str]:
    """Each run's model name (the last part of `pretrained`), or the path given when two share it."""
    names = [Path(str(r["document"]["config"].get("model_args", {}).get("pretrained", p))).name
             for r, p in zip(loaded, paths)]
    return names if len(set(names)) == len(names) else list(paths)


def compare(paths: list[str]) -> dict:
    """The comparison of the runs at `paths`: per compressed config, each model's OP/OL/OE/relative
    performance, their means over models, and OG."""
    loaded = [load_run(p) for p in paths]
    files = [Path(r["path"]).resolve() for r in loaded]
    repeated = sorted({p for p, f in zip(paths, files) if files.count(f) > 1})
    if repeated:
        raise InputError(f"{', '.join(repeated)} name the same results.json; give each run once")
    tasks = check_same_tasks(loaded)
    models = labels(loaded, paths)
    per_model_configs = [{r["name"]: r for r in run["document"]["runs"] if not r.get("baseline")} for run in loaded]
    names = list(dict.fromkeys(name for configs in per_model_configs for name in configs))
    common = [n for n in names if all(n in configs for configs in per_model_configs)]
    if not common:
        raise InputError("no compressed config appears in every run; run the same --model_args/--sweep "
                         "compression on every model")
    rows = []
    for name in common:
        per_model = {model: config_metrics(configs[name].get("tasks", {}), run["baseline"]["tasks"])
                     for model, configs, run in zip(models, per_model_configs, loaded)}
        row = {"name": name, "per_model": per_model}
        for key in ("OP", "OL", "OE"):
            row[key] = mean_of_defined(m[key] for m in per_model.values())
        row["OG"] = generalization({m: v["relative_performance"] for m, v in per_model.items()})
        rows.append(row)
    return {"runs": [{"model": m, "path": r["path"]} for m, r in zip(models, loaded)], "tasks": tasks,
            "configs": rows, "not_in_every_run": [n for n in names if n not in common]}


def markdown(comparison: dict) -> str:
    models = [r["model"] for r in comparison["runs"]]
    runs = ", ".join(f"{r['model']} ({r['path']})" for r in comparison["runs"])
    lines = [f"runs: {runs}; tasks: {', '.join(comparison['tasks'])}", "",
             "| config | OP | OG | OL | OE | " + " | ".join(f"OP {m}" for m in models) + " |",
             "|" + "---|" * (5 + len(models))]
    for row in comparison["configs"]:
        lines.append(f"| {row['name']} | {_fmt(row['OP'])} | {_fmt(row['OG'])} | {_fmt(row['OL'])} | "
                     f"{_fmt(row['OE'], 2)} | " + " | ".join(_fmt(row["per_model"][m]["OP"]) for m in models) + " |")
    if comparison["not_in_every_run"]:
        lines += ["", "not in every run, not compared: " + ", ".join(comparison["not_in_every_run"])]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="folder written by evaluation/run.py --output_path, or its results.json")
    p.add_argument("--output_path", default=None, metavar="DIR",
                   help="also write DIR/comparison.json and DIR/comparison.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.output_path and Path(args.output_path).exists() and not Path(args.output_path).is_dir():
            raise InputError(f"--output_path {args.output_path} is a file; give a folder")
        comparison = compare(args.runs)
    except InputError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    table = markdown(comparison)
    if args.output_path:
        out = Path(args.output_path)
        atomic_write(out / "comparison.json", json.dumps(comparison, indent=2))
        atomic_write(out / "comparison.md", table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
